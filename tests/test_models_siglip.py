"""Tests for s2d_jax.models.siglip: load/save big_vision SigLIP checkpoints.

The checkpoints are written here with plain `np.savez` (own flattening, own bf16
handling), in big_vision's layout, for several tiny architectures.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from s2d_jax.models import checkpoint as ck
from s2d_jax.models import siglip, two_towers, vit
from test_models_text import np_text
from test_models_vit import _apply as _apply_kw, _rand_params, np_vit

CheckpointError = ck.CheckpointError


def _np_flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_np_flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = np.asarray(v)
  return out


def _stack_blocks(tree):
  """Loop -> scan for every encoder, written independently of checkpoint.py."""
  if not isinstance(tree, dict):
    return tree
  tree = {k: _stack_blocks(v) for k, v in tree.items()}
  blocks = sorted((k for k in tree if k.startswith("encoderblock_")),
                  key=lambda k: int(k.split("_")[1]))
  if blocks:
    tree["encoderblock"] = jax.tree.map(lambda *a: np.stack(a), *[tree.pop(b) for b in blocks])
  return tree


def write_bv(path, params, *, prefix="params/", scan=False, bf16=False):
  params = jax.tree.map(np.asarray, params)
  if scan:
    params = _stack_blocks(params)
  flat = _np_flat(params, prefix)
  if bf16:
    flat = {k: v.astype(ml_dtypes.bfloat16).view("V2") for k, v in flat.items()}
  np.savez(path, **flat)
  return flat


# name -> (two_towers kwargs, image res, text len, expected inferred image cfg)
ARCHS = {
    # the real 'mu' variant, SigLIP-style: MAP image pooling, text head, bias.
    "mu": (dict(image=dict(variant="mu/8", pool_type="map"),
                text=dict(variant="mu", vocab_size=64), out_dim=(None, 32),
                bias_init=-10.0, temperature_init=10.0), 16, 8,
           dict(variant="mu/8", pool_type="map")),
    # custom dims, patch 4, image head, text MAP pooling, no bias (CLIP-style).
    "custom": (dict(image=dict(width=24, depth=2, mlp_dim=40, num_heads=3,
                               patch_size=(4, 4), pool_type="gap"),
                    text=dict(width=16, depth=2, mlp_dim=32, num_heads=2,
                              vocab_size=40, pool_type="map"),
                    out_dim=(20, 20), temperature_init=1.0), 12, 5,
               dict(width=24, depth=2, mlp_dim=40, num_heads=3, patch_size=(4, 4),
                    pool_type="gap")),
    # cls-token image tower
    "tok": (dict(image=dict(width=16, depth=1, mlp_dim=32, num_heads=2,
                            patch_size=(8, 8), pool_type="tok"),
                 text=dict(width=16, depth=1, mlp_dim=32, num_heads=2, vocab_size=30),
                 out_dim=(16, 16), bias_init=0.5), 24, 6,
            dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=(8, 8),
                 pool_type="tok")),
}


def _make(arch, seed=0):
  kw, res, seq, _ = ARCHS[arch]
  model = two_towers.Model(**kw)
  img = jax.random.uniform(jax.random.PRNGKey(seed + 1), (2, res, res, 3), minval=-1,
                           maxval=1)
  tok = jax.random.randint(jax.random.PRNGKey(seed + 2), (2, seq), 0,
                           kw["text"]["vocab_size"])
  params = _rand_params(model, img, tok, seed=seed + 3)
  return model, params, img, tok


def _np_ref(arch, params, img, tok):
  """Independent numpy forward pass of the two towers (L2-normalised embeddings)."""
  kw = ARCHS[arch][0]
  to64 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float64), t)
  zi = np_vit(img, to64(params["img"]), kw["image"].get("patch_size", (8, 8))[0],
              kw["image"]["pool_type"])
  zt = np_text(tok, to64(params["txt"]), kw["text"].get("pool_type", "last"))
  return (zi / np.linalg.norm(zi, axis=1, keepdims=True),
          zt / np.linalg.norm(zt, axis=1, keepdims=True))


def _apply(model, params, img=None, tok=None):
  return _apply_kw(model, params, img, tok)


@pytest.mark.parametrize("arch,layout,prefix,bf16", [
    ("mu", "loop", "params/", False),
    ("custom", "scan", "", False),
    ("tok", "loop", "params/", True),
])
def test_load_infers_config_and_reproduces_outputs(tmp_path, arch, layout, prefix, bf16):
  model, params, img, tok = _make(arch)
  path = str(tmp_path / "ckpt.npz")
  written = write_bv(path, params, prefix=prefix, scan=layout == "scan", bf16=bf16)
  if bf16:  # the reference uses the same (rounded) weights
    params = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), params)

  m2, p2 = siglip.load(path)
  cfg, info = siglip.inspect(path)  # headers only
  assert two_towers.Model(**cfg) == m2
  assert info["img"]["res"] == ARCHS[arch][1] and info["txt"]["seq_len"] == ARCHS[arch][2]
  assert info["txt"]["vocab_size"] == ARCHS[arch][0]["text"]["vocab_size"]
  want_img = {**ARCHS[arch][3], "scan": layout == "scan"}
  assert m2.image == want_img
  assert m2.text["vocab_size"] == ARCHS[arch][0]["text"]["vocab_size"]
  assert m2.text["pool_type"] == ARCHS[arch][0]["text"].get("pool_type", "last")
  assert tuple(m2.out_dim) == tuple(ARCHS[arch][0]["out_dim"])
  assert (m2.bias_init is None) == (ARCHS[arch][0].get("bias_init") is None)
  if bf16:
    assert p2["img"]["embedding"]["kernel"].dtype == jnp.bfloat16

  # Same outputs as the original model, in the file's layout.
  ref = _np_ref(arch, params, img, tok)
  got = _apply(m2, p2, img, tok)
  if bf16:
    # bf16 weights keep parts of the model in bf16. Outputs are unit-norm, so one
    # bf16 unit roundoff (2**-8) of the output scale bounds the error (measured:
    # at most 0.05 of it, the reference using the same rounded weights); t = exp(t')
    # comes back in bf16: its rounding (<= 2**-8 relative) plus exp's own error.
    tol, ttol = dict(rtol=0, atol=2 ** -8), dict(rtol=2 * 2 ** -8)
  else:
    tol, ttol = dict(rtol=2e-4, atol=2e-5), dict(rtol=2e-4)
  np.testing.assert_allclose(got[0], ref[0], **tol)
  np.testing.assert_allclose(got[1], ref[1], **tol)
  np.testing.assert_allclose(np.asarray(got[2]["t"], np.float32),
                             np.exp(np.asarray(params["t"], np.float32)), **ttol)

  # save -> same names (params/ prefix), bitwise-identical arrays; load again.
  out_path = str(tmp_path / "saved.npz")
  siglip.save(out_path, p2)
  raw = np.load(out_path)
  assert set(raw.files) == {"params/" + k[len(prefix):] for k in written}
  for k, v in written.items():
    np.testing.assert_array_equal(raw["params/" + k[len(prefix):]].view(v.dtype), v,
                                  err_msg=k)
  m3, p3 = siglip.load(out_path)
  assert m3 == m2
  jax.tree.map(np.testing.assert_array_equal, p3, p2)


def test_layout_override_and_resolution_resampling(tmp_path):
  model, params, img, tok = _make("mu")
  path = str(tmp_path / "c.npz")
  write_bv(path, params)
  ref = _np_ref("mu", params, img, tok)

  ms, ps = siglip.load(path, scan=True)
  assert ms.image["scan"] and ms.text["scan"]
  assert "encoderblock" in ps["img"]["Transformer"] and "encoderblock" in ps["txt"]["Encoder_0"]
  got = _apply(ms, ps, img, tok)
  np.testing.assert_allclose(got[0], ref[0], rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(got[1], ref[1], rtol=2e-4, atol=2e-5)

  mr, pr = siglip.load(path, res=40)  # 2x2 grid -> 5x5 grid
  want = ck.resample_posemb(np.asarray(params["img"]["pos_embedding"]), (5, 5))
  np.testing.assert_array_equal(pr["img"]["pos_embedding"], want)
  zimg, _, _ = _apply(mr, pr, jnp.zeros((1, 40, 40, 3)))
  assert zimg.shape == (1, 32)


def test_single_tower_dont_load_dtype_and_overrides(tmp_path):
  model, params, img, tok = _make("mu")
  path = str(tmp_path / "c.npz")
  write_bv(path, params)
  ref = _np_ref("mu", params, img, tok)

  mi, pi = siglip.load(path, towers=("img",))
  assert set(pi) == {"img", "t", "b"} and mi.text is None
  zimg, ztxt, _ = _apply(mi, pi, img)
  assert ztxt is None
  np.testing.assert_allclose(zimg, ref[0], rtol=2e-4, atol=2e-5)

  mt, pt = siglip.load(path, towers=("txt",))
  assert set(pt) == {"txt", "t", "b"}
  np.testing.assert_allclose(_apply(mt, pt, None, tok)[1], ref[1],
                             rtol=2e-4, atol=2e-5)

  md, pd = siglip.load(path, dont_load=["txt/head/.*"], seed=7)
  head = jax.jit(lambda r: md.init(r, jnp.zeros((1, 16, 16, 3)), jnp.zeros(
      (1, 8), jnp.int32))["params"]["txt"]["head"])(jax.random.PRNGKey(7))
  np.testing.assert_array_equal(pd["txt"]["head"]["kernel"], head["kernel"])
  assert not np.array_equal(pd["txt"]["head"]["kernel"], params["txt"]["head"]["kernel"])
  np.testing.assert_array_equal(pd["txt"]["Embed_0"]["embedding"],
                                params["txt"]["Embed_0"]["embedding"])

  _, p16 = siglip.load(path, param_dtype="bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))

  mm, _ = siglip.load(path, dtype_mm="bfloat16", remat_policy="nothing_saveable",
                      text=dict(pool_type="first"), bias_init=-5.0)
  assert mm.image["dtype_mm"] == mm.text["dtype_mm"] == "bfloat16"
  assert mm.text["pool_type"] == "first" and mm.bias_init == -5.0

  with pytest.raises(TypeError, match="Unknown override.*'resolution'"):
    siglip.load(path, resolution=32)
  with pytest.raises(ValueError, match="towers must be"):
    siglip.load(path, towers=("image",))


def test_error_paths(tmp_path):
  model, params, img, tok = _make("mu")
  path = str(tmp_path / "c.npz")
  flat = write_bv(path, params)

  # missing key
  k_missing = "params/txt/Encoder_0/encoderblock_0/MlpBlock_0/Dense_1/bias"
  np.savez(tmp_path / "missing.npz", **{k: v for k, v in flat.items() if k != k_missing})
  with pytest.raises(CheckpointError, match="missing key.*txt/Encoder_0/encoderblock_0/"
                     "MlpBlock_0/Dense_1/bias"):
    siglip.load(str(tmp_path / "missing.npz"))
  # ... which dont_load excuses
  _, p = siglip.load(str(tmp_path / "missing.npz"), dont_load=["txt/.*/Dense_1/bias"])
  assert p["txt"]["Encoder_0"]["encoderblock_0"]["MlpBlock_0"]["Dense_1"]["bias"].shape == (32,)

  # extra key
  np.savez(tmp_path / "extra.npz", **flat, **{"params/img/foo/kernel": np.zeros(3, np.float32)})
  with pytest.raises(CheckpointError, match="unexpected key.*img/foo/kernel"):
    siglip.load(str(tmp_path / "extra.npz"))

  # shape mismatch: names the key and both shapes
  with pytest.raises(CheckpointError, match=r"shape mismatch for 'img/Transformer/"
                     r"encoderblock_0/MlpBlock_0/Dense_0/kernel': checkpoint \(32, 128\) "
                     r"vs model \(32, 96\)") as e:
    siglip.load(path, image=dict(mlp_dim=96))
  assert "'img/MAPHead_0/MlpBlock_0/Dense_0/bias': checkpoint (128,) vs model (96,)" in str(
      e.value)  # every mismatch is listed

  # wrong dtype
  bad = dict(flat)
  bad["params/img/embedding/bias"] = np.zeros(32, np.int32)
  np.savez(tmp_path / "dtype.npz", **bad)
  with pytest.raises(CheckpointError, match="img/embedding/bias.*int32"):
    siglip.load(str(tmp_path / "dtype.npz"))

  # truncated file
  data = open(path, "rb").read()
  (tmp_path / "trunc.npz").write_bytes(data[:len(data) // 3])
  with pytest.raises(CheckpointError, match="corrupt or truncated"):
    siglip.load(str(tmp_path / "trunc.npz"))

  # structural problems
  np.savez(tmp_path / "not_tt.npz", **{"params/foo/kernel": np.zeros(2, np.float32)})
  with pytest.raises(CheckpointError, match="Not a two-towers checkpoint"):
    siglip.load(str(tmp_path / "not_tt.npz"))
  np.savez(tmp_path / "no_t.npz", **{k: v for k, v in flat.items() if k != "params/t"})
  with pytest.raises(CheckpointError, match="missing key in checkpoint: t"):
    siglip.load(str(tmp_path / "no_t.npz"))
  np.savez(tmp_path / "no_txt.npz",
           **{k: v for k, v in flat.items() if not k.startswith("params/txt/")})
  with pytest.raises(CheckpointError, match="missing key in checkpoint: txt"):
    siglip.load(str(tmp_path / "no_txt.npz"), towers=("img", "txt"))
  np.savez(tmp_path / "no_emb.npz",
           **{k: v for k, v in flat.items() if "img/embedding/kernel" not in k})
  with pytest.raises(CheckpointError, match="img/embedding/kernel"):
    siglip.load(str(tmp_path / "no_emb.npz"))
  with pytest.raises(FileNotFoundError):
    siglip.load(str(tmp_path / "nope.npz"))


def test_load_classifier_and_load_vit(tmp_path):
  model, params, img, tok = _make("custom")  # image tower has a 20-way head
  path = str(tmp_path / "c.npz")
  write_bv(path, params, scan=True)
  _, _, out = _apply(model, params, img, tok)

  mc, pc = siglip.load_classifier(path, 7)
  assert mc.num_classes == 7 and mc.pool_type == "gap" and mc.scan
  assert pc["head"]["kernel"].shape == (24, 7)
  np.testing.assert_array_equal(pc["head"]["kernel"], 0)
  np.testing.assert_array_equal(pc["head"]["bias"], 0)
  logits, o = _apply_kw(mc, pc, img)
  np.testing.assert_array_equal(logits, 0)
  np.testing.assert_allclose(o["pre_logits"], out["img/pre_logits"], rtol=1e-5, atol=1e-5)

  mc2, pc2 = siglip.load_classifier(path, 3, scan=False, res=16)
  assert not mc2.scan and pc2["pos_embedding"].shape == (1, 16, 24)
  assert "encoderblock_1" in pc2["Transformer"]
  with pytest.raises(ValueError, match="num_classes must be a positive int"):
    siglip.load_classifier(path, 0)

  mv, pv = siglip.load_vit(path)
  assert mv.num_classes == 20
  np.testing.assert_array_equal(pv["head"]["kernel"], params["img"]["head"]["kernel"])
  # A saved classifier (plain ViT tree) loads back as is.
  siglip.save(str(tmp_path / "cls.npz"), pc)
  mv2, pv2 = siglip.load_vit(str(tmp_path / "cls.npz"))
  assert mv2.num_classes == 7
  jax.tree.map(np.testing.assert_array_equal, pv2, pc)
  with pytest.raises(CheckpointError, match="No image tower"):
    siglip.load_vit({"txt": params["txt"]})
  with pytest.raises(CheckpointError, match="plain ViT checkpoint: use load_vit"):
    siglip.load(str(tmp_path / "cls.npz"))


@pytest.mark.parametrize("image,txt_variant,res,vocab,seq,emb,millions", [
    ("B/16", "B", 224, 32_000, 64, 768, 203.2),         # SigLIP B/16 224 (en)
    ("So400m/14", "So400m", 224, 32_000, 16, 1152, 877.4),  # SigLIP So400m/14 224
    ("B/16", "B", 256, 256_000, 64, 768, 375.2),        # SigLIP2 B/16 256 (Gemma vocab)
    ("g-opt/16", "So400m", 256, 256_000, 64, 1536, 1871.4),  # SigLIP2 g-opt/16 256
])
def test_full_size_shapes_and_inference(image, txt_variant, res, vocab, seq, emb,
                                        millions):
  """Full-size configs via eval_shape (no memory): counts match the published sizes
  (e.g. HF model cards: 203M, 878M@384, 375M, 1.87B) and shapes infer back."""
  m = two_towers.Model(image=dict(variant=image, pool_type="map", scan=True),
                       text=dict(variant=txt_variant, vocab_size=vocab, scan=True),
                       out_dim=(None, emb), bias_init=-10.0, temperature_init=10.0)
  s = jax.eval_shape(m.init, jax.random.PRNGKey(0),
                     jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32),
                     jax.ShapeDtypeStruct((1, seq), jnp.int32))["params"]
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s))
  assert abs(n / 1e6 - millions) < 0.1, n
  cfg, info = siglip.infer_config(s)
  assert cfg["image"] == dict(variant=image, scan=True, pool_type="map")
  assert cfg["text"] == dict(variant=txt_variant, vocab_size=vocab, scan=True,
                             pool_type="last")
  assert cfg["out_dim"] == (None, emb) and cfg["bias_init"] == -10.0
  assert info["img"]["res"] == res and info["txt"]["seq_len"] == seq
  assert vit.decode_variant(image)["width"] == s["img"]["embedding"]["kernel"].shape[-1]


def test_checkpoint_names_resolve_without_download(monkeypatch, tmp_path):
  seen = []

  def fake_load_params(path, **unused_kw):
    seen.append(path)
    raise FileNotFoundError(path)

  monkeypatch.setattr(ck, "load_params", fake_load_params)
  with pytest.raises(FileNotFoundError):
    siglip.load("SigLIP2 g-opt/16 384")
  with pytest.raises(FileNotFoundError):
    siglip.load_classifier("SigLIP So400m/14 224", 10)
  assert seen == ["gs://big_vision/siglip2/siglip2_g-opt16_384.npz",
                  "gs://big_vision/siglip/webli_en_so400m_224_57633886.npz"]
  assert siglip.resolve("/local/x.npz") == "/local/x.npz"
  # every SigLIP2 name encodes variant and resolution the way big_vision's files do
  for name, path in siglip.CHECKPOINTS.items():
    fam, variant, res = name.split(" ")
    if fam == "SigLIP2":
      assert path.endswith(f"{variant.lower().replace('/', '')}_{res}.npz"), name
      vit.decode_variant(variant)  # a valid variant string


def test_load_classifier_num_classes_conflict(tmp_path):
  _, params, _, _ = _make("mu")
  with pytest.raises(ValueError, match="disagree"):
    siglip.load_classifier(params, 10, num_classes=5)
  m, p = siglip.load_classifier(params, 10, num_classes=10, variant="mu/8")
  assert m.num_classes == 10 and p["head"]["kernel"].shape == (32, 10)


def test_two_towers_load_from_npz_converts_each_tower(tmp_path):
  """two_towers.load (big_vision API): loop-layout towers into a scan model."""
  from s2d_jax.models import checkpoint as ckpt_lib
  from s2d_jax.models import two_towers
  cfg = dict(image=dict(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=(4, 4),
                        pool_type="map"),
             text=dict(width=16, depth=1, mlp_dim=32, num_heads=2, vocab_size=20),
             out_dim=(None, 16), temperature_init=10.0, bias_init=-10.0)
  x, tok = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 5), jnp.int32)
  loop = two_towers.Model(**cfg)
  p = jax.device_get(loop.init(jax.random.PRNGKey(0), x, tok)["params"])
  npz = str(tmp_path / "tt.npz")
  siglip.save(npz, p)
  scan_cfg = dict(cfg, image=dict(cfg["image"], scan=True),
                  text=dict(cfg["text"], scan=True))
  model = two_towers.Model(**scan_cfg)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, tok)["params"]
  got = two_towers.load(abstract, npz, scan_cfg)
  assert jax.tree.structure(got) == jax.tree.structure(
      jax.tree.map(lambda a: 0, abstract))
  want = ckpt_lib.pyloop_to_scan(p["txt"]["Encoder_0"])["encoderblock"]
  np.testing.assert_array_equal(
      got["txt"]["Encoder_0"]["encoderblock"]["MlpBlock_0"]["Dense_1"]["kernel"],
      want["MlpBlock_0"]["Dense_1"]["kernel"])
  np.testing.assert_array_equal(got["t"], p["t"])
  z1 = jax.jit(model.apply)({"params": got}, x, tok)[0]
  z0 = jax.jit(loop.apply)({"params": p}, x, tok)[0]
  np.testing.assert_allclose(z1, z0, rtol=1e-5, atol=1e-6)


def test_loaders_refuse_nonfinite_params_unless_allowed(tmp_path):
  """Every loading path refuses NaN / Inf params naming them, and loads them (with a
  NonFiniteWarning) when allowed. On main: load_vit / load_classifier of a params
  tree were not checked and no loader took `allow_nonfinite`."""
  import warnings
  _, params, _, _ = _make("custom")
  params = jax.tree.map(np.array, params)
  params["img"]["embedding"]["kernel"][0, 0, 0, 0] = np.nan
  path = str(tmp_path / "nan.npz")
  write_bv(path, params)
  bad_key = r"img/embedding/kernel \(1 NaN, 0 Inf"
  for load in (lambda **kw: siglip.load(path, **kw),
               lambda **kw: siglip.load_vit(path, **kw),
               lambda **kw: siglip.load_vit(params, **kw),
               lambda **kw: siglip.load_classifier(path, 5, **kw),
               lambda **kw: siglip.load_classifier(params, 5, **kw)):
    with pytest.raises(ck.CheckpointError, match=r"embedding/kernel \(1 NaN, 0 Inf"):
      load()
    with pytest.warns(ck.NonFiniteWarning, match="embedding/kernel"):
      _, p = load(allow_nonfinite=True)
    emb = (p["img"] if "img" in p else p)["embedding"]["kernel"]
    assert np.isnan(np.asarray(emb)).sum() == 1
  # the big_vision-API loaders (model_init / evaluate.checkpoint npz)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  with pytest.raises(ck.CheckpointError, match=bad_key):
    two_towers.load(abstract, path, dict(ARCHS["custom"][0]))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ck.NonFiniteWarning)
    got = two_towers.load(abstract, path, dict(ARCHS["custom"][0]),
                          allow_nonfinite=True)
  assert np.isnan(got["img"]["embedding"]["kernel"][0, 0, 0, 0])
  img_abs = abstract["img"]
  with pytest.raises(ck.CheckpointError, match=r"embedding/kernel \(1 NaN"):
    vit.load(img_abs, path, dict(ARCHS["custom"][0]["image"]))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ck.NonFiniteWarning)
    got = vit.load(img_abs, path, dict(ARCHS["custom"][0]["image"]),
                   allow_nonfinite=True)
  assert np.isnan(got["embedding"]["kernel"][0, 0, 0, 0])
  # only the (dropped) head is NaN: a new classifier loads without complaint
  params["img"]["embedding"]["kernel"][0, 0, 0, 0] = 0.0
  params["img"]["head"]["bias"][:] = np.inf
  with warnings.catch_warnings():
    warnings.simplefilter("error", ck.NonFiniteWarning)
    _, pc = siglip.load_classifier(params, 5)
  assert np.isfinite(np.asarray(pc["head"]["bias"])).all()
