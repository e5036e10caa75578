"""PTQ evaluation under pmap (s2d_jax/evaluate.py) and its report / plots."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2d_jax import evaluate as ev
from s2d_jax import quant_model as qm
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
  return out


def test_pmap_reports(setup, tmp_path):
  """One fixture-free test (xdist would build a module fixture per worker)."""
  reports = _reports(setup)
  _same_numbers_on_1_2_8_devices(reports)
  _accuracy_matches_independent_computation(setup, reports)
  _report_plots_and_table(reports, tmp_path)


def _same_numbers_on_1_2_8_devices(reports):
  r1 = reports[1]
  for n in (2, 8):
    assert reports[n]["counts"] == r1["counts"]
    assert reports[n]["accuracy"] == r1["accuracy"]
    assert reports[n]["layers"].keys() == r1["layers"].keys()
    for k, s in r1["layers"].items():
      for f in ("count", "max_abs", "kurtosis", "mean_token_inf_norm",
                "median_abs", "channel_range_spread"):
        np.testing.assert_allclose(reports[n]["layers"][k][f], s[f], rtol=1e-5,
                                   err_msg=f"{n} devices {k} {f}")
    assert reports[n]["devices"]["count"] == n


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
  path = ev.write_report(r, str(tmp_path))
  with open(path) as f:
    loaded = json.load(f)
  assert loaded["accuracy"]["float"] == r["accuracy"]["float"]
  assert set(os.listdir(tmp_path / "plots")) == {
      "accuracy_vs_bits.png", "activations.png", "sigma_max.png"}
  table = ev.format_table(r)
  assert "W4A4-static" in table and f"{100 * r['accuracy']['float']:.2f}" in table


def test_pad_batch_and_errors(setup):
  model, variables, x, y = setup
  b = ev._pad_batch({"image": x[:3], "label": y[:3]}, 8)
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


def test_cli_end_to_end_npz(tmp_path, capsys):
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
  report = ev.main(["--config", cfg, "--workdir", str(workdir),
                    "--config.evaluate.calib_batches=1"])
  out = capsys.readouterr().out
  assert "W8A8" in out and "top-1" in out
  saved = json.load(open(workdir / "report.json"))
  assert saved["counts"]["float"]["total"] == 21  # 3 batches of 8, last padded
  assert saved["checkpoint"]["kind"] == "npz"
  assert saved["checkpoint"]["num_params"] == sum(
      np.size(p) for p in jax.tree.leaves(params))
  assert report["data"]["split"] == "test[:21]"
  # the same params as an orbax training checkpoint (checkpoint='' -> workdir)
  from s2d_jax import checkpointing
  orbax_dir = tmp_path / "run"
  checkpointing.Checkpointer(str(orbax_dir)).save(7, params, {})
  rep2 = ev.main(["--config", _write_config(tmp_path, "", data_dir, pcdr=0),
                  "--workdir", str(orbax_dir), "--config.evaluate.settings=float"])
  assert rep2["checkpoint"]["kind"] == "orbax"
  assert rep2["counts"]["float"] == report["counts"]["float"]
  assert "pcdr" not in rep2 and len(report["pcdr"]) > 0
  assert rep2["checkpoint"]["params_sha256"] == report["checkpoint"]["params_sha256"]
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
  assert r["counts"]["float"] == {"correct": 7, "total": 12}
  qz = jax.jit(qm.quantized_apply(lambda v, x: model.apply(v, x, None)[0], "W4A4"))(
      {"params": params}, x)
  assert r["counts"]["W4A4"]["correct"] == int(((np.asarray(qz) @ emb.T).argmax(-1)
                                                 == y).sum())
  assert not np.allclose(np.asarray(qz), zimg)  # the image tower was quantized
