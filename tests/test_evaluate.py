"""The evaluator (s2d_jax/evaluator.py: jit over the global mesh; s2d_jax/eval_setup.py
and s2d_jax/evaluate.py: the checks before work and the CLI), PTQ setting names,
and the report (s2d_jax/report.py: report.json, table, plots)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2d_jax import eval_setup
from s2d_jax import evaluate as ev
from s2d_jax import evaluator
from s2d_jax import parallel
from s2d_jax import ptq
from s2d_jax import quant_model as qm
from s2d_jax import report
from s2d_jax.models import vit

TINY = dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=(8, 8),
            pool_type="gap", head_zeroinit=False)
N, BS = 21, 8


@pytest.fixture(scope="module")
def setup():
  model = vit.Model(4, **TINY)
  rs = np.random.RandomState(0)
  x = rs.randn(N, 16, 16, 3).astype(np.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x[:1])
  logits = np.asarray(jax.jit(model.apply)(variables, x)[0])
  # labels: the float prediction for half of the examples (accuracy ~ 0.5+)
  y = np.where(np.arange(N) % 2 == 0, logits.argmax(-1), rs.randint(0, 4, N))
  return model, variables, x, y.astype(np.int32)


def _batches(x, y):
  """Two full batches, then 5 real rows + 3 masked garbage rows whose labels
  equal the model's prediction (they would count as correct if not masked)."""
  out = []
  for i in range(0, N, BS):
    xb, yb = x[i:i + BS], y[i:i + BS]
    m = np.ones(len(xb), np.int32)
    if len(xb) < BS:
      k = BS - len(xb)
      xb = np.concatenate([xb, 50 * np.ones((k,) + xb.shape[1:], np.float32)])
      yb = np.concatenate([yb, -np.ones(k, np.int32)])  # fixed below
      m = np.concatenate([m, np.zeros(k, np.int32)])
    out.append({"image": xb, "label": yb, "_mask": m})
  return out


def _reports(setup):
  model, variables, x, y = setup
  batches = _batches(x, y)
  garbage_pred = np.asarray(jax.jit(model.apply)(variables, batches[-1]["image"])[0])
  batches[-1]["label"] = np.where(batches[-1]["_mask"] > 0, batches[-1]["label"],
                                  garbage_pred.argmax(-1)).astype(np.int32)
  out = {}
  for n in (1, 2, 8):
    out[n] = ev.evaluate_model(
        model.apply, variables, batches, settings=["float", "W4A4-static"],
        devices=jax.devices()[:n], calib_batches=2, pcdr_examples=4 if n == 1 else 0,
        progress=False)
  # params split over an fsdp axis of 2 (4 x 2 mesh), as the trainer's FSDP leaves them
  mesh = parallel.make_mesh(2)
  sharded = parallel.put(variables, parallel.tree_shardings(variables, mesh))
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded))
  out["fsdp"] = ev.evaluate_model(
      model.apply, sharded, batches, settings=["float", "W4A4-static"], mesh=mesh,
      calib_batches=2, pcdr_examples=4, progress=False)
  return out


def test_reports_on_1_2_8_devices_and_fsdp(setup, tmp_path):
  """One fixture-free test (xdist would build a module fixture per worker)."""
  reports = _reports(setup)
  _same_numbers_on_1_2_8_devices(reports)
  _accuracy_matches_independent_computation(setup, reports)
  _report_plots_and_table(reports, tmp_path)


def _same_numbers_on_1_2_8_devices(reports):
  r1 = reports[1]
  for n in (2, 8, "fsdp"):
    assert reports[n]["counts"] == r1["counts"]
    assert reports[n]["accuracy"] == r1["accuracy"]
    assert reports[n]["layers"].keys() == r1["layers"].keys()
    for k, s in r1["layers"].items():
      for f in ("count", "max_abs", "kurtosis", "mean_token_inf_norm",
                "median_abs", "channel_range_spread"):
        np.testing.assert_allclose(reports[n]["layers"][k][f], s[f], rtol=1e-5,
                                   err_msg=f"{n} devices {k} {f}")
    assert reports[n]["devices"]["count"] == (8 if n == "fsdp" else n)
  assert reports["fsdp"]["devices"]["mesh"] == {"data": 4, "fsdp": 2}
  for k, v in r1["pcdr"].items():
    np.testing.assert_allclose(reports["fsdp"]["pcdr"][k], v, rtol=1e-4, atol=1e-6)
  for k, v in r1["weights"].items():
    np.testing.assert_allclose(reports["fsdp"]["weights"][k]["top_sigma"],
                               v["top_sigma"], rtol=1e-5)


def _accuracy_matches_independent_computation(setup, reports):
  model, variables, x, y = setup
  r = reports[1]
  # masked rows are neither seen nor counted as correct; the padding is not dropped
  assert r["counts"]["float"]["total"] == N
  pred = np.asarray(jax.jit(model.apply)(variables, x)[0]).argmax(-1)
  assert r["counts"]["float"]["correct"] == int((pred == y).sum())
  # W4A4-static: calibrate on the first two batches, quantize, count
  cal = qm.calibrate(model.apply, "W4A4-static", variables,
                     [(x[:BS],), (x[BS:2 * BS],)])
  f = jax.jit(qm.quantized_apply(lambda v, x: model.apply(v, x)[0], "W4A4-static",
                                 calibration=cal))
  qpred = np.asarray(f(variables, x)).argmax(-1)
  assert r["counts"]["W4A4-static"]["correct"] == int((qpred == y).sum())
  assert r["settings"]["W4A4-static"]["a_mode"] == "static"
  plan = r["quant_plan"]["W4A4-static"]["modules_by_bits"]
  assert plan["W8A8"] == ["embedding", "head"]  # ends kept at 8 bits
  assert "Transformer/encoderblock_0/MlpBlock_0/Dense_1" in plan["W4A4"]
  assert r["batches"] == 3 and r["batch_size"] == BS
  # statistics of the first matmul input == numpy on the real images
  s = r["layers"]["embedding/input"]
  np.testing.assert_allclose(s["max_abs"], np.abs(x).max(), rtol=1e-6)
  assert s["count"] == x.size
  assert len(r["pcdr"]["Transformer/encoderblock_0/MlpBlock_0/Dense_0"]) == 3
  w = np.asarray(variables["params"]["Transformer"]["encoderblock_0"]["MlpBlock_0"][
      "Dense_1"]["kernel"])
  np.testing.assert_allclose(
      r["weights"]["Transformer/encoderblock_0/MlpBlock_0/Dense_1"]["sigma_max"],
      np.linalg.svd(w, compute_uv=False)[0], rtol=1e-5)


def _report_plots_and_table(reports, tmp_path):
  r = dict(reports[1])
  path = report.write_report(r, str(tmp_path))
  with open(path) as f:
    loaded = json.load(f)
  assert loaded["accuracy"]["float"] == r["accuracy"]["float"]
  assert report.read_report(str(tmp_path)) == loaded
  assert set(os.listdir(tmp_path)) == {"report.json", "plots"}  # no temporary left
  assert set(os.listdir(tmp_path / "plots")) == {
      "accuracy_vs_bits.png", "activations.png", "sigma_max.png"}
  table = report.format_table(r)
  assert "W4A4-static" in table and f"{100 * r['accuracy']['float']:.2f}" in table


class FakePTQ:
  """A PTQ method module for the tests (the real ones are ported elsewhere): static
  per-tensor minmax ranges from the calibration images, at the requested bits."""
  calls = []

  @staticmethod
  def quantize(apply_fn, variables, calib_images, w_bits, a_bits, *, output_fn=None,
               **options):
    del output_fn, options
    FakePTQ.calls.append((w_bits, a_bits, np.asarray(calib_images).copy()))
    setting = f"W{w_bits}A{a_bits}-static"
    cal = qm.calibrate(apply_fn, setting, jax.device_get(variables),
                       [(np.asarray(calib_images),)])

    def qapply(qv, images, **kw):
      f = qm.quantized_apply(apply_fn, setting, calibration=qv["calib"])
      return f({"params": qv["params"]}, images, **kw)
    qapply.info = {"setting": setting, "layers": {"embedding": [w_bits, a_bits]}}
    return qapply, {"params": variables["params"], "calib": cal}


@pytest.fixture
def fake_ptq(monkeypatch):
  FakePTQ.calls.clear()
  orig = ptq.method_module
  monkeypatch.setitem(ptq.METHODS, "Fake", "fake")
  monkeypatch.setattr(ptq, "method_module",
                      lambda m: FakePTQ if m == "Fake" else orig(m))
  return FakePTQ


def test_ptq_setting_names(setup, fake_ptq):
  """'METHOD/WxAy' settings: calibrated once on calib_images, evaluated like the
  others, recorded in the report; the same numbers on 1 and 8 devices."""
  model, variables, x, y = setup
  calib = x[:6]
  batches = [{"image": x[i:i + BS], "label": y[i:i + BS]} for i in range(0, N, BS)]
  reps = {n: ev.evaluate_model(model.apply, variables, batches,
                               settings=["float", "Fake/W4A4", "W8A8"],
                               calib_images=calib, devices=jax.devices()[:n],
                               collect_stats=False, weight_stats=False,
                               pcdr_examples=0, progress=False) for n in (1, 8)}
  assert len(fake_ptq.calls) == 2                    # once per setting and run
  assert fake_ptq.calls[0][:2] == (4, 4)
  np.testing.assert_array_equal(fake_ptq.calls[0][2], calib)
  cal = qm.calibrate(model.apply, "W4A4-static", variables, [(calib,)])
  qpred = np.asarray(jax.jit(qm.quantized_apply(model.apply, "W4A4-static",
                                                calibration=cal))(variables, x)[0])
  want = int((qpred.argmax(-1) == y).sum())
  for r in reps.values():
    assert r["counts"]["Fake/W4A4"] == {"correct": want, "total": N, "nonfinite": 0}
    assert list(r["accuracy"]) == ["float", "Fake/W4A4", "W8A8"]
  rec = reps[1]["settings"]["Fake/W4A4"]
  assert rec == dict(method="Fake", w_bits=4, a_bits=4, calib_images=6,
                     info={"setting": "W4A4-static",
                           "layers": {"embedding": [4, 4]}})
  assert "Fake/W4A4" not in reps[1]["quant_plan"]
  table = report.format_table(reps[1])
  assert "Fake/W4A4  4  4" in table
  with pytest.raises(ValueError, match="need calib_images"):
    ev.evaluate_model(model.apply, variables, batches, settings=["Fake/W4A4"])
  with pytest.raises(ValueError, match="unknown method 'Nope'"):
    ev.evaluate_model(model.apply, variables, batches, settings=["Nope/W4A4"])


def test_pad_batch_and_errors(setup):
  model, variables, x, y = setup
  b = evaluator._pad_batch(  # pylint: disable=protected-access
      {"image": x[:3], "label": y[:3]}, 8)
  assert b["image"].shape[0] == 8 and b["_mask"].tolist() == [1, 1, 1] + [0] * 5
  with pytest.raises(ValueError, match="batch size 6 does not divide among 4 devices"):
    ev.evaluate_model(model.apply, variables, [{"image": x[:6], "label": y[:6]}],
                      devices=jax.devices()[:4])
  with pytest.raises(ValueError, match="unknown quant setting 'W4X4'"):
    ev.evaluate_model(model.apply, variables, [], settings=["float", "W4X4"])
  with pytest.raises(ValueError, match="listed twice"):
    ev.parse_settings(["W8A8", "W8A8"])
  with pytest.raises(ValueError, match="yielded no batch"):
    ev.evaluate_model(model.apply, variables, [])
  with pytest.raises(KeyError, match="'label'"):
    ev.evaluate_model(model.apply, variables, [{"image": x[:8]}], devices=jax.devices()[:1])


def _write_config(tmp_path, ckpt, data_dir, batch_size=8, settings="('float', 'W8A8')",
                  pcdr=4):
  cfg = tmp_path / "cfg.py"
  cfg.write_text(f"""
from s2d_jax import config_utils
def get_config(arg=None):
  c = config_utils.default_train_config()
  c.model_name = 'vit'
  c.model = dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=(8, 8),
                 pool_type='gap', scan=False)
  c.num_classes = 10
  c.evaluate.data = dict(name='s2d_demo_shapes/tiny', split='test[:21]')
  c.evaluate.pp = 'value_range(-1,1)|keep("image","label")'
  c.evaluate.batch_size = {batch_size}
  c.evaluate.data_dir = {str(data_dir)!r}
  c.evaluate.settings = {settings}
  c.evaluate.checkpoint = {str(ckpt)!r}
  c.evaluate.pcdr_examples = {pcdr}
  return c
""")
  return str(cfg)


def test_cli_end_to_end_npz(tmp_path, capsys, request):
  from s2d_jax.data import demo
  from s2d_jax.models import siglip
  data_dir = tmp_path / "tfds"
  demo.build(str(data_dir), "tiny")
  model = vit.Model(10, **TINY)
  params = jax.jit(model.init)(jax.random.key(3), jnp.zeros((1, 16, 16, 3)))["params"]
  ckpt = tmp_path / "model.npz"
  siglip.save(str(ckpt), params)
  cfg = _write_config(tmp_path, ckpt, data_dir)
  workdir = tmp_path / "work"
  rep = ev.main(["--config", cfg, "--workdir", str(workdir),
                 "--config.evaluate.calib_batches=1"])
  out = capsys.readouterr().out
  assert "W8A8" in out and "top-1" in out
  saved = json.load(open(workdir / "report.json"))
  assert saved["counts"]["float"]["total"] == 21  # 3 batches of 8, last padded
  assert saved["checkpoint"]["kind"] == "npz"
  assert saved["checkpoint"]["num_params"] == sum(
      np.size(p) for p in jax.tree.leaves(params))
  assert rep["data"]["split"] == "test[:21]"
  # the same params as an orbax training checkpoint (checkpoint='' -> workdir)
  from s2d_jax import checkpointing
  orbax_dir = tmp_path / "run"
  checkpointing.Checkpointer(str(orbax_dir)).save(7, params, {})
  rep2 = ev.main(["--config", _write_config(tmp_path, "", data_dir, pcdr=0),
                  "--workdir", str(orbax_dir), "--config.evaluate.settings=float"])
  assert rep2["checkpoint"]["kind"] == "orbax"
  assert rep2["counts"]["float"] == rep["counts"]["float"]
  assert "pcdr" not in rep2 and len(rep["pcdr"]) > 0
  assert rep2["checkpoint"]["params_sha256"] == rep["checkpoint"]["params_sha256"]
  # errors named clearly
  with pytest.raises(FileNotFoundError, match="checkpoint not found"):
    ev.main(["--config", _write_config(tmp_path, tmp_path / "nope.npz", data_dir),
             "--workdir", str(workdir)])
  with pytest.raises(ValueError, match="batch_size=9 does not divide among 8"):
    ev.main(["--config", _write_config(tmp_path, ckpt, data_dir, batch_size=9),
             "--workdir", str(workdir)])
  with pytest.raises(ValueError, match="kind='zeroshot' needs model_name='two_towers'"):
    ev.main(["--config", _write_config(tmp_path, ckpt, data_dir),
             "--workdir", str(workdir), "--config.evaluate.kind=zeroshot"])
  # a PTQ setting through the CLI: the first calib_images training images with the
  # evaluation preprocessing, identical whatever reads them
  from s2d_jax.data import input_pipeline
  fake = request.getfixturevalue("fake_ptq")
  rep3 = ev.main(["--config", _write_config(tmp_path, ckpt, data_dir, pcdr=0,
                                            settings="('float', 'Fake/W8A8')"),
                  "--workdir", str(tmp_path / "ptq"), "--config.evaluate.calib_images=5",
                  "--config.input.data.name=s2d_demo_shapes/tiny",
                  "--config.input.data.split=train[:7]",
                  "--config.input.data_dir", str(data_dir)])
  assert rep3["settings"]["Fake/W8A8"]["calib_images"] == 5
  first = next(input_pipeline.iterate_eval(
      "s2d_demo_shapes/tiny", "train[:7]", preprocess='value_range(-1,1)|keep("image","label")',
      batch_size=7, process_index=0, process_count=1, data_dir=str(data_dir)))
  np.testing.assert_array_equal(fake.calls[-1][2], first["image"][:5])
  assert json.load(open(tmp_path / "ptq" / "report.json"))["settings"]["Fake/W8A8"][
      "method"] == "Fake"
  with pytest.raises(ValueError, match="unknown quant setting 'W9'"):
    ev.main(["--config", _write_config(tmp_path, ckpt, data_dir,
                                       settings="('float', 'W9')"),
             "--workdir", str(workdir)])


def test_zeroshot_two_towers_quantizes_image_tower():
  from s2d_jax.models import two_towers
  model = two_towers.Model(
      image=dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=(8, 8),
                 pool_type="gap", head_zeroinit=False),
      text=dict(width=16, depth=1, mlp_dim=32, num_heads=2, vocab_size=30),
      out_dim=(16, 16))
  rs = np.random.RandomState(1)
  x = rs.uniform(-1, 1, (12, 16, 16, 3)).astype(np.float32)
  params = jax.jit(model.init)(jax.random.key(0), x[:1],
                               jnp.zeros((1, 4), jnp.int32))["params"]
  emb = rs.randn(5, 16).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  apply_fn, output_fn = ev.zeroshot_fns(model, emb)
  zimg = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, None)[0])(
      params, x))
  pred = (zimg @ emb.T).argmax(-1)
  assert len(set(pred.tolist())) > 1  # a non-degenerate model
  y = np.where(np.arange(12) < 7, pred, (pred + 1) % 5).astype(np.int32)
  r = ev.evaluate_model(apply_fn, {"params": params},
                        [{"image": x[:8], "label": y[:8]},
                         {"image": x[8:], "label": y[8:]}],  # short last batch
                        settings=["float", "W4A4"], output_fn=output_fn,
                        devices=jax.devices()[:2], collect_stats=False,
                        pcdr_examples=0, progress=False)
  assert r["counts"]["float"] == {"correct": 7, "total": 12, "nonfinite": 0}
  qz = jax.jit(qm.quantized_apply(lambda v, x: model.apply(v, x, None)[0], "W4A4"))(
      {"params": params}, x)
  assert r["counts"]["W4A4"]["correct"] == int(((np.asarray(qz) @ emb.T).argmax(-1)
                                                 == y).sum())
  assert not np.allclose(np.asarray(qz), zimg)  # the image tower was quantized


def test_cli_help_lists_flags_and_an_example(capsys):
  with pytest.raises(SystemExit) as e:
    ev.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  for flag in ("--config", "--workdir", "--coordinator_address", "--num_processes",
               "--process_id"):
    assert flag in out
  assert "python -m s2d_jax.evaluate --config" in out


@pytest.mark.parametrize("name", ["RepQ-ViT/W4A4", "ERQ/W4A4"])  # one path for all
def test_real_ptq_methods_in_the_evaluator(setup, name):
  """The paper's protocols by name: the evaluator's counts equal those of
  ptq.quantize + qapply on the same calibration images (masked last batch), and
  report.json records the method's own info (its per-op plan)."""
  model, variables, x, y = setup
  calib = x[:8]
  batches = _batches(x, y)
  rep = ev.evaluate_model(model.apply, variables, batches, settings=["float", name],
                          calib_images=calib, collect_stats=False, weight_stats=False,
                          pcdr_examples=0, progress=False)
  qapply, qvars = ptq.quantize(model.apply, variables, calib, name)
  pred = np.asarray(jax.jit(qapply)(qvars, x)[0]).argmax(-1)
  c = rep["counts"][name]
  assert (c["correct"], c["total"]) == (int((pred == y).sum()), N)
  rec = rep["settings"][name]
  method, bits = name.split("/")
  assert (rec["method"], rec["w_bits"], rec["calib_images"]) == (method, int(bits[1]), 8)
  assert rec["info"]["name"] == name and rec["info"]["plan"]
  json.dumps(rec)


def test_nonfinite_logits_are_flagged_not_scored(setup):
  """Examples whose logits hold NaN / Inf count as wrong and are counted per
  setting; an all-NaN model scores 0 (on main argmax(NaN) = class 0 = the label
  here, i.e. a plausible-looking 100 %), and the table says so."""
  model, variables, x, _ = setup
  y0 = np.zeros(N, np.int32)
  xn = x.copy()
  xn[3, 0, 0, 0] = np.nan                      # one example's image -> NaN logits
  batches = [{"image": xn[i:i + BS], "label": y0[i:i + BS]} for i in range(0, N, BS)]
  kw = dict(devices=jax.devices()[:2], weight_stats=False, pcdr_examples=0,
            progress=False)
  r = ev.evaluate_model(model.apply, variables, batches, settings=["float", "W8A8"],
                        **kw)
  logits = np.asarray(jax.jit(model.apply)(variables, xn)[0])
  finite = np.isfinite(logits).all(-1)
  assert finite.sum() == N - 1
  want = int(((logits.argmax(-1) == 0) & finite).sum())
  assert r["counts"]["float"] == {"correct": want, "total": N, "nonfinite": 1}
  assert r["counts"]["W8A8"]["nonfinite"] == 1
  bad_layers = [k for k, v in r["layers"].items() if v["nonfinite"]]
  assert "embedding/input" in bad_layers
  table = report.format_table(r)
  assert "non-finite" in table.splitlines()[0]
  assert f"{len(bad_layers)} layer(s) with non-finite activations" in table
  assert "non-finite logits in float, W8A8" in table
  # an all-NaN model: 0 %, every example flagged
  p = jax.tree.map(np.array, variables["params"])
  p["head"]["bias"][:] = np.nan
  batches = [{"image": x[i:i + BS], "label": y0[i:i + BS]} for i in range(0, N, BS)]
  r = ev.evaluate_model(model.apply, {"params": p}, batches, settings=["float"],
                        collect_stats=False, **kw)
  assert r["accuracy"]["float"] == 0.0
  assert r["counts"]["float"] == {"correct": 0, "total": N, "nonfinite": N}
  row = report.format_table(r).splitlines()[2].split()
  assert row[:2] == ["float", "-"] and row[3:5] == ["0.00", "(!)"] and row[-1] == str(N)


def test_cli_checks_before_work_and_checkpoint_against_model(tmp_path, capsys):
  """Before any work: a workdir that cannot be written, a missing split, too few
  calibration images; orbax checkpoints: another model (named, with the config
  difference) and NaN params (refused unless model_load.allow_nonfinite)."""
  from s2d_jax import checkpointing
  from s2d_jax.data import demo
  from s2d_jax.models import checkpoint as ckpt_lib
  data_dir = tmp_path / "tfds"
  demo.build(str(data_dir), "tiny")
  model = vit.Model(10, **TINY)
  params = jax.tree.map(np.array, jax.device_get(
      jax.jit(model.init)(jax.random.key(3), jnp.zeros((1, 16, 16, 3)))["params"]))
  cfg = _write_config(tmp_path, "", data_dir, pcdr=0, settings="('float',)")
  run = tmp_path / "run"
  c = checkpointing.Checkpointer(str(run))
  from s2d_jax import config_utils
  c.save(7, params, {}, {"config": config_utils.config_as_json(
      config_utils.load_config(cfg))})
  c.close()
  # a file where the workdir should be: refused before the checkpoint is read
  (tmp_path / "afile").write_text("x")
  with pytest.raises(OSError, match="--workdir .*afile/w' is not writable"):
    ev.main(["--config", cfg, "--workdir", str(tmp_path / "afile" / "w"),
             "--config.evaluate.checkpoint", str(tmp_path / "nope")])
  with pytest.raises(ValueError, match=r"config.evaluate.data: .*test\[:9999\]"):
    ev.main(["--config", cfg, "--workdir", str(run),
             "--config.evaluate.data.split=test[:9999]"])
  with pytest.raises(ValueError, match=r"config.evaluate.calib_images=50: the "
                     r"calibration split .*train\[:7\]\] \(config.input.data\) has only 7"):
    ev.main(["--config", cfg, "--workdir", str(run),
             "--config.evaluate.settings=float,RepQ-ViT/W4A4",
             "--config.evaluate.calib_images=50",
             "--config.input.data.name=s2d_demo_shapes/tiny",
             "--config.input.data.split=train[:7]",
             "--config.input.data_dir", str(data_dir)])
  # another model: named, with what differs in config terms
  with pytest.raises(checkpointing.IncompatibleCheckpointError,
                     match=r"'head/bias' has shape \(10,\) there but \(3,\) in the "
                     r"model; the config differs: num_classes is 3 now, 10 in "
                     r"checkpoint 7's training config"):
    ev.main(["--config", cfg, "--workdir", str(run), "--config.num_classes=3"])
  # NaN params: refused by name, or evaluated (and flagged) when allowed
  params["head"]["bias"][1] = np.nan
  nan_run = tmp_path / "nan_run"
  c = checkpointing.Checkpointer(str(nan_run))
  c.save(1, params, {}, {})
  c.close()
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r"head/bias \(1 NaN, 0 Inf of 10 values\).*allow_nonfinite"):
    ev.main(["--config", cfg, "--workdir", str(nan_run)])
  assert not (nan_run / "report.json").exists()
  capsys.readouterr()
  with pytest.warns(ckpt_lib.NonFiniteWarning, match="head/bias"):
    rep = ev.main(["--config", cfg, "--workdir", str(nan_run),
                   "--config.model_load.allow_nonfinite=True"])
  assert rep["counts"]["float"] == {"correct": 0, "total": 21, "nonfinite": 21}
  assert "(!)" in capsys.readouterr().out
  assert json.load(open(nan_run / "report.json"))["counts"]["float"]["nonfinite"] == 21


def test_check_writable_probes_remote_workdirs(data_dir, monkeypatch):
  """`://` workdirs are probed through tf.io.gfile (on main they were not checked,
  so an unwritable bucket failed after the whole evaluation): TF's in-memory
  `ram://` filesystem passes and keeps no probe file; a bucket that refuses writes
  (tf.io.gfile replaced by one answering 403) fails naming the workdir and TF's
  error, and `evaluate` stops there, before the model is loaded."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from s2d_jax import config_utils
  ev.check_writable("ram://s2d_write_check/run")
  assert tf.io.gfile.listdir("ram://s2d_write_check/run") == []
  made = []
  monkeypatch.setattr(tf.io.gfile, "makedirs", made.append)

  def denied(path, mode):
    raise tf.errors.PermissionDeniedError(None, None, f"{path} ({mode}): 403 Forbidden")
  monkeypatch.setattr(tf.io.gfile, "GFile", denied)
  msg = (r"--workdir 'gs://bucket/run' is not writable \(PermissionDeniedError: "
         r"gs://bucket/run/\.write_check_\w+ \(w\): 403 Forbidden\)")
  with pytest.raises(OSError, match=msg):
    ev.check_writable("gs://bucket/run")
  assert made == ["gs://bucket/run"]

  def no_work(*a, **k):
    raise AssertionError("the model was loaded before the workdir check")
  monkeypatch.setattr(eval_setup, "load_model", no_work)
  c = config_utils.load_config(f"demo:size=tiny,data_dir={data_dir}")
  c.evaluate.settings = ("float",)
  with pytest.raises(OSError, match=msg):
    ev.evaluate(c, "gs://bucket/run")
