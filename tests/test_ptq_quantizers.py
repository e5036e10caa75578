"""RepQ-ViT's quantizers (s2d_jax/ptq/quantizers.py) against hand grids and numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2d_jax.ptq import quantizers as Q


def test_uniform_grid_by_hand():
  # 2 bits, Δ = 0.5, z = 1: levels 0..3 -> values (q - 1) * 0.5 = -0.5, 0, 0.5, 1.0
  x = jnp.array([-2.0, -0.6, -0.2, 0.1, 0.3, 0.74, 0.76, 5.0])
  got = Q.uniform_quantize(x, 0.5, 1.0, 2)
  np.testing.assert_array_equal(got, [-0.5, -0.5, 0.0, 0.0, 0.5, 0.5, 1.0, 1.0])
  # half-to-even: 0.25 / 0.5 = 0.5 -> 0; 0.75 / 0.5 = 1.5 -> 2 (then + z)
  np.testing.assert_array_equal(Q.uniform_quantize(jnp.array([0.25, 0.75]), 0.5, 1.0, 2),
                                [0.0, 1.0])
  # a fractional zero point (RepQ-ViT's mean of zero points) shifts the range:
  # values (q - 0.5) * 0.5 for q = 0..3 -> -0.25 .. 1.25, still on multiples of Δ
  np.testing.assert_allclose(
      Q.uniform_quantize(jnp.array([0.6, -3.0, 9.0]), 0.5, 0.5, 2), [0.5, -0.25, 1.25])
  d, z = Q.uniform_params(-1.0, 2.0, 2)
  np.testing.assert_allclose([d, z], [1.0, 1.0])
  d, z = Q.uniform_params(3.0, 3.0, 4)  # zero-width range: Δ floor, no NaN
  assert float(d) == float(np.float32(Q.MIN_DELTA))
  np.testing.assert_allclose(Q.uniform_quantize(jnp.array([3.0]), d, z, 4), [3.0],
                             rtol=1e-6)


def _np_search(x, bits, pcts=Q.PERCENTILES):
  """numpy reference of the official per-tensor search (first least-MSE candidate)."""
  best, out = np.inf, None
  for p in pcts:
    hi, lo = np.quantile(x, p), np.quantile(x, 1 - p)
    d = max((hi - lo) / (2 ** bits - 1), Q.MIN_DELTA)
    z = np.round(-lo / d)
    xq = (np.clip(np.round(x / d) + z, 0, 2 ** bits - 1) - z) * d
    err = np.mean((xq - x) ** 2)
    if err < best:
      best, out = err, (d, z, p)
  return out


def test_uniform_search_picks_least_l2_candidate():
  rng = np.random.RandomState(0)
  # heavy tails: the widest candidate is not always best; three channels whose
  # winners differ (checked below)
  cols = [rng.standard_t(2, 5000), rng.normal(size=5000),
          np.concatenate([rng.normal(size=4990), 40 + rng.normal(size=10)])]
  x = np.stack(cols, axis=-1).astype(np.float32)            # (5000, 3)
  d, z = Q.uniform_search(jnp.asarray(x), 4, keep_axes=-1)  # per channel
  assert d.shape == z.shape == (1, 3)
  winners = set()
  for c in range(3):
    rd, rz, p = _np_search(x[:, c].astype(np.float64), 4)
    winners.add(p)
    np.testing.assert_allclose(d[0, c], rd, rtol=1e-4)
    np.testing.assert_allclose(z[0, c], rz)
  assert len(winners) >= 2, winners  # the search really chooses
  # per tensor (one group) and a 3-D weight with two output axes (like q/k/v)
  d, z = Q.uniform_search(jnp.asarray(x), 3)
  rd, rz, _ = _np_search(x.astype(np.float64).ravel(), 3)
  np.testing.assert_allclose([d.reshape(()), z.reshape(())], [rd, rz], rtol=1e-4)
  w = jnp.asarray(rng.normal(size=(16, 2, 3)).astype(np.float32))
  d, z = Q.uniform_search(w, 4, keep_axes=(1, 2))
  assert d.shape == (1, 2, 3)
  rd, rz, _ = _np_search(np.asarray(w)[:, 1, 2].astype(np.float64), 4)
  np.testing.assert_allclose([d[0, 1, 2], z[0, 1, 2]], [rd, rz], rtol=1e-4)


def test_log_sqrt2_grid_by_hand():
  # 3 bits: levels q = 0..7, x̂ = Δ 2^(-q/2); unclamped q >= 8 -> 0
  delta = 1.0
  x = jnp.array([1.0, 2 ** -0.5, 0.5, 2 ** -3.5, 2 ** -3.7, 2 ** -3.9, 0.0, 1.5,
                 2 ** -1.6])
  want = [1.0, 2 ** -0.5, 0.5, 2 ** -3.5, 2 ** -3.5, 0.0, 0.0, 1.0, 2 ** -1.5]
  np.testing.assert_allclose(Q.log_sqrt2_quantize(x, delta, 3), want, rtol=1e-6)
  # Δ scales the grid; 4 bits reach q = 15
  np.testing.assert_allclose(
      Q.log_sqrt2_quantize(jnp.array([0.3 * 2 ** -7.5, 0.3 * 2 ** -7.9]), 0.3, 4),
      [0.3 * 2 ** -7.5, 0.0], rtol=1e-6)


def test_log_sqrt2_search_picks_least_l2_quantile():
  p = jax.nn.softmax(3 * jax.random.normal(jax.random.key(0), (4, 2, 16, 16)), -1)
  d = Q.log_sqrt2_search(p, 4)
  x = np.asarray(p, np.float64).ravel()
  errs = []
  for q in Q.PERCENTILES:
    cand = np.quantile(x, q)
    errs.append(float(jnp.mean((Q.log_sqrt2_quantize(p, cand, 4) - p) ** 2)))
  best = int(np.argmin(errs))
  np.testing.assert_allclose(d, np.quantile(x, Q.PERCENTILES[best]), rtol=1e-5)


def test_bad_input():
  with pytest.raises(ValueError, match="bits"):
    Q.uniform_quantize(jnp.ones(3), 1.0, 0.0, 1)
  with pytest.raises(ValueError, match="bits"):
    Q.log_sqrt2_search(jnp.ones(3), 17)
  with pytest.raises(ValueError, match="keep axis 3"):
    Q.uniform_search(jnp.ones((2, 3)), 4, keep_axes=3)
