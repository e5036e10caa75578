"""Fake-quant primitives, calibrators and named settings (s2d_jax/quant.py)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2d_jax import quant as q


def np_fake_quant(x, bits, keep, symmetric, lo=None, hi=None):
  """Independent numpy reference: loop over scale groups."""
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  keep = tuple(a % x.ndim for a in keep)
  group_shape = [x.shape[a] for a in keep]
  for idx in itertools.product(*[range(n) for n in group_shape]):
    sl = [slice(None)] * x.ndim
    for a, i in zip(keep, idx):
      sl[a] = i
    g = x[tuple(sl)]
    glo = g.min() if lo is None else lo
    ghi = g.max() if hi is None else hi
    if symmetric:
      qm = 2 ** (bits - 1) - 1
      s = max(abs(glo), abs(ghi)) / qm or 1.0
      out[tuple(sl)] = s * np.clip(np.round(g / s), -qm, qm)
    else:
      qm = 2 ** bits - 1
      glo, ghi = min(glo, 0.0), max(ghi, 0.0)
      s = (ghi - glo) / qm or 1.0
      z = np.clip(np.round(-glo / s), 0, qm)
      out[tuple(sl)] = s * (np.clip(np.round(g / s) + z, 0, qm) - z)
  return out


def test_symmetric_hand_grid_round_half_even():
  # 3 bits: q_max = 3, amax = 1.5 -> s = 0.5. x/s = [-3, -.5, .5, 1.5, .6, 3, 2.5]
  x = jnp.array([-1.5, -0.25, 0.25, 0.75, 0.3, 1.5, 1.25])
  got = q.fake_quant(x, 3)
  np.testing.assert_array_equal(got, [-1.5, 0.0, 0.0, 1.0, 0.5, 1.5, 1.0])


def test_asymmetric_hand_grid():
  # 2 bits: lo=-1, hi=2 -> s = 1, z = 1; levels {-1, 0, 1, 2}
  x = jnp.array([-1.0, -0.5, 0.5, 1.5, 2.0])
  got = q.fake_quant(x, 2, symmetric=False)
  np.testing.assert_array_equal(got, [-1.0, 0.0, 0.0, 2.0, 2.0])


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("keep", [(), (-1,), (0, 1)])
def test_matches_numpy_reference(bits, symmetric, keep):
  x = np.random.RandomState(bits).standard_t(3, size=(3, 5, 7)).astype(np.float32)
  got = q.fake_quant(jnp.asarray(x), bits, axis=keep or None, symmetric=symmetric)
  want = np_fake_quant(x, bits, keep, symmetric)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_invariants_levels_error_idempotence(bits, symmetric):
  x = jnp.asarray(np.random.RandomState(0).randn(6, 200).astype(np.float32))
  xq = q.fake_quant(x, bits, axis=0, symmetric=symmetric)
  lo, hi = q.minmax_range(x, 0)
  s, _ = q.scale_zero_point(lo, hi, bits, symmetric)
  for row in range(6):
    assert len(np.unique(np.asarray(xq[row]))) <= 2 ** bits
  # inside the range, the error is at most half a step
  assert np.all(np.abs(np.asarray(xq - x)) <= np.asarray(s) / 2 * (1 + 1e-5))
  # idempotent: quantizing a quantized tensor changes nothing
  np.testing.assert_allclose(q.fake_quant(xq, bits, axis=0, symmetric=symmetric),
                             xq, rtol=0, atol=1e-6)


def test_clipping_and_zero_group():
  x = jnp.array([[-10.0, -1.0, 0.4, 1.0, 10.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
  got = q.fake_quant(x, 8, axis=0, qrange=(-1.0, 1.0))
  np.testing.assert_allclose(got[0, [0, -1]], [-1.0, 1.0], rtol=1e-6)
  dyn = q.fake_quant(x, 4, axis=0)
  assert np.all(np.isfinite(np.asarray(dyn)))
  np.testing.assert_array_equal(dyn[1], 0.0)


@pytest.mark.parametrize("bits", [4, 8])
def test_bf16_is_float32_math_rounded_once(bits):
  """bf16 in: the grid is computed in float32 and the result rounded once to
  bf16, so it equals bf16(x̂_f32) exactly and is within bf16's unit roundoff
  2^-8 (8-bit significand, round to nearest) of x̂_f32 -- a tolerance from
  bf16's precision, not from the measured error."""
  x = jnp.asarray(np.random.RandomState(bits).randn(4, 64), jnp.bfloat16)
  got = q.fake_quant(x, bits, axis=0)
  assert got.dtype == jnp.bfloat16
  want = q.fake_quant(x.astype(jnp.float32), bits, axis=0)
  np.testing.assert_array_equal(got, want.astype(jnp.bfloat16))
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.all(np.abs(got - want) <= 2.0 ** -8 * np.abs(want))


# qrange (-0.5, A) is not symmetric: the symmetric grid clips to [-A, A], the
# asymmetric one to [-0.5, A]. A = 1.57: at 3 bits the grid's own end point
# s·q_max = fl(fl(A/3)·3) lies one ulp above A, so clipping at the grid instead
# of the range is caught.
_A = np.float32(1.57)
_up, _down = (lambda v: np.nextafter(np.float32(v), np.float32(np.inf)),
              lambda v: np.nextafter(np.float32(v), np.float32(-np.inf)))
# x: both clipping ends exactly, one float32 ulp inside/outside each end, and
# values well inside / outside.
_STE_X = np.array([-3.0, -_A, _down(-_A), _up(-_A), -0.5, _down(-0.5), -0.3, 0.0,
                   0.7, 1.5, _down(_A), _A, _up(_A), 5.0], np.float32)


@pytest.mark.parametrize("symmetric,lo_clip", [(True, -_A), (False, np.float32(-0.5))])
@pytest.mark.parametrize("bits", [3, 8])
def test_ste_gradient_is_exactly_the_clipped_identity(symmetric, lo_clip, bits):
  """vjp with a random cotangent c: d x̂ / dx = c on [lo, hi] (ends included),
  0 outside, element by element, exactly; forward = the plain quantizer."""
  x = jnp.asarray(_STE_X)
  c = np.random.RandomState(bits).randn(x.size).astype(np.float32)
  rng = (-0.5, float(_A))
  fq = lambda x: q.fake_quant(x, bits, qrange=rng, symmetric=symmetric, ste=True)
  y, vjp = jax.vjp(fq, x)
  np.testing.assert_array_equal(
      y, q.fake_quant(x, bits, qrange=rng, symmetric=symmetric))
  inside = (_STE_X >= lo_clip) & (_STE_X <= _A)
  np.testing.assert_array_equal(vjp(jnp.asarray(c))[0], np.where(inside, c, 0.0))
  # per-group ranges: each group clips to its own range
  x2 = jnp.stack([x, 0.5 * x])
  rng2 = (np.array([[-0.5], [-0.25]], np.float32), np.array([[_A], [_A / 2]]))
  _, vjp2 = jax.vjp(lambda x: q.fake_quant(x, bits, axis=0, qrange=rng2,
                                           symmetric=symmetric, ste=True), x2)
  c2 = np.stack([c, -c])
  np.testing.assert_array_equal(vjp2(jnp.asarray(c2))[0],
                                np.where(np.stack([inside, inside]), c2, 0.0))
  # ste_clipped=False: the identity everywhere
  _, vjp_id = jax.vjp(lambda x: q.fake_quant_ste(
      x, bits, qrange=rng, symmetric=symmetric, ste_clipped=False), x)
  np.testing.assert_array_equal(vjp_id(jnp.asarray(c))[0], c)
  # dynamic ranges contain every value: the identity
  _, vjp_dyn = jax.vjp(lambda x: q.fake_quant_ste(x, bits, symmetric=symmetric), x)
  np.testing.assert_array_equal(vjp_dyn(jnp.asarray(c))[0], c)
  # without STE, rounding has zero gradient
  _, vjp0 = jax.vjp(lambda x: q.fake_quant(x, bits, qrange=rng), x)
  np.testing.assert_array_equal(vjp0(jnp.asarray(c))[0], np.zeros(x.size))


def test_input_validation_names_the_argument():
  x = jnp.ones((2, 3))
  for bad_x in (jnp.arange(6).reshape(2, 3), np.ones((2, 3), np.int8),
                jnp.ones((2, 3), bool)):
    with pytest.raises(ValueError, match=r"fake_quant needs a floating-point array, "
                       r"got dtype (int|bool)"):
      q.fake_quant(bad_x, 4)
  with pytest.raises(ValueError, match="calibrate needs a floating-point"):
    q.calibrate(jnp.arange(4), 4, "minmax")
  # numpy integers are integers; bools are not bit widths
  for b in (np.int64(4), np.int32(4), np.uint8(4)):
    np.testing.assert_array_equal(q.fake_quant(x * 0.3, b), q.fake_quant(x * 0.3, 4))
  s = q.get_setting("W4A4", a_bits=np.int64(6))
  assert s.a_bits == 6 and type(s.a_bits) is int
  assert s == q.QuantSetting("W4A4", 4, 6)
  for bad in (True, np.bool_(True), 4.0, "4", None):
    with pytest.raises(ValueError, match="bits must be a static integer"):
      q.fake_quant(x, bad)
  with pytest.raises(ValueError, match=r"QuantSetting.w_bits must be a static"):
    q.get_setting("W4A4", w_bits=True)
  with pytest.raises(ValueError, match=r"bits must be in \[2, 16\], got 17"):
    q.fake_quant(x, np.int64(17))
  with pytest.raises(ValueError, match="bits must be a static integer"):
    jax.jit(lambda x, b: q.fake_quant(x, b))(x, 4)  # traced bits
  with pytest.raises(ValueError, match="qrange must be a pair"):
    q.fake_quant(x, 4, qrange=1.0)
  with pytest.raises(ValueError, match="grid must be an integer >= 1"):
    q.mse_range(x, 4, grid=2.5)
  with pytest.raises(ValueError, match="QuantSetting.percentile"):
    q.get_setting("W4A4-static-percentile", percentile=0.0)
  with pytest.raises(ValueError, match="QuantSetting.mse_grid"):
    q.get_setting("W4A4-static-mse", mse_grid=0)


@pytest.mark.parametrize("suffix", ["mse", "percentile", "minmax"])
def test_calibrator_suffix_without_static_says_how(suffix):
  with pytest.raises(ValueError, match=f"needs '-static' before it: "
                     f"'W4A4-static-{suffix}'"):
    q.get_setting(f"W4A4-{suffix}")
  with pytest.raises(ValueError, match="needs '-static' before it"):
    q.get_setting(f"W4A4-{suffix}-static")
  assert q.get_setting(f"W4A4-static-{suffix}").calibrator == suffix


def test_errors():
  x = jnp.ones((2, 3))
  for bad in (1, 17, 4.0, True):
    with pytest.raises(ValueError, match="bits"):
      q.fake_quant(x, bad)
  with pytest.raises(ValueError, match="axis 2 out of range"):
    q.fake_quant(x, 4, axis=2)
  with pytest.raises(ValueError, match="unknown calibrator 'kl'"):
    q.calibrate(x, 4, "kl")
  with pytest.raises(ValueError, match="percentile"):
    q.percentile_range(x, 0.0)


def test_minmax_and_percentile_calibrators():
  x = np.random.RandomState(1).randn(4, 1000).astype(np.float32)
  lo, hi = q.calibrate(jnp.asarray(x), 8, "minmax", axis=0)
  np.testing.assert_allclose(lo[:, 0], x.min(1))
  np.testing.assert_allclose(hi[:, 0], x.max(1))
  lo, hi = q.calibrate(jnp.asarray(x), 8, "percentile", percentile=99.0)
  a = np.percentile(np.abs(x), 99.0)
  np.testing.assert_allclose([lo.item(), hi.item()], [-a, a], rtol=1e-5)
  lo, hi = q.calibrate(jnp.asarray(x), 8, "percentile", symmetric=False,
                       percentile=95.0, axis=0)
  np.testing.assert_allclose(lo[:, 0], np.percentile(x, 5.0, axis=1), rtol=1e-5)
  np.testing.assert_allclose(hi[:, 0], np.percentile(x, 95.0, axis=1), rtol=1e-5)


def test_mse_calibrator_matches_brute_force():
  rs = np.random.RandomState(2)
  x = rs.laplace(size=(3, 512)).astype(np.float32)  # heavy tails: clipping pays
  grid = 32
  lo, hi = q.mse_range(jnp.asarray(x), 4, axis=0, grid=grid)
  for row in range(3):
    amax = np.abs(x[row]).max()
    errs = []
    for i in range(grid, 0, -1):
      r = i / grid
      xq = np_fake_quant(x[row], 4, (), True, lo=-r * amax, hi=r * amax)
      errs.append(((xq - x[row]) ** 2).sum())
    best = (grid - int(np.argmin(errs))) / grid
    np.testing.assert_allclose(hi[row, 0], best * x[row].max(), rtol=1e-5)
  assert np.all(np.asarray(hi[:, 0]) < 0.9 * x.max(1))
  e_mse = jnp.sum((q.fake_quant(jnp.asarray(x), 4, axis=0, qrange=(lo, hi)) - x) ** 2)
  e_mm = jnp.sum((q.fake_quant(jnp.asarray(x), 4, axis=0) - x) ** 2)
  assert e_mse < e_mm


def test_settings_by_name():
  s = q.get_setting("W4A8")
  assert (s.w_bits, s.a_bits, s.w_granularity, s.a_granularity, s.a_mode) == (
      4, 8, "channel", "token", "dynamic")
  assert not s.attention and s.keep_ends
  s = q.get_setting("W6A6-static-mse-attn")
  assert (s.a_mode, s.a_granularity, s.calibrator, s.attention) == (
      "static", "tensor", "mse", True)
  assert q.get_setting("W3A4", a_symmetric=False).a_symmetric is False
  for name in q.NAMED_SETTINGS:
    assert q.get_setting(name).name == name
  assert q.get_setting(s) is s
  with pytest.raises(ValueError, match="unknown quant setting 'W4'"):
    q.get_setting("W4")
  with pytest.raises(ValueError, match="bits"):
    q.get_setting("W1A4")
  with pytest.raises(ValueError, match="unknown suffix 'foo'"):
    q.get_setting("W4A4-foo")
  with pytest.raises(ValueError, match="a_mode='static' needs"):
    q.get_setting("W4A4", a_mode="static")
  with pytest.raises(ValueError, match="a_granularity='row'"):
    q.get_setting("W4A4", a_granularity="row")


def test_bits_for_paths():
  s = q.get_setting("W4A4", skip_patterns=(r"MAPHead",))
  assert s.bits_for("embedding") == (8, 8)
  assert s.bits_for("img/head") == (8, 8)
  assert s.bits_for("Transformer/encoderblock/MlpBlock_0/Dense_0") == (4, 4)
  assert s.bits_for("MAPHead_0/MlpBlock_0/Dense_0") is None
  assert q.get_setting("W4A4", keep_ends=False).bits_for("embedding") == (4, 4)
  assert q.get_setting("W16A16").bits_for("head") == (16, 16)
