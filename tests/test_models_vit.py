"""Tests for s2d_jax.models.vit: big_vision parameter layout and numerics.

The numpy functions at the top are an independent forward pass (no flax) used as the
reference here and in the text / two-towers tests.
"""

import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2d_jax.models import vit

# ----------------------------------------------------------------------------------
# Independent numpy reference forward pass (float64).


def np_layernorm(x, p, eps=1e-6):
  x = np.asarray(x, np.float64)
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def np_gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_dense(x, p):
  return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def np_mha(xq, xkv, p):
  """Multi-head attention with flax's parameter layout, kernels (D, H, hd) / (H, hd, D)."""
  f = lambda x, q: (np.einsum("bld,dhk->blhk", x, np.asarray(q["kernel"], np.float64))
                    + np.asarray(q["bias"], np.float64))
  q, k, v = f(xq, p["query"]), f(xkv, p["key"]), f(xkv, p["value"])
  logits = np.einsum("bqhk,bshk->bhqs", q / np.sqrt(q.shape[-1]), k)
  logits -= logits.max(-1, keepdims=True)
  a = np.exp(logits)
  a /= a.sum(-1, keepdims=True)
  o = np.einsum("bhqs,bshk->bqhk", a, v)
  return (np.einsum("bqhk,hkd->bqd", o, np.asarray(p["out"]["kernel"], np.float64))
          + np.asarray(p["out"]["bias"], np.float64))


def np_mlp(x, p):
  return np_dense(np_gelu_tanh(np_dense(x, p["Dense_0"])), p["Dense_1"])


def np_block(x, p):
  y = np_layernorm(x, p["LayerNorm_0"])
  x = x + np_mha(y, y, p["MultiHeadDotProductAttention_0"])
  y = np_layernorm(x, p["LayerNorm_1"])
  return x + np_mlp(y, p["MlpBlock_0"])


def np_encoder(x, p):
  """Loop-layout encoder: blocks encoderblock_0.. then encoder_norm."""
  depth = len([k for k in p if k.startswith("encoderblock_")])
  for i in range(depth):
    x = np_block(x, p[f"encoderblock_{i}"])
  return np_layernorm(x, p["encoder_norm"])


def np_map_head(x, p):
  probe = np.tile(np.asarray(p["probe"], np.float64), [x.shape[0], 1, 1])
  a = np_mha(probe, x, p["MultiHeadDotProductAttention_0"])
  return (a + np_mlp(np_layernorm(a, p["LayerNorm_0"]), p["MlpBlock_0"]))[:, 0]


def np_vit(images, p, patch, pool_type="map"):
  """Whole ViT (learned posemb, loop layout) in numpy."""
  x = np.asarray(images, np.float64)
  b, hh, ww, c = x.shape
  gh, gw = hh // patch, ww // patch
  x = x[:, :gh * patch, :gw * patch]
  x = x.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, gh * gw, patch * patch * c)  # (kh, kw, c) order, like the conv kernel
  k = np.asarray(p["embedding"]["kernel"], np.float64)
  x = x @ k.reshape(-1, k.shape[-1]) + np.asarray(p["embedding"]["bias"])
  x = x + np.asarray(p["pos_embedding"], np.float64)
  if pool_type == "tok":
    x = np.concatenate([np.tile(np.asarray(p["cls"], np.float64), [b, 1, 1]), x], 1)
  x = np_encoder(x, p["Transformer"])
  if pool_type == "map":
    x = np_map_head(x, p["MAPHead_0"])
  elif pool_type == "gap":
    x = x.mean(1)
  elif pool_type in ("tok", "0"):
    x = x[:, 0]
  if "head" in p:
    x = np_dense(x, p["head"])
  return x


def to_scan(p_loop):
  """Stack encoderblock_i -> encoderblock with a leading layer axis (independent of
  s2d_jax.models.checkpoint)."""
  p = flax.core.unfreeze(jax.tree.map(np.asarray, p_loop))
  t = p["Transformer"]
  depth = len([k for k in t if k.startswith("encoderblock_")])
  t["encoderblock"] = jax.tree.map(lambda *a: np.stack(a),
                                   *[t.pop(f"encoderblock_{i}") for i in range(depth)])
  return p


TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=(8, 8))


def _init_some(model, x, pick, seed=0):
  """Selected leaves of model.init (XLA drops the rest: a much smaller compile)."""
  return jax.jit(lambda r: pick(model.init(r, x)["params"]))(jax.random.PRNGKey(seed))


def _shapes(model, *args):
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)["params"]


def _apply(model, params, *args, **kw):
  """jit-compiled apply (eager flax apply is slow on the shared CPU)."""
  return jax.jit(lambda p, *a: model.apply({"params": p}, *a, **kw))(params, *args)


def _images(b=2, res=32, seed=1):
  return jax.random.uniform(jax.random.PRNGKey(seed), (b, res, res, 3), minval=-1, maxval=1)


def _randomize(params, seed=3, scale=0.3):
  """Every leaf ~ N(0, scale^2) (numpy RNG: no per-shape JAX compiles). Zero-init
  heads and unit LayerNorm scales would hide bugs; random values do not."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda l: jnp.asarray((scale * rng.standard_normal(l.shape)).astype(l.dtype)),
      params)


def _rand_params(model, *args, seed=3, scale=0.3):
  """Random params of the right shapes, without running (or compiling) model.init."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)["params"]
  return _randomize(shapes, seed, scale)


# ----------------------------------------------------------------------------------


def test_decode_variant_table_and_patch():
  assert vit.decode_variant("B/16") == dict(width=768, depth=12, mlp_dim=3072,
                                            num_heads=12, patch_size=(16, 16))
  assert vit.decode_variant("So400m/14")["mlp_dim"] == 4304
  assert vit.decode_variant("g-opt/16") == dict(width=1536, depth=40, mlp_dim=6144,
                                                num_heads=16, patch_size=(16, 16))
  assert vit.decode_variant("mu")["width"] == 32
  assert "patch_size" not in vit.decode_variant("L")
  assert vit.decode_variant(None) == {}
  assert set(vit.VARIANTS) >= {"mu", "Ti", "S", "M", "B", "L", "So400m", "H", "g",
                               "g-opt", "G", "e"}
  for name, dims in vit.VARIANTS.items():
    assert vit.variant_name(*dims) == name
    assert dims[0] % dims[3] == 0, name  # heads divide width
  assert vit.variant_name(33, 1, 1, 1) is None


@pytest.mark.parametrize("bad,msg", [("Q/16", "Unknown ViT variant 'Q'"),
                                     ("B/x", "Bad patch size 'x'"),
                                     ("B/0", "Bad patch size"), (16, "string")])
def test_decode_variant_errors(bad, msg):
  with pytest.raises(ValueError, match=msg):
    vit.decode_variant(bad)


def test_model_kw_override_variant():
  m = vit.Model(10, variant="B/16", depth=3, pool_type="map")
  assert (m.width, m.depth, m.patch_size, m.num_classes) == (768, 3, (16, 16), 10)


def test_param_tree_names_loop_and_scan():
  x = _images()
  m = vit.Model(5, **TINY, pool_type="map")
  p = _shapes(m, x)
  assert set(p) == {"embedding", "pos_embedding", "Transformer", "MAPHead_0", "head"}
  assert set(p["Transformer"]) == {"encoderblock_0", "encoderblock_1", "encoder_norm"}
  blk = p["Transformer"]["encoderblock_0"]
  assert set(blk) == {"LayerNorm_0", "LayerNorm_1", "MultiHeadDotProductAttention_0",
                      "MlpBlock_0"}
  assert blk["MultiHeadDotProductAttention_0"]["query"]["kernel"].shape == (32, 4, 8)
  assert blk["MultiHeadDotProductAttention_0"]["out"]["kernel"].shape == (4, 8, 32)
  assert blk["MlpBlock_0"]["Dense_0"]["kernel"].shape == (32, 64)
  assert p["embedding"]["kernel"].shape == (8, 8, 3, 32)
  assert p["pos_embedding"].shape == (1, 16, 32)
  assert p["MAPHead_0"]["probe"].shape == (1, 1, 32)
  head = _init_some(m, x, lambda q: q["head"])
  np.testing.assert_array_equal(head["kernel"], 0)  # head_zeroinit
  np.testing.assert_array_equal(head["bias"], 0)

  ps = _shapes(vit.Model(5, **TINY, pool_type="map", scan=True), x)
  assert set(ps["Transformer"]) == {"encoderblock", "encoder_norm"}
  assert (ps["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"].shape
          == (2, 32, 64))


def test_init_distributions_match_big_vision():
  """posemb ~ N(0, 1/width), MLP biases ~ N(0, 1e-6^2), xavier kernels, zero cls."""
  m = vit.Model(None, width=64, depth=1, mlp_dim=128, num_heads=4, patch_size=(4, 4),
                pool_type="tok")
  p = _init_some(m, _images(res=64), lambda q: {
      "pos_embedding": q["pos_embedding"], "cls": q["cls"],
      "Transformer": {"encoderblock_0": q["Transformer"]["encoderblock_0"]}})
  pe = np.asarray(p["pos_embedding"])
  assert pe.shape == (1, 256, 64)
  assert abs(pe.std() - 1 / 8) < 0.01
  b = np.asarray(p["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["bias"])
  assert 0 < np.abs(b).max() < 1e-5
  k = np.asarray(p["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"])
  assert np.abs(k).max() <= math.sqrt(6 / (64 + 128)) + 1e-6  # xavier_uniform bound
  np.testing.assert_array_equal(p["cls"], 0)


def test_one_block_matches_numpy():
  blk = vit.Encoder1DBlock(mlp_dim=48, num_heads=3)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 24))
  p = _rand_params(blk, x)
  y, out = _apply(blk, p, x)
  np.testing.assert_allclose(y, np_block(np.asarray(x), p), rtol=1e-5, atol=1e-5)
  assert set(out) == {"sa", "+sa", "mlp", "+mlp"}
  np.testing.assert_allclose(out["+mlp"], y)


@pytest.mark.parametrize("pool_type", ["map", "gap", "tok", "0"])
def test_full_vit_matches_numpy(pool_type):
  m = vit.Model(7, **TINY, pool_type=pool_type)
  x = _images(res=35)  # 35 // 8 = 4 patches: VALID padding drops the remainder
  p = _rand_params(m, x)
  logits, out = jax.jit(m.apply)({"params": p}, x)
  assert logits.shape == (2, 7)
  np.testing.assert_allclose(logits, np_vit(x, p, 8, pool_type), rtol=2e-4, atol=2e-4)
  assert out["stem"].shape == (2, 4, 4, 32)
  n_tok = 17 if pool_type == "tok" else 16
  assert out["encoded"].shape == (2, n_tok, 32)
  assert out["pre_logits_2d"].shape == (2, 4, 4, 32)
  assert out["logits_2d"].shape == (2, 4, 4, 7)
  np.testing.assert_allclose(out["logits"], logits)
  assert set(out["encoder"]) == {"block00", "block01", "pre_ln"}


def test_loop_and_scan_give_identical_outputs():
  x = _images()
  m_loop = vit.Model(6, **TINY, pool_type="map")
  m_scan = vit.Model(6, **TINY, pool_type="map", scan=True)
  p = _rand_params(m_loop, x)
  y1, o1 = _apply(m_loop, p, x)
  y2, o2 = _apply(m_scan, to_scan(p), x)
  np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
  for i in range(2):
    np.testing.assert_allclose(o1["encoder"][f"block{i:02d}"]["+mlp"],
                               o2["encoder"][f"block{i:02d}"]["+mlp"], rtol=1e-5, atol=1e-5)
  assert "pre_ln" not in o2["encoder"]  # as in big_vision


def test_scan_stacks_sown_intermediates_per_layer():
  """Values sown inside scanned blocks come out with a leading layer axis."""
  x = _images()
  m = vit.Model(None, **TINY, pool_type="gap", scan=True)
  p = _rand_params(m, x)

  def sow_dense_inputs(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
      context.module.sow("intermediates", "dense_in", args[0])
    return next_fun(*args, **kwargs)

  def run(p, x):
    with nn.intercept_methods(sow_dense_inputs):
      return m.apply({"params": p}, x, mutable=["intermediates"])

  _, state = jax.jit(run)(p, x)
  inter = state["intermediates"]["Transformer"]["encoderblock"]["MlpBlock_0"]
  (d0,) = inter["Dense_0"]["dense_in"]
  assert d0.shape == (2, 2, 16, 32)  # (depth, B, N, D)
  # Layer 1's input must differ from layer 0's.
  assert not np.allclose(d0[0], d0[1])


def test_sincos2d_posemb_matches_formula():
  pe = np.asarray(vit.posemb_sincos_2d(3, 5, 8))
  assert pe.shape == (1, 15, 8)
  omega = 1.0 / 10_000 ** (np.arange(2) / 1.0)
  for m in range(15):
    yy, xx = divmod(m, 5)
    ref = np.concatenate([np.sin(xx * omega), np.cos(xx * omega),
                          np.sin(yy * omega), np.cos(yy * omega)])
    np.testing.assert_allclose(pe[0, m], ref, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="width % 4"):
    vit.posemb_sincos_2d(2, 2, 6)
  m = vit.Model(None, **TINY, posemb="sincos2d", pool_type="gap")
  p = _rand_params(m, _images())
  assert "pos_embedding" not in p
  _, out = _apply(m, p, _images())
  np.testing.assert_allclose(out["with_posemb"] - out["stem"].reshape(2, 16, 32),
                             np.broadcast_to(vit.posemb_sincos_2d(4, 4, 32), (2, 16, 32)),
                             atol=1e-5)


def test_rep_size_and_none_pool():
  m = vit.Model(3, **TINY, pool_type="none", rep_size=16)
  x = _images()
  p = _rand_params(m, x)
  y, out = _apply(m, p, x)
  assert p["pre_logits"]["kernel"].shape == (32, 16)
  assert y.shape == (2, 16, 3)  # no pooling: per-token logits
  assert out["pre_logits"].shape == (2, 16, 16)
  enc = np.asarray(out["encoded"], np.float64)
  ref = np.tanh(np_dense(enc, p["pre_logits"]))
  np.testing.assert_allclose(out["pre_logits"], ref, rtol=1e-5, atol=1e-5)
  # rep_size=True means width.
  p2 = _shapes(vit.Model(None, **TINY, pool_type="gap", rep_size=True), x)
  assert p2["pre_logits"]["kernel"].shape == (32, 32)


def test_bad_options_raise():
  x = _images()
  with pytest.raises(ValueError, match="Unknown pool type: 'avg'"):
    _shapes(vit.Model(None, **TINY, pool_type="avg"), x)
  with pytest.raises(ValueError, match="Unknown posemb type: 'rope'"):
    _shapes(vit.Model(None, **TINY, posemb="rope"), x)
  with pytest.raises(ValueError, match="remat_policy 'fast'"):
    _shapes(vit.Model(None, **TINY, scan=True, remat_policy="fast"), x)
  with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
    _shapes(vit.Model(None, **TINY), x[0])


def test_dtype_mm_bfloat16_matmuls():
  x = _images()
  m32 = vit.Model(None, **TINY, pool_type="map")
  m16 = vit.Model(None, **TINY, pool_type="map", dtype_mm="bfloat16")
  p = _rand_params(m32, x, scale=0.1)
  y32, _ = _apply(m32, p, x)
  y16, o16 = _apply(m16, p, x)
  assert o16["stem"].dtype == jnp.bfloat16
  assert o16["encoder"]["block00"]["sa"].dtype == jnp.bfloat16
  assert y16.dtype == jnp.float32  # the MAP head runs in float32, as in big_vision
  assert not np.array_equal(y16, y32)
  # bf16 operands (unit roundoff u = 2**-8), float32 accumulation and head: the
  # rounding errors average out over the dot products, the output stays within one
  # u of its scale (measured 0.17 u); a wrong dtype or rounding would not.
  np.testing.assert_allclose(y16, y32, rtol=0, atol=2 ** -8 * np.abs(y32).max())


def test_dropout_train_mode_scan_and_loop():
  x = _images()
  m = vit.Model(None, **TINY, pool_type="gap", dropout=0.5)
  ms = vit.Model(None, **TINY, pool_type="gap", dropout=0.5, scan=True)
  p = _rand_params(m, x)
  y_eval, _ = _apply(m, p, x)  # deterministic by default
  for model, params in ((m, p), (ms, to_scan(p))):
    y_tr, _ = _apply(model, params, x, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
    assert not np.allclose(y_tr, y_eval)


def _count(shapes):
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


def vit_param_count(width, depth, mlp, patch, n_tok, *, map_head, num_classes=0,
                    cls=False):
  """Closed-form parameter count of a big_vision ViT."""
  block = 2 * 2 * width + 4 * (width * width + width) + 2 * width * mlp + mlp + width
  n = patch * patch * 3 * width + width + n_tok * width + depth * block + 2 * width
  if map_head:
    n += width + 4 * (width * width + width) + 2 * width + 2 * width * mlp + mlp + width
  if cls:
    n += width
  if num_classes:
    n += width * num_classes + num_classes
  return n


@pytest.mark.parametrize("variant,res,pool,ncls,known", [
    # ViT-B/16 ImageNet classifier (cls token): 86.6M in the ViT paper / timm.
    ("B/16", 224, "tok", 1000, 86.57e6),
    # ViT-L/16 classifier: 304.3M.
    ("L/16", 224, "tok", 1000, 304.33e6),
    # SigLIP So400m/14 image tower with MAP head, no head: ~428M ("400M" shape-opt).
    ("So400m/14", 224, "map", None, 428.2e6),
    # SigLIP2 g-opt/16 image tower: ~1.1B.
    ("g-opt/16", 256, "map", None, 1.16e9),
])
def test_full_size_param_shapes_eval_shape(variant, res, pool, ncls, known):
  m = vit.Model(ncls, variant=variant, pool_type=pool, scan=True)
  shapes = jax.eval_shape(m.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32))["params"]
  dims = vit.decode_variant(variant)
  width, depth, mlp = dims["width"], dims["depth"], dims["mlp_dim"]
  patch = dims["patch_size"][0]
  n_tok = (res // patch) ** 2
  blk = shapes["Transformer"]["encoderblock"]
  assert blk["MultiHeadDotProductAttention_0"]["query"]["kernel"].shape == (
      depth, width, dims["num_heads"], width // dims["num_heads"])
  assert blk["MlpBlock_0"]["Dense_1"]["kernel"].shape == (depth, mlp, width)
  assert shapes["pos_embedding"].shape == (1, n_tok, width)
  n = _count(shapes)
  assert n == vit_param_count(width, depth, mlp, patch, n_tok, map_head=pool == "map",
                              num_classes=ncls or 0, cls=pool == "tok")
  assert abs(n - known) / known < 0.01, (variant, n)


def test_load_from_npz_converts_layout_resamples_posemb_and_keeps_dont_load(tmp_path):
  """vit.load (big_vision API): the image tower of a two-towers npz, loop layout at
  another resolution, into a scan model; the head keeps the init values."""
  from s2d_jax.models import checkpoint as ckpt_lib
  from s2d_jax.models import siglip
  kw = dict(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=(4, 4),
            pool_type="map")
  src = vit.Model(5, scan=False, **kw)
  p_src = jax.device_get(src.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 3)))["params"])
  npz = str(tmp_path / "towers.npz")
  siglip.save(npz, {"img": p_src, "t": np.zeros((1,), np.float32)})
  dst = vit.Model(3, scan=True, **kw)
  init = jax.device_get(dst.init(jax.random.PRNGKey(2), jnp.zeros((1, 16, 16, 3)))["params"])
  got = vit.load(init, npz, {"scan": True, **kw}, dont_load=("head/.*",))
  assert jax.tree.structure(got) == jax.tree.structure(init)
  np.testing.assert_array_equal(got["head"]["kernel"], init["head"]["kernel"])
  stacked = ckpt_lib.pyloop_to_scan(p_src["Transformer"])["encoderblock"]
  np.testing.assert_array_equal(
      got["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"],
      stacked["MlpBlock_0"]["Dense_0"]["kernel"])
  np.testing.assert_allclose(got["pos_embedding"], ckpt_lib.resample_posemb(
      p_src["pos_embedding"], init["pos_embedding"].shape), rtol=1e-6)
  assert got["pos_embedding"].shape == (1, 16, 16)
  # without dont_load the checkpoint head must fit; a model of another size is named
  abstract = jax.eval_shape(dst.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match="shape mismatch for 'head/bias'"):
    vit.load(abstract["params"], npz, {"scan": True})
  wide = vit.Model(3, scan=True, **{**kw, "mlp_dim": 48})
  winit = jax.eval_shape(wide.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match="shape mismatch for 'MAPHead_0/MlpBlock_0"):
    vit.load(winit["params"], npz, {"scan": True}, dont_load=("head/.*",))
