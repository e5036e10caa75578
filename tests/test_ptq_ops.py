"""The PTQ interception mechanism (s2d_jax/ptq/ops.py) and the shared helper
(s2d_jax/intercept.py): points, forward-order calibration, state layout, plan, baking,
output gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ptq_fixtures as F
from s2d_jax import intercept
from s2d_jax import ptq
from s2d_jax.ptq import ops
from s2d_jax.ptq import quantizers as Q


def minmax_provider(bits=4, weights=True):
  """Per-tensor asymmetric min-max on every activation point, per-channel weights."""

  def provider(ctx, x):
    kind = ctx.point.kind
    if kind == "matmul_output" or (kind == "weight" and not weights):
      return x
    keep = ctx.point.keep_axes if kind == "weight" else None
    s = ctx.init(lambda: dict(zip(("delta", "zero_point"), Q.uniform_params(
        jnp.min(x, axis=_red(x, keep), keepdims=True),
        jnp.max(x, axis=_red(x, keep), keepdims=True), bits))))
    return Q.uniform_quantize(x, s["delta"], s["zero_point"], bits)

  provider.describe = lambda p: (None if p.kind == "matmul_output"
                                 else dict(bits=bits))
  return provider


def _red(x, keep):
  keep = () if keep is None else keep
  return tuple(i for i in range(x.ndim) if i not in keep)


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="fc2")(nn.gelu(nn.Dense(8, name="fc1")(x)))


def test_forward_order_calibration_on_the_quantized_network():
  """fc2's input range is calibrated on gelu(fc1) computed with fc1's input AND
  weight already quantized (RepQ-ViT's official flow), and applying the calibrated
  state (weights baked) reproduces the calibration pass exactly."""
  m = _Mlp()
  x = jax.random.normal(jax.random.key(0), (5, 6))
  v = m.init(jax.random.key(1), x)
  prov = minmax_provider(3)
  out, state = ops.calibrate(m.apply, prov, v, x)
  p = v["params"]
  s1 = state["fc1"]["ptq.matmul_input"]
  d1, z1 = Q.uniform_params(x.min(), x.max(), 3)
  np.testing.assert_allclose(s1["delta"].reshape(()), d1, rtol=1e-6)
  wq1 = Q.uniform_quantize(p["fc1"]["kernel"], *Q.uniform_params(
      p["fc1"]["kernel"].min(0, keepdims=True), p["fc1"]["kernel"].max(0, keepdims=True),
      3), 3)
  h = nn.gelu(Q.uniform_quantize(x, d1, z1, 3) @ wq1 + p["fc1"]["bias"])
  d2, _ = Q.uniform_params(h.min(), h.max(), 3)
  np.testing.assert_allclose(state["fc2"]["ptq.matmul_input"]["delta"].reshape(()), d2,
                             rtol=1e-6)
  assert state["fc2"]["ptq.weight"]["delta"].shape == (1, 3)  # per output channel
  baked = ops.bake_weights(p, state, lambda path, w, s: Q.uniform_quantize(
      w, s["delta"], s["zero_point"], 3))
  np.testing.assert_allclose(baked["fc1"]["kernel"], wq1, rtol=1e-6)
  np.testing.assert_array_equal(baked["fc1"]["bias"], p["fc1"]["bias"])
  y = jax.jit(ops.intercepted(m.apply, prov))({"params": baked,
                                               "intermediates": state}, x)
  np.testing.assert_array_equal(y, out)
  # existing state is kept: a second pass on other data changes nothing ...
  _, again = ops.calibrate(m.apply, prov, v, 10 * x, state=state)
  jax.tree.map(np.testing.assert_array_equal, again, state)
  # ... except what was dropped, which is re-initialised
  dropped = ops.drop(state, lambda path, name: path == "fc2")
  assert "fc2" not in dropped and "fc1" in dropped
  _, re = ops.calibrate(m.apply, prov, v, 10 * x, state=dropped)
  np.testing.assert_array_equal(re["fc1"]["ptq.matmul_input"]["delta"], s1["delta"])
  assert float(re["fc2"]["ptq.matmul_input"]["delta"].reshape(())) != float(d2)


def test_apply_without_state_names_the_point():
  m = _Mlp()
  x = jnp.ones((2, 6))
  v = m.init(jax.random.key(1), x)
  with pytest.raises(KeyError, match="matmul_input of 'fc1'"):
    ops.intercepted(m.apply, minmax_provider())(v, x)
  with pytest.raises(ValueError, match="mode must be one of"):
    ops.intercepted(m.apply, minmax_provider(), mode="quant")


def test_points_axes_and_plan_on_a_vit():
  model, params = F.vit_model("map", scan=False)
  x = F.images(2)
  seen = []

  def spy(ctx, x):
    seen.append((ctx.point, x.shape))
    return x

  f = ops.intercepted(model.apply, spy, mode="calib")
  jax.eval_shape(f, {"params": params}, x)  # traced only
  by = {(p.path, p.kind, p.call): (p, s) for p, s in seen}
  blk = "Transformer/encoderblock_0/"
  p, s = by[blk + "MultiHeadDotProductAttention_0/query", "weight", 0]
  assert s == (32, 4, 8) and p.keep_axes == (1, 2) and p.contract_axes == (0,)
  p, s = by[blk + "MultiHeadDotProductAttention_0/out", "weight", 0]
  assert s == (4, 8, 32) and p.keep_axes == (2,) and p.contract_axes == (0, 1)
  p, s = by[blk + "MultiHeadDotProductAttention_0/out", "matmul_input", 0]
  assert s == (2, 16, 4, 8) and p.contract_axes == (2, 3)
  p, s = by["embedding", "matmul_input", 0]
  assert s == (2, 32, 32, 3) and p.keep_axes == (0,) and p.module_type == "Conv"
  p, s = by[blk + "MultiHeadDotProductAttention_0", "probs", 0]
  assert s == (2, 4, 16, 16) and p.contract_axes == (3,)
  p, s = by[blk + "MultiHeadDotProductAttention_0", "v", 0]
  assert s == (2, 16, 4, 8)
  p, s = by[blk + "MlpBlock_0/Dense_1", "matmul_output", 0]
  assert s == (2, 16, 32) and p.contract_axes == (2,)
  # big_vision's head runs on the token map, then on the pooled features
  assert by["head", "matmul_input", 0][1] == (2, 4, 4, 32)
  assert by["head", "matmul_input", 1][1] == (2, 32)
  assert ("head", "weight", 1) not in by  # one weight state per module



def test_plan_lists_described_points_once():
  m = _Shared()
  a = jnp.ones((2, 4))
  v = m.init(jax.random.key(0), a, a)
  entries = ops.plan(m.apply, minmax_provider(5), v, a, a)
  assert [(e["path"], e["kind"], e["call"], e["bits"]) for e in entries] == [
      ("shared", "matmul_input", 0, 5), ("shared", "weight", 0, 5),
      ("shared", "matmul_input", 1, 5)]
  _, st = ops.calibrate(m.apply, minmax_provider(5), v, a, a, jit=False)
  applied = ops.plan(m.apply, minmax_provider(5), {**v, "intermediates": st}, a, a,
                     mode="apply")
  assert [e["kind"] for e in applied] == ["matmul_input", "matmul_input"]


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(num_heads=2)(y, y)
    return x + nn.Dense(x.shape[-1], name="fc")(y), None


class _Stack(nn.Module):
  scan: bool

  @nn.compact
  def __call__(self, x):
    if self.scan:
      x, _ = nn.scan(_Block, variable_axes={"params": 0, "intermediates": 0},
                     split_rngs={"params": True}, length=2)(name="block")(x, None)
    else:
      for i in range(2):
        x, _ = _Block(name=f"block_{i}")(x, None)
    return x


def test_scan_state_is_stacked_like_the_kernels_and_equals_loop():
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  loop, scan = _Stack(False), _Stack(True)
  p_l = loop.init(jax.random.key(1), x)["params"]
  p_s = {"block": jax.tree.map(lambda *a: jnp.stack(a), p_l["block_0"], p_l["block_1"])}
  prov = minmax_provider(4)
  y_l, st_l = ops.calibrate(loop.apply, prov, {"params": p_l}, x)
  y_s, st_s = ops.calibrate(scan.apply, prov, {"params": p_s}, x)
  np.testing.assert_allclose(y_l, y_s, rtol=1e-5, atol=1e-5)
  blk = st_s["block"]
  assert blk["fc"]["ptq.weight"]["delta"].shape == (2, 1, 8)
  assert blk["MultiHeadDotProductAttention_0"]["ptq.probs"]["delta"].shape == (
      2, 1, 1, 1, 1)
  for i in range(2):
    jax.tree.map(lambda a, b, i=i: np.testing.assert_allclose(a, b[i], rtol=1e-5,
                                                              atol=1e-7),
                 st_l[f"block_{i}"], blk)
  baked = ops.bake_weights(p_s, st_s, lambda path, w, s: Q.uniform_quantize(
      w, s["delta"], s["zero_point"], 4))
  y = jax.jit(ops.intercepted(scan.apply, prov))({"params": baked,
                                                  "intermediates": st_s}, x)
  np.testing.assert_allclose(y, y_s, rtol=1e-6, atol=1e-6)


class _Shared(nn.Module):
  @nn.compact
  def __call__(self, a, b):
    d = nn.Dense(3, name="shared")
    return d(a), d(b)


def test_repeated_calls_have_their_own_state():
  m = _Shared()
  a, b = jnp.ones((2, 4)), 5 * jnp.ones((2, 4)).at[0, 0].set(-5)
  v = m.init(jax.random.key(0), a, b)
  _, st = ops.calibrate(m.apply, minmax_provider(), v, a, b)
  s = st["shared"]
  assert set(s) == {"ptq.matmul_input", "ptq.matmul_input@1", "ptq.weight"}
  assert float(s["ptq.matmul_input@1"]["delta"].reshape(())) > float(
      s["ptq.matmul_input"]["delta"].reshape(()))


def test_output_gradients_are_dloss_doutput():
  m = _Mlp()
  x = jax.random.normal(jax.random.key(0), (5, 6))
  v = m.init(jax.random.key(1), x)
  loss = lambda y: 0.5 * jnp.sum(y ** 2)
  g = ops.output_gradients(m.apply, v, loss, x)
  y = m.apply(v, x)
  np.testing.assert_allclose(g["fc2"], y, rtol=1e-5, atol=1e-6)  # dL/dy = y
  p = v["params"]
  h_pre = x @ p["fc1"]["kernel"] + p["fc1"]["bias"]
  want = jax.grad(lambda h: loss(nn.gelu(h) @ p["fc2"]["kernel"] + p["fc2"]["bias"]))(
      h_pre)
  np.testing.assert_allclose(g["fc1"], want, rtol=1e-5, atol=1e-6)
  only = ops.output_gradients(m.apply, v, loss, x, include=lambda path: path == "fc1")
  assert set(only) == {"fc1"}


def test_intercept_helpers():
  tree = {"a": {"ptq.x": {"d": 1}, "other": 2, "b": {"ptq.y": 3}}, "c": {"z": 4}}
  assert intercept.collect(tree, "ptq.") == {"a": {"x": {"d": 1}, "b": {"y": 3}}}
  assert intercept.flatten_until(tree, "ptq.") == {("a", "ptq.x"): {"d": 1},
                                                   ("a", "b", "ptq.y"): 3}
  assert ops.from_entries(ops.entries(tree)) == {"a": {"ptq.x": {"d": 1},
                                                       "b": {"ptq.y": 3}}}
  assert intercept.subtree(tree, "a/b") == {"ptq.y": 3}
  assert intercept.subtree(tree, "a/q") is None
  flat = intercept.flatten({"a": {"b": 1, "c": {"d": 2}}})
  assert flat == {("a", "b"): 1, ("a", "c", "d"): 2}
  assert intercept.nest(flat) == {"a": {"b": 1, "c": {"d": 2}}}
  assert not intercept.is_matmul(nn.ConvTranspose(3, (2, 2)))
  assert intercept.is_matmul(nn.Conv(3, (2, 2))) and intercept.is_matmul(nn.Dense(2))


def test_intercept_record_and_run_merge_repeated_calls():
  m = _Shared()
  a, b = jnp.ones((2, 4)), -3 * jnp.ones((2, 4))

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if intercept.is_call(context) and intercept.is_matmul(mod):
      intercept.record(mod, "intermediates", "stat_absmax", jnp.abs(args[0]).max(),
                       merge=jnp.maximum)
      intercept.record(mod, "intermediates", "stat_last", args[0].sum())
    return next_fun(*args, **kwargs)

  v = m.init(jax.random.key(0), a, b)
  out, tree = intercept.run(m.apply, v, interceptor, a, b)
  np.testing.assert_allclose(out[1], m.apply(v, a, b)[1])
  assert intercept.collect(tree, "stat_") == {"shared": {"absmax": 3.0, "last": -24.0}}
  passthrough = lambda next_fun, args, kwargs, context: next_fun(*args, **kwargs)
  out2, none = intercept.run(m.apply, v, passthrough, a, b, collection=None)
  assert none == {}
  np.testing.assert_array_equal(out2[0], out[0])


def test_setting_names_and_weight_only_methods():
  assert ptq.setting_name("RepQ-ViT", "W4A4") == "RepQ-ViT/W4A4"
  assert ptq.setting_name("GPTQ", "W4A4") == "GPTQ/W4A16"      # weights only
  assert ptq.parse_name("GPTQ/W4A16").a_bits == 16
  assert ptq.is_ptq_name("ERQ/W4A4") and not ptq.is_ptq_name("W4A4-static")
  with pytest.raises(ValueError, match="unknown method 'Nope'"):
    ptq.setting_name("Nope", "W4A4")
  with pytest.raises(ValueError, match="W4X4"):
    ptq.setting_name("ERQ", "W4X4")
