"""Fake quantization applied to Flax models from outside (s2d_jax/quant_model.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2d_jax import quant as q
from s2d_jax import quant_model as qm
from s2d_jax.models import vit
import ptq_fixtures  # the shared tiny-ViT helpers (tests/)

TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=(8, 8),
            pool_type="gap", head_zeroinit=False)


def _vit(scan):
  return vit.Model(10, scan=scan, **TINY)


_loop_to_scan = ptq_fixtures.loop_to_scan


@pytest.fixture(scope="module")
def tiny():
  model = _vit(False)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  return model, params, x


def test_dense_exact():
  m = nn.Dense(5)
  x = jax.random.normal(jax.random.key(0), (2, 3, 7))
  v = m.init(jax.random.key(1), x)
  got = qm.quantized_apply(m.apply, "W4A4")(v, x)  # path () is not an end
  w, b = v["params"]["kernel"], v["params"]["bias"]
  want = q.fake_quant(x, 4, axis=(0, 1)) @ q.fake_quant(w, 4, axis=-1) + b
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  tens = qm.quantized_apply(m.apply, q.get_setting(
      "W3A5", w_granularity="tensor", a_granularity="tensor", a_symmetric=False))(v, x)
  want = q.fake_quant(x, 5, symmetric=False) @ q.fake_quant(w, 3) + b
  np.testing.assert_allclose(tens, want, rtol=1e-6, atol=1e-6)


def test_dense_general_and_conv_exact():
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
  dg = nn.DenseGeneral((6,), axis=(-2, -1))  # like attention 'out' (h, hd, out)
  v = dg.init(jax.random.key(1), x)
  got = qm.quantized_apply(dg.apply, "W4A6")(v, x)
  w, b = v["params"]["kernel"], v["params"]["bias"]
  want = jnp.einsum("bthd,hdo->bto", q.fake_quant(x, 6, axis=(0, 1)),
                    q.fake_quant(w, 4, axis=2)) + b
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  conv = nn.Conv(3, (2, 2), strides=2, padding="VALID")
  v = conv.init(jax.random.key(2), x)
  got = qm.quantized_apply(conv.apply, "W4A4")(v, x)
  w, b = v["params"]["kernel"], v["params"]["bias"]
  want = jax.lax.conv_general_dilated(
      q.fake_quant(x, 4, axis=0), q.fake_quant(w, 4, axis=3), (2, 2), "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_w16a16_matches_float_and_attention(tiny):
  model, params, x = tiny
  v = {"params": params}
  f = lambda v, x: model.apply(v, x)[0]
  y = jax.jit(f)(v, x)
  for name in ("W16A16", "W16A16-attn"):
    np.testing.assert_allclose(jax.jit(qm.quantized_apply(f, name))(v, x), y,
                               atol=2e-3)
  y8 = jax.jit(qm.quantized_apply(f, "W8A8-attn"))(v, x)
  assert 0 < float(jnp.abs(y8 - y).max()) < 0.1 * float(jnp.abs(y).max())


def _rel_err(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_planted_outlier_channel():
  """A massive input channel that the layer ignores (its kernel row is 0, like
  SigLIP's no-op outlier dimensions) leaves the float output unchanged but
  inflates every token's quantization step: W8A8 stays close, W4A4 breaks."""
  model = nn.Dense(24)
  x = jax.random.normal(jax.random.key(0), (4, 16, 32))
  v = model.init(jax.random.key(1), x)
  v = {"params": {**v["params"], "kernel": v["params"]["kernel"].at[3].set(0.0)}}
  xo = x.at[..., 3].set(12.0)  # ~5x the largest regular activation
  f = jax.jit(model.apply)
  y = f(v, x)
  np.testing.assert_allclose(f(v, xo), y, rtol=1e-6, atol=1e-6)
  errs = {}
  for name, xx in (("clean", x), ("outlier", xo)):
    for s in ("W8A8", "W4A4"):
      errs[name, s] = _rel_err(jax.jit(qm.quantized_apply(model.apply, s))(v, xx), y)
  assert errs["outlier", "W8A8"] < 0.05 and errs["clean", "W8A8"] < 0.05, errs
  assert errs["outlier", "W4A4"] > 5 * errs["outlier", "W8A8"], errs
  assert errs["outlier", "W4A4"] > 3 * errs["clean", "W4A4"], errs


def test_static_calibration_scan_equals_loop(tiny):
  model, params, x = tiny
  scan_model = _vit(True)
  sparams = _loop_to_scan(params, TINY["depth"])
  name = "W6A6-static-attn"
  x2 = 3.0 * jax.random.normal(jax.random.key(5), x.shape)
  cal_l = qm.calibrate(model.apply, name, {"params": params}, [(x,), (x2,)])
  cal_s = qm.calibrate(scan_model.apply, name, {"params": sparams}, [(x,), (x2,)])
  for i in range(TINY["depth"]):
    for a, b in zip(jax.tree.leaves(cal_l["Transformer"][f"encoderblock_{i}"]),
                    jax.tree.leaves(cal_s["Transformer"]["encoderblock"])):
      np.testing.assert_allclose(a, b[i], rtol=1e-5, atol=1e-6)
  # the minmax merge over batches is exact: equals calibrating on the concatenation
  cal_cat = qm.calibrate(model.apply, name, {"params": params},
                         [(jnp.concatenate([x, x2]),)])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               cal_l, cal_cat)
  yl = jax.jit(qm.quantized_apply(lambda v, x: model.apply(v, x)[0], name,
                                  calibration=cal_l))({"params": params}, x)
  ys = jax.jit(qm.quantized_apply(lambda v, x: scan_model.apply(v, x)[0], name,
                                  calibration=cal_s))({"params": sparams}, x)
  np.testing.assert_allclose(yl, ys, rtol=1e-4, atol=1e-5)
  y = model.apply({"params": params}, x)[0]
  assert 0 < _rel_err(yl, y) < 0.2


def test_mean_merge_and_errors(tiny):
  model, params, x = tiny
  a = {"m": {"quant_calib_input": jnp.array([-1.0, 2.0])}}
  b = {"m": {"quant_calib_input": jnp.array([-3.0, 1.0])}}
  mm = qm.merge_calibration([a, b], "W4A4-static")
  np.testing.assert_array_equal(mm["m"]["quant_calib_input"], [-3.0, 2.0])
  me = qm.merge_calibration([a, b], "W4A4-static-percentile")
  np.testing.assert_array_equal(me["m"]["quant_calib_input"], [-2.0, 1.5])
  with pytest.raises(ValueError, match="no calibration batches"):
    qm.merge_calibration([], "W4A4-static")
  f = lambda v, x: model.apply(v, x)[0]
  with pytest.raises(ValueError, match="pass calibration="):
    qm.quantized_apply(f, "W4A4-static")
  with pytest.raises(KeyError, match="module 'embedding' has no calibrated range"):
    qm.quantized_apply(f, "W4A4-static", calibration={})({"params": params}, x)


def test_plan_keep_ends_and_skip(tiny):
  model, params, x = tiny
  f = lambda v, x: model.apply(v, x)[0]
  plan = qm.quantization_plan(f, "W4A4", {"params": params}, x)
  by_path = {p["path"]: p for p in plan}
  assert by_path["embedding"]["w_bits"] == 8 and by_path["head"]["a_bits"] == 8
  assert by_path["Transformer/encoderblock_1/MlpBlock_0/Dense_1"]["w_bits"] == 4
  assert not any(p["kind"] == "MultiHeadDotProductAttention" for p in plan)
  plan = qm.quantization_plan(f, q.get_setting("W4A4-attn", skip_patterns=(r"encoderblock_1/MlpBlock",),
                                               keep_ends=False),
                              {"params": params}, x)
  paths = {p["path"]: p for p in plan}
  assert paths["embedding"]["w_bits"] == 4
  assert not any("encoderblock_1/MlpBlock" in p for p in paths)
  assert "Transformer/encoderblock_0/MlpBlock_0/Dense_0" in paths
  assert paths["Transformer/encoderblock_0/MultiHeadDotProductAttention_0"][
      "a_bits"] == 4


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(nn.gelu(nn.Dense(16)(x)))


def test_ste_gradients_for_qat():
  model = _Mlp()
  x = jax.random.normal(jax.random.key(0), (8, 12))
  params = model.init(jax.random.key(1), x)["params"]
  labels = jnp.arange(8) % 4

  def loss(p, apply):
    logits = apply({"params": p}, x)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), labels])

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  get = lambda g: g["Dense_0"]["kernel"]
  g_float = grad(params, model.apply)
  g_ste = grad(params, qm.quantized_apply(model.apply, "W16A16", ste=True))
  np.testing.assert_allclose(get(g_ste), get(g_float), rtol=2e-3, atol=2e-5)
  g_nost = grad(params, qm.quantized_apply(model.apply, "W4A4"))
  np.testing.assert_array_equal(get(g_nost), 0.0)  # rounding: no gradient
  g4 = grad(params, qm.quantized_apply(model.apply, "W4A4", ste=True))
  assert float(jnp.abs(get(g4) - get(g_float)).max()) > 0
  assert float(jnp.abs(get(g4)).max()) > 0.1 * float(jnp.abs(get(g_float)).max())


@pytest.mark.parametrize("scan,setting", [
    (False, "W4A4"),
    (True, q.get_setting("W3A6", w_granularity="tensor")),  # one scale per layer
])
def test_prequantized_weights_give_identical_outputs(tiny, scan, setting):
  """Weights quantized once (prequantize) == quantized inside every pass."""
  model, params, x = tiny
  if scan:
    model, params = _vit(True), _loop_to_scan(params, TINY["depth"])
  f = lambda v, x: model.apply(v, x)[0]
  v = {"params": params}
  want = jax.jit(qm.quantized_apply(f, setting))(v, x)
  pv = qm.prequantize(f, setting, v, x[:1])
  got = jax.jit(qm.quantized_apply(f, setting, prequantized=True))(pv, x)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  blk = "encoderblock" if scan else "encoderblock_0"
  k = pv["params"]["Transformer"][blk]["MlpBlock_0"]["Dense_1"]["kernel"]
  w = params["Transformer"][blk]["MlpBlock_0"]["Dense_1"]["kernel"]
  assert k.shape == w.shape and not np.allclose(k, w)
  levels = lambda a: len(np.unique(np.asarray(a)))
  if scan:  # per tensor, per layer: at most 2^3 - 1 levels in each layer
    assert all(levels(k[i]) <= 7 for i in range(TINY["depth"]))
  else:     # per output channel: at most 15 levels in each column
    assert max(levels(k[:, j]) for j in range(k.shape[1])) <= 15
  np.testing.assert_array_equal(pv["params"]["head"]["bias"], params["head"]["bias"])
  with pytest.raises(ValueError, match="ste=True"):
    qm.quantized_apply(f, setting, ste=True, prequantized=True)


def test_static_range_chosen_for_the_operand_bits(tiny):
  """An 8-bit end (patch embedding, keep_ends) gets the range of an 8-bit MSE search
  on its input, not of the setting's a_bits search; a 4-bit layer its 4-bit one."""
  model, params, x = tiny
  setting = q.get_setting("W4A4-static-mse")
  assert setting.bits_for("embedding") == (8, 8)
  cal = qm.calibrate(model.apply, setting, {"params": params}, [(x,)])
  got = np.asarray(cal["embedding"][qm.CALIB_PREFIX + "input"])
  want8 = q.calibrate(x, 8, "mse", axis=None, symmetric=setting.a_symmetric,
                      grid=setting.mse_grid)
  want4 = q.calibrate(x, 4, "mse", axis=None, symmetric=setting.a_symmetric,
                      grid=setting.mse_grid)
  np.testing.assert_allclose(got, np.ravel(want8), rtol=1e-6)
  assert not np.allclose(np.ravel(want8), np.ravel(want4))  # the test can tell them apart
