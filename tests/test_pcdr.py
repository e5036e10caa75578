"""Tests for s2d_jax.pcdr against a numpy reference and planted outlier layers."""

import jax.numpy as jnp
import numpy as np
import pytest

from s2d_jax import optim, pcdr


def np_pcdr(x, w, k_max, n_top):
  """PCDR_k = sum_S |A^(k)| / sum_S |A| over the n_top largest |A| entries (float64)."""
  x, w = np.asarray(x, np.float64).reshape(-1, w.shape[0]), np.asarray(w, np.float64)
  a = x @ w
  idx = np.argsort(-np.abs(a).ravel())[:n_top]
  j, c = np.unravel_index(idx, a.shape)
  u, s, vt = np.linalg.svd(w, full_matrices=False)
  out = []
  for k in range(1, k_max + 1):
    kk = min(k, len(s))
    ak = ((x @ u[:, :kk]) * s[:kk]) @ vt[:kk]
    out.append(np.abs(ak[j, c]).sum() / np.abs(a[j, c]).sum())
  return np.array(out)


def outlier_layer(rng, rank, rows=16, cols=12, tokens=64, n_out=4):
  """W with `rank` dominant components (sigma 6, 5, ...) on e_0.., plus outlier tokens.

  Outlier tokens are 10 * sum_{r<rank} e_r, so the top outputs A_jc (c < rank)
  need exactly `rank` components: PCDR_1 = 6/(6+5) < tau for rank 2.
  """
  w = 0.01 * rng.normal(size=(rows, cols))
  for r in range(rank):
    w[r, r] = 6.0 - r
  x = 0.1 * rng.normal(size=(tokens, rows))
  x[:n_out, :rank] += 10.0
  return x.astype(np.float32), w.astype(np.float32)


@pytest.mark.parametrize("seed,n_top,k_max", [(0, 1, 3), (1, 7, 2), (2, 40, 3), (3, 768, 4)])
def test_pcdr_matches_numpy(seed, n_top, k_max):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(4, 16, 16)).astype(np.float32)
  w = rng.normal(size=(16, 12)).astype(np.float32)
  got = pcdr.pcdr(jnp.asarray(x), jnp.asarray(w), k_max, num_outputs=n_top)
  np.testing.assert_allclose(got, np_pcdr(x, w, k_max, n_top), rtol=1e-4)


def test_single_output_is_the_papers_ratio():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(10, 6)).astype(np.float64)
  w = rng.normal(size=(6, 5)).astype(np.float64)
  a = x @ w
  j, c = np.unravel_index(np.argmax(np.abs(a)), a.shape)
  u, s, vt = np.linalg.svd(w)
  # A_jc = sum_r sigma_r (x_j . u_r) v_rc
  terms = [s[r] * (x[j] @ u[:, r]) * vt[r, c] for r in range(5)]
  np.testing.assert_allclose(sum(terms), a[j, c], rtol=1e-10)
  want = [abs(sum(terms[:k])) / abs(a[j, c]) for k in (1, 2, 3)]
  got = pcdr.pcdr(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), 3, num_outputs=1)
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_planted_outlier_layers_select_their_rank():
  rng = np.random.default_rng(5)
  for rank in (1, 2, 3):
    x, w = outlier_layer(rng, rank)
    r = pcdr.pcdr(jnp.asarray(x), jnp.asarray(w), 3, num_outputs=4 * rank)
    np.testing.assert_allclose(r, np_pcdr(x, w, 3, 4 * rank), rtol=1e-4)
    assert int(pcdr.k_target(r, 0.95)) == rank, (rank, r)


def test_flat_spectrum_is_not_regularised():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(64, 16)).astype(np.float32)
  w = rng.normal(size=(16, 12)).astype(np.float32)
  r = pcdr.pcdr(jnp.asarray(x), jnp.asarray(w), 3, num_outputs=8)
  assert np_pcdr(x, w, 3, 8)[-1] < 0.95
  assert int(pcdr.k_target(r, 0.95)) == 0


def test_k_target_hand_values():
  r = jnp.array([[0.5, 0.96, 0.99], [0.97, 0.1, 0.2], [0.1, 0.2, 0.3], [0.5, 0.95, 0.2]])
  np.testing.assert_array_equal(pcdr.k_target(r, 0.95), [2, 1, 0, 2])
  np.testing.assert_array_equal(pcdr.k_target(r, 0.4), [1, 1, 0, 1])
  assert pcdr.k_target(r, 0.95).dtype == jnp.int32


def test_zero_layer_and_rank_below_k_max():
  x = jnp.ones((5, 4))
  np.testing.assert_array_equal(pcdr.pcdr(x, jnp.zeros((4, 3)), 3, num_outputs=2), 0.0)
  rng = np.random.default_rng(7)
  xs = rng.normal(size=(20, 8)).astype(np.float32)
  w = rng.normal(size=(8, 2)).astype(np.float32)       # rank 2 < k_max
  r = pcdr.pcdr(jnp.asarray(xs), jnp.asarray(w), 3, num_outputs=3)
  np.testing.assert_allclose(r, np_pcdr(xs, w, 3, 3), rtol=1e-4)
  np.testing.assert_allclose(r[1:], 1.0, rtol=1e-4)    # all components included


def test_num_top_outputs():
  assert pcdr.num_top_outputs(10_000, 1e-3, None) == 10
  assert pcdr.num_top_outputs(10, 1e-3, None) == 1
  assert pcdr.num_top_outputs(10, 1e-3, 50) == 10
  assert pcdr.num_top_outputs(1001, 1e-3, None) == 2


@pytest.mark.parametrize("call,exc,msg", [
    (lambda: pcdr.pcdr(jnp.ones((3, 4)), jnp.ones((4,))), ValueError, "rows, cols"),
    (lambda: pcdr.pcdr(jnp.ones((3, 5)), jnp.ones((4, 2))), ValueError, "rows"),
    (lambda: pcdr.pcdr(jnp.ones((3, 4)), jnp.ones((4, 2)), 0), ValueError, "k_max"),
    (lambda: pcdr.pcdr(jnp.ones((0, 4)), jnp.ones((4, 2))), ValueError, "no tokens"),
    (lambda: pcdr.pcdr(jnp.ones((3, 4)), jnp.ones((4, 2)), top_fraction=0.0), ValueError,
     "top_fraction"),
    (lambda: pcdr.pcdr(jnp.ones((3, 4)), jnp.ones((4, 2)), num_outputs=0), ValueError,
     "num_outputs"),
])
def test_pcdr_errors(call, exc, msg):
  with pytest.raises(exc, match=msg):
    call()


def _tree(rng):
  """Scan Dense layer 0: rank-1 outliers, layer 1: rank-2; attention query: rank 3; head: flat."""
  x0, w0 = outlier_layer(rng, 1)
  x1, w1 = outlier_layer(rng, 2)
  xq, wq = outlier_layer(rng, 3)
  xh = rng.normal(size=(64, 16)).astype(np.float32)
  wh = rng.normal(size=(16, 12)).astype(np.float32)
  params = {
      "Transformer": {"encoderblock": {"MlpBlock_0": {"Dense_0": {
          "kernel": jnp.asarray(np.stack([w0, w1])), "bias": jnp.zeros((2, 12))}}}},
      "MultiHeadDotProductAttention_0": {"query": {"kernel": jnp.asarray(wq.reshape(16, 3, 4))}},
      "head": {"kernel": jnp.asarray(wh), "bias": jnp.zeros(12)},
  }
  inputs = {
      "Transformer": {"encoderblock": {"MlpBlock_0": {"Dense_0": {
          "kernel": jnp.asarray(np.stack([x0, x1]).reshape(2, 4, 16, 16))}}}},
      "MultiHeadDotProductAttention_0": {"query": {"kernel": jnp.asarray(xq.reshape(4, 16, 16))}},
      "head": {"kernel": jnp.asarray(xh)},
  }
  return params, inputs


def test_select_active_tree_and_set_active():
  params, inputs = _tree(np.random.default_rng(8))
  scan = "Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"
  query = "MultiHeadDotProductAttention_0/query/kernel"
  ratios = pcdr.measure(params, inputs, 3, num_outputs=12)
  assert ratios[scan].shape == (2, 3) and ratios["head/kernel"].shape == (3,)
  x0 = np.asarray(inputs["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"][1])
  w0 = np.asarray(params["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"][1])
  np.testing.assert_allclose(ratios[scan][1], np_pcdr(x0, w0, 3, 12), rtol=1e-4)
  active = pcdr.select_active(params, inputs, k_max=3, tau=0.95, num_outputs=12)
  assert set(active) == {scan, query, "head/kernel"}
  np.testing.assert_array_equal(active[scan], [1, 2])
  assert int(active[query]) == 3
  assert int(active["head/kernel"]) == 0
  assert active[scan].dtype == jnp.int32
  state = optim.s2d(k=1, k_max=3, init_iters=0).init(params)
  state = optim.set_active(state, active)
  counts = optim.active_counts(state)
  np.testing.assert_array_equal(counts[scan], [1, 2])
  assert int(counts["head/kernel"]) == 0 and int(counts[query]) == 3
  # A mask excluding the head: no entry for it.
  mask = {"Transformer": True, "MultiHeadDotProductAttention_0": True, "head": False}
  assert "head/kernel" not in pcdr.select_active(params, inputs, mask=mask, num_outputs=12)


def test_select_active_errors():
  params, inputs = _tree(np.random.default_rng(9))
  bad = dict(inputs, nothere={"kernel": jnp.ones((3, 16))})
  with pytest.raises(KeyError, match="nothere/kernel"):
    pcdr.select_active(params, bad)
  bad = dict(inputs, head={"kernel": jnp.ones((3, 15))})
  with pytest.raises(ValueError, match="head/kernel.*rows=16"):
    pcdr.select_active(params, bad)
  bad = dict(inputs)
  bad["Transformer"] = {"encoderblock": {"MlpBlock_0": {"Dense_0": {"kernel": jnp.ones((3, 5, 16))}}}}
  with pytest.raises(ValueError, match="Dense_0/kernel"):
    pcdr.select_active(params, bad)
