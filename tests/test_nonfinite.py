"""NaN / Inf have defined, visible behaviour (issue 14): fake quantization and its
calibrators (s2d_jax/quant.py), activation statistics (s2d_jax/outliers.py) and
npz checkpoint loading (s2d_jax/models/checkpoint.py). References are numpy
computations on the finite values only."""

import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from s2d_jax import outliers as ol
from s2d_jax import quant as q
from s2d_jax.models import checkpoint as ck

from test_outliers import check, np_reference
from test_quant import np_fake_quant


def _with_nonfinite(shape, seed, scale=1.0):
  """Random float32 data, a boolean mask of planted NaN / +Inf / -Inf values."""
  rs = np.random.RandomState(seed)
  x = (scale * rs.standard_t(4, size=shape)).astype(np.float32)
  bad = np.zeros(shape, bool)
  flat = x.reshape(-1)
  idx = rs.choice(flat.size, 3, replace=False)
  flat[idx] = [np.nan, np.inf, -np.inf]
  bad.reshape(-1)[idx] = True
  return x, bad


# ------------------------------------------------------------------ fake_quant --

@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quant_ranges_come_from_finite_values(bits, symmetric):
  """Each row is one scale group holding NaN / Inf: its finite values are
  quantized exactly as if the non-finite ones were absent; those pass through."""
  x, bad = _with_nonfinite((4, 50), bits, scale=0.01)
  got = np.asarray(q.fake_quant(jnp.asarray(x), bits, axis=0, symmetric=symmetric))
  for r in range(4):
    fin = ~bad[r]
    want = np_fake_quant(x[r, fin], bits, (), symmetric)
    np.testing.assert_allclose(got[r, fin], want, rtol=1e-6, atol=1e-9)
  np.testing.assert_array_equal(got[bad], x[bad])  # NaN stays NaN, ±Inf stays
  # the case: x ~ 0.01 N(0, 1), one NaN, 8 bits -- no longer all zero
  if bits == 8 and symmetric:
    fin = np.isfinite(x)
    step = np.abs(np.where(fin, x, 0)).max(1, keepdims=True) / 127
    tol = np.broadcast_to(step / 2 * (1 + 1e-5), x.shape)
    assert np.all(np.abs(got[fin] - x[fin]) <= tol[fin])


def test_all_nonfinite_group_and_ste_gradient():
  x = np.array([[np.nan, np.inf, -np.inf], [0.5, -1.0, np.nan]], np.float32)
  got = q.fake_quant(jnp.asarray(x), 4, axis=0)
  np.testing.assert_array_equal(got[0], x[0])
  np.testing.assert_allclose(got[1, :2], [3 / 7, -1.0], rtol=1e-6)  # s = 1/7
  for lo, hi in (q.minmax_range(jnp.asarray(x), 0),
                 q.percentile_range(jnp.asarray(x), 90.0, axis=0, symmetric=False),
                 q.mse_range(jnp.asarray(x), 4, axis=0)):
    assert lo[0, 0] == 0.0 and hi[0, 0] == 0.0   # no finite value: [0, 0]
  # STE: finite values keep the clipped identity, non-finite ones the identity
  c = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0])
  xs = jnp.asarray([-2.0, np.nan, 0.3, np.inf, 0.9], jnp.float32)
  _, vjp = jax.vjp(lambda v: q.fake_quant_ste(v, 4, qrange=(-0.5, 0.5)), xs)
  np.testing.assert_array_equal(vjp(c)[0], [0.0, 2.0, 3.0, 4.0, 0.0])


def test_qrange_with_nonfinite_end():
  x = jnp.linspace(-1.0, 1.0, 8)
  for rng, end in (((np.nan, 1.0), "lo"), ((-1.0, np.inf), "hi"),
                   ((np.array([-1.0, np.nan]), 1.0), "lo")):
    with pytest.raises(ValueError, match=f"qrange {end} is not finite"):
      q.fake_quant(x, 4, qrange=rng)
  # device values are not inspected (no host sync under jit): the group with a
  # non-finite end is NaN, every other group is quantized normally
  x2 = jnp.stack([x, x, x])
  lo = jnp.array([[-1.0], [jnp.nan], [-jnp.inf]])
  got = jax.jit(lambda x, lo: q.fake_quant(x, 4, axis=0, qrange=(lo, 1.0)))(x2, lo)
  np.testing.assert_array_equal(got[0], q.fake_quant(x, 4, qrange=(-1.0, 1.0)))
  assert np.all(np.isnan(np.asarray(got[1:])))
  for symmetric in (True, False):  # never a silent s = 1
    s, _ = q.scale_zero_point(jnp.nan, 1.0, 4, symmetric)
    assert not np.isfinite(s)


@pytest.mark.parametrize("symmetric", [True, False])
def test_calibrators_use_finite_values(symmetric):
  x, bad = _with_nonfinite((3, 400), 5)
  xj = jnp.asarray(x)
  fin = [x[r, ~bad[r]] for r in range(3)]
  lo, hi = q.calibrate(xj, 8, "minmax", axis=0)
  np.testing.assert_array_equal(lo[:, 0], [f.min() for f in fin])
  np.testing.assert_array_equal(hi[:, 0], [f.max() for f in fin])
  lo, hi = q.calibrate(xj, 8, "percentile", axis=0, percentile=97.0,
                       symmetric=symmetric)
  if symmetric:
    want_hi = [np.percentile(np.abs(f.astype(np.float64)), 97.0) for f in fin]
    want_lo = [-w for w in want_hi]
  else:
    want_lo = [np.percentile(f.astype(np.float64), 3.0) for f in fin]
    want_hi = [np.percentile(f.astype(np.float64), 97.0) for f in fin]
  np.testing.assert_allclose(lo[:, 0], want_lo, rtol=1e-5)
  np.testing.assert_allclose(hi[:, 0], want_hi, rtol=1e-5)
  grid = 16
  lo, hi = q.calibrate(xj, 4, "mse", axis=0, grid=grid, symmetric=symmetric)
  for r, f in enumerate(fin):  # brute force over the same candidates, float64 sums
    errs = []
    for i in range(grid, 0, -1):
      rr = np.float32(i / grid)
      xq = np_fake_quant(f, 4, (), symmetric, lo=rr * f.min(), hi=rr * f.max())
      errs.append(((xq - f) ** 2).sum())
    best = np.float32((grid - int(np.argmin(errs))) / grid)
    np.testing.assert_allclose([lo[r, 0], hi[r, 0]], [best * f.min(), best * f.max()],
                               rtol=1e-6)


# -------------------------------------------------------------------- outliers --

def test_act_stats_count_nonfinite_and_describe_the_finite_values():
  x, bad = _with_nonfinite((6, 5, 7), 11)
  x[2, 1, 3] = np.nan                     # in a masked-out example: not counted
  mask = np.array([1, 1, 0, 1, 1, 1])
  s = ol.act_stats(jnp.asarray(x), jnp.asarray(mask))
  real = x[mask > 0]
  assert int(s.nonfinite) == int((~np.isfinite(real)).sum()) == 3
  ref = np_reference_finite(real)
  check(s, ref)
  summ = ol.summary(s)
  assert summ["nonfinite"] is True and summ["nonfinite_count"] == 3
  assert summ["count"] == ref["n"] and np.isfinite(summ["max_abs"])
  assert np.isfinite(summ["kurtosis"])
  clean = ol.summary(ol.act_stats(jnp.asarray(np.nan_to_num(x, posinf=0, neginf=0))))
  assert clean["nonfinite"] is False and clean["nonfinite_count"] == 0


def np_reference_finite(real):
  """np_reference over the finite values, per-channel / per-token over finite ones."""
  flat = real.reshape(-1)
  ref = np_reference(flat[np.isfinite(flat)][None])
  rows = real.reshape(-1, real.shape[-1]).astype(np.float64)
  fin = np.isfinite(rows)
  ref["ch_min"] = np.where(fin, rows, np.inf).min(0)
  ref["ch_max"] = np.where(fin, rows, -np.inf).max(0)
  ref["tok_inf"] = np.where(fin, np.abs(rows), 0).max(-1).mean()
  return ref


def test_nonfinite_merges_exactly_over_batches_and_devices():
  xs, total = [], None
  for i in range(3):
    x, _ = _with_nonfinite((8, 5, 7), 20 + i)
    xs.append(x)
    total = ol.merge_stats(total, ol.act_stats(jnp.asarray(x)))
  allx = np.concatenate(xs)
  assert int(total.nonfinite) == 9
  check(total, np_reference_finite(allx))
  x = xs[0]
  mask = np.array([1, 0, 1, 1, 1, 1, 0, 1])
  f = jax.pmap(lambda x, m: ol.reduce_stats(ol.act_stats(x, m), "d"), axis_name="d")
  out = f(x.reshape(8, 1, 5, 7), mask.reshape(8, 1))
  got = ol.finalize_reduced(jax.tree.map(lambda a: a[0], out))
  real = x[mask > 0]
  assert int(got.nonfinite) == int((~np.isfinite(real)).sum())
  check(got, np_reference_finite(real))


# ------------------------------------------------------------------ checkpoint --

def _params(bf16=False):
  rs = np.random.RandomState(0)
  dt = ml_dtypes.bfloat16 if bf16 else np.float32
  k = rs.randn(4, 3).astype(dt)
  k[1, 2] = np.nan
  b = np.zeros(3, np.float32)
  b[[0, 2]] = [np.inf, -np.inf]
  return {"img": {"Dense_0": {"kernel": k, "bias": b},
                  "ok": {"kernel": rs.randn(2, 2).astype(np.float32)}},
          "txt": {"ok": np.ones(2, np.float32)}}


@pytest.mark.parametrize("bf16", [False, True])
def test_load_refuses_nonfinite_and_names_keys(tmp_path, bf16):
  path = str(tmp_path / "c.npz")
  t = _params(bf16)
  with pytest.warns(ck.NonFiniteWarning, match=r"writing 2 parameter\(s\)"):
    ck.save(path, t)
  with pytest.raises(ck.CheckpointError, match=(
      r"c.npz: 2 parameter\(s\) hold non-finite values: "
      r"img/Dense_0/bias \(0 NaN, 2 Inf of 3 values\), "
      r"img/Dense_0/kernel \(1 NaN, 0 Inf of 12 values\).*allow_nonfinite=True")):
    ck.load_params(path)
  # only the selected subtree is checked
  np.testing.assert_array_equal(ck.load_params(path + ":txt")["ok"], np.ones(2))
  with pytest.raises(ck.CheckpointError, match="c.npz:img/Dense_0: 2 parameter"):
    ck.load_params(path + ":img/Dense_0")
  # explicit opt-in: loaded bit for bit, with a warning naming the same keys
  with pytest.warns(ck.NonFiniteWarning, match=r"img/Dense_0/kernel \(1 NaN"):
    got = ck.load_params(path, allow_nonfinite=True)
  for a, b in zip(ck.flatten(got).values(), ck.flatten(t).values()):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def test_finite_checkpoint_loads_silently_and_helpers(tmp_path):
  t = _params()
  t["img"]["Dense_0"] = t["img"]["ok"]
  path = str(tmp_path / "c.npz")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ck.save(path, t)
    ck.load_params(path)
    assert ck.check_finite(jax.tree.map(jnp.asarray, t)) == {}
  bad = {"a": {"kernel": jnp.full((2, 2), jnp.nan)}, "b": np.arange(3)}  # ints skipped
  assert ck.nonfinite_params(bad) == {"a/kernel": (4, 0, 4)}
  with pytest.raises(ck.CheckpointError, match=r"init: 1 parameter.*a/kernel \(4 NaN"):
    ck.check_finite(bad, where="init")
  many = {f"k{i:02d}": np.full(1, np.nan, np.float32) for i in range(12)}
  assert ck.describe_nonfinite(ck.nonfinite_params(many)).endswith(", and 2 more")
