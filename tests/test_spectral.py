"""Tests for s2d_jax.spectral: matrix views and warm-started subspace iteration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2d_jax import spectral


def planted(rng, rows, cols, sigmas):
  """A (rows, cols) matrix with the given leading singular values (rest 0)."""
  u, _ = np.linalg.qr(rng.normal(size=(rows, rows)))
  v, _ = np.linalg.qr(rng.normal(size=(cols, cols)))
  r = min(rows, cols)
  s = np.zeros(r)
  s[:min(r, len(sigmas))] = sigmas[:r]
  return ((u[:, :r] * s) @ v[:, :r].T).astype(np.float32)


# ----------------------------------------------------------------------------
# Views.
# ----------------------------------------------------------------------------

VIEW_CASES = [
    # path, shape, (batch_ndim, rows, cols)
    (("MlpBlock_0", "Dense_0", "kernel"), (8, 16), (0, 8, 16)),
    (("head", "kernel"), (8, 5), (0, 8, 5)),
    (("MultiHeadDotProductAttention_0", "query", "kernel"), (8, 2, 4), (0, 8, 8)),
    (("MultiHeadDotProductAttention_0", "key", "kernel"), (8, 2, 4), (0, 8, 8)),
    (("MultiHeadDotProductAttention_0", "value", "kernel"), (8, 2, 4), (0, 8, 8)),
    (("MultiHeadDotProductAttention_0", "out", "kernel"), (2, 4, 8), (0, 8, 8)),
    (("MAPHead_0", "MultiHeadDotProductAttention_0", "out", "kernel"), (2, 3, 8), (0, 6, 8)),
    (("embedding", "kernel"), (2, 2, 3, 8), (0, 12, 8)),
    (("Transformer", "encoderblock", "MlpBlock_0", "Dense_1", "kernel"), (3, 16, 8), (1, 16, 8)),
    (("Transformer", "encoderblock", "MultiHeadDotProductAttention_0", "query", "kernel"),
     (3, 8, 2, 4), (1, 8, 8)),
    (("Transformer", "encoderblock", "MultiHeadDotProductAttention_0", "out", "kernel"),
     (3, 2, 4, 8), (1, 8, 8)),
    # Loop layout: 'encoderblock_0' is not the scan marker.
    (("Transformer", "encoderblock_0", "MlpBlock_0", "Dense_0", "kernel"), (8, 16), (0, 8, 16)),
]


@pytest.mark.parametrize("path,shape,expected", VIEW_CASES)
def test_default_views(path, shape, expected):
  view = spectral.matrix_view(path, shape)
  assert (view.batch_ndim, view.rows, view.cols) == expected
  x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
  m = view.to_matrix(x)
  assert m.shape == view.batch_shape + (view.rows, view.cols)
  np.testing.assert_array_equal(view.from_matrix(m), x)


@pytest.mark.parametrize("path,shape", [
    (("MlpBlock_0", "Dense_0", "bias"), (16,)),
    (("Transformer", "encoderblock", "MlpBlock_0", "Dense_0", "bias"), (3, 16)),
    (("Transformer", "encoderblock", "LayerNorm_0", "scale"), (3, 8)),
])
def test_no_view_for_vectors(path, shape):
  assert spectral.matrix_view(path, shape) is None


def test_views_match_layer_semantics():
  """x_rows @ W_mat reproduces attention q/out projections and a conv patch."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 8)).astype(np.float32)
  wq = rng.normal(size=(8, 2, 4)).astype(np.float32)
  vq = spectral.matrix_view(("att", "query", "kernel"), wq.shape)
  np.testing.assert_allclose(
      x @ np.asarray(vq.to_matrix(wq)),
      np.einsum("bi,ihd->bhd", x, wq).reshape(5, 8), rtol=1e-5, atol=1e-5)
  xo = rng.normal(size=(5, 2, 4)).astype(np.float32)
  wo = rng.normal(size=(2, 4, 8)).astype(np.float32)
  vo = spectral.matrix_view(("att", "out", "kernel"), wo.shape)
  np.testing.assert_allclose(
      xo.reshape(5, 8) @ np.asarray(vo.to_matrix(wo)),
      np.einsum("bhd,hdo->bo", xo, wo), rtol=1e-5, atol=1e-5)
  # Conv (kh, kw, cin, cout) on a 4x4 image, VALID, stride 2: output (0, 1) is
  # the (kh, kw, cin)-ordered patch at rows 0:2, cols 2:4 times W_mat.
  img = rng.normal(size=(1, 4, 4, 3)).astype(np.float32)
  wc = rng.normal(size=(2, 2, 3, 6)).astype(np.float32)
  vc = spectral.matrix_view(("embedding", "kernel"), wc.shape)
  out = jax.lax.conv_general_dilated(img, wc, (2, 2), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
  patch = img[0, 0:2, 2:4, :].reshape(-1)
  np.testing.assert_allclose(patch @ np.asarray(vc.to_matrix(wc)), out[0, 0, 1],
                             rtol=1e-5, atol=1e-5)


def test_user_views_dict_and_callable():
  path, shape = ("blk", "proj", "kernel"), (4, 3, 5)
  assert spectral.matrix_view(path, shape).rows == 12   # default conv rule
  v = spectral.matrix_view(path, shape, {r".*/proj/kernel": (0, 1)})
  assert (v.rows, v.cols) == (4, 15)
  v = spectral.matrix_view(path, shape, {r"other": (0, 1)})   # no match: default
  assert (v.rows, v.cols) == (12, 5)
  v = spectral.matrix_view(path, shape, {r".*proj.*": None})  # None: default
  assert (v.rows, v.cols) == (12, 5)
  v = spectral.matrix_view(path, shape, lambda p, s: spectral.ViewSpec(1, 1))
  assert (v.batch_ndim, v.rows, v.cols) == (1, 3, 5)
  v = spectral.matrix_view(path, shape, lambda p, s: None)
  assert (v.rows, v.cols) == (12, 5)


@pytest.mark.parametrize("spec", [(0, 3), (2, 1), (-1, 1), (0, 0), "bad"])
def test_invalid_user_view(spec):
  with pytest.raises(ValueError, match="blk/proj/kernel"):
    spectral.matrix_view(("blk", "proj", "kernel"), (4, 3, 5), {".*": spec})


def test_views_type_error():
  with pytest.raises(TypeError, match="views"):
    spectral.matrix_view(("a", "kernel"), (2, 2), views=3)


def test_inputs_to_rows_and_shape_errors():
  view = spectral.matrix_view(("encoderblock", "Dense_0", "kernel"), (3, 8, 4))
  x = jnp.ones((3, 2, 5, 8))
  assert view.inputs_to_rows(x).shape == (3, 10, 8)
  with pytest.raises(ValueError, match="rows=8"):
    view.inputs_to_rows(jnp.ones((3, 2, 5, 7)))
  with pytest.raises(ValueError, match="expected shape"):
    view.to_matrix(jnp.ones((3, 4, 8)))
  with pytest.raises(ValueError, match="expected shape"):
    view.from_matrix(jnp.ones((3, 4, 8)))


def test_select_kernels_default_and_mask():
  params = {
      "embedding": {"kernel": jnp.ones((2, 2, 3, 8)), "bias": jnp.ones(8)},
      "pos_embedding": jnp.ones((1, 4, 8)),
      "Embed_0": {"embedding": jnp.ones((10, 8))},
      "LayerNorm_0": {"scale": jnp.ones(8)},
      "Dense_0": {"kernel": jnp.ones((8, 8), jnp.bfloat16)},
      "quant": {"kernel": jnp.ones((8, 8), jnp.int8)},
      "vec": {"kernel": jnp.ones((8,))},
  }
  sel = spectral.select_kernels(params)
  assert list(sel) == ["Dense_0/kernel", "embedding/kernel"]
  assert sel["embedding/kernel"][1].rows == 12
  mask = jax.tree.map(lambda _: False, params)
  mask["Embed_0"]["embedding"] = True
  assert list(spectral.select_kernels(params, mask)) == ["Embed_0/embedding"]
  assert list(spectral.select_kernels(
      params, lambda p: {**jax.tree.map(lambda _: False, p), "Dense_0": True})) == ["Dense_0/kernel"]
  # A prefix True skips leaves without a view / non-float leaves.
  assert list(spectral.select_kernels(
      params, {**jax.tree.map(lambda _: False, params), "embedding": True, "quant": True,
               "vec": True})) == ["embedding/kernel"]
  mask["quant"]["kernel"] = True
  with pytest.raises(ValueError, match="quant/kernel.*int8"):
    spectral.select_kernels(params, mask)
  mask["quant"]["kernel"] = False
  mask["vec"]["kernel"] = True
  with pytest.raises(ValueError, match="vec/kernel.*no matrix view"):
    spectral.select_kernels(params, mask)
  with pytest.raises(ValueError, match="mask"):
    spectral.select_kernels(params, {"Dense_0": True})


# ----------------------------------------------------------------------------
# Subspace iteration.
# ----------------------------------------------------------------------------


TRACK = jax.jit(spectral.track, static_argnums=(0, 3))


def _svd_ref(w, k):
  u, s, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
  return u[:, :k], s[:k], vt[:k].T


@pytest.mark.parametrize("rows,cols,k", [(12, 7, 1), (7, 12, 3), (9, 9, 2), (6, 2, 3)])
def test_track_matches_svd(rows, cols, k):
  rng = np.random.default_rng(rows * 100 + cols)
  mats = np.stack([planted(rng, rows, cols, 3.0 * 0.6 ** np.arange(10)) for _ in range(2)])
  view = spectral.MatrixView(mats.shape, 1, 1)
  basis = spectral.init_basis(view, k)
  keff = min(k, rows, cols)
  assert basis.shape == (2, keff, min(rows, cols))
  t = TRACK(view, jnp.asarray(mats), basis, 80)
  for i in range(2):
    u, s, v = _svd_ref(mats[i], keff)
    np.testing.assert_allclose(t.s[i], s, rtol=1e-5)
    # Rows are singular vectors: W_k = sum_i s_i u_i v_i^T.
    np.testing.assert_allclose(np.asarray(t.u[i]).T * s @ np.asarray(t.v[i]),
                               u * s @ v.T, atol=1e-5)
    np.testing.assert_allclose(np.asarray(t.basis[i]) @ np.asarray(t.basis[i]).T,
                               np.eye(keff), atol=1e-5)
  assert bool(t.ok.all()) and bool(t.valid.all())


def test_rayleigh_ritz_sigma_more_accurate_than_subspace():
  """With an inexact subspace (angle theta), sigma errors are O(theta^2)."""
  rng = np.random.default_rng(1)
  w = planted(rng, 20, 10, [5.0, 4.0, 3.0, 1.0])
  u, s, v = _svd_ref(w, 2)
  q0 = np.linalg.qr(v + 0.05 * rng.normal(size=v.shape))[0]
  view = spectral.MatrixView(w.shape, 0, 1)
  t = TRACK(view, jnp.asarray(w), jnp.asarray(q0.T, jnp.float32), 1)
  tv = np.asarray(t.v).T
  angle = np.linalg.norm(v - tv @ (tv.T @ v))
  rel = np.abs(np.asarray(t.s) - s) / s
  assert angle > 1e-3          # the subspace is not exact after one iteration,
  assert rel.max() < angle ** 2  # but the sigmas are accurate to second order.


def test_top_k_cold_start():
  rng = np.random.default_rng(2)
  w = planted(rng, 16, 24, [6.0, 3.0, 2.0, 1.0, 0.5])
  u, s, v = jax.jit(spectral.top_k, static_argnums=(1, 2))(jnp.asarray(w), 3, 60)
  np.testing.assert_allclose(s, _svd_ref(w, 3)[1], rtol=1e-5)
  assert u.shape == (16, 3) and v.shape == (24, 3)


def test_track_rank_deficient_zero_and_nonfinite():
  rng = np.random.default_rng(3)
  rank1 = planted(rng, 8, 6, [2.0])
  zero = np.zeros((8, 6), np.float32)
  bad = planted(rng, 8, 6, [2.0, 1.0])
  bad[3, 2] = np.nan
  inf = planted(rng, 8, 6, [2.0, 1.0])
  inf[0, 0] = np.inf
  mats = jnp.asarray(np.stack([rank1, zero, bad, inf]))
  view = spectral.MatrixView(mats.shape, 1, 1)
  basis = spectral.init_basis(view, 3, seed=4)
  t = TRACK(view, mats, basis, 30)
  for x in t[:4]:
    assert np.all(np.isfinite(np.asarray(x)))
  np.testing.assert_allclose(t.s[0], [2.0, 0.0, 0.0], atol=1e-5)
  np.testing.assert_array_equal(t.s[1:], 0.0)
  np.testing.assert_array_equal(t.ok, [True, False, False, False])
  np.testing.assert_array_equal(t.valid, [True, True, False, False])
  np.testing.assert_array_equal(t.basis[1:], basis[1:])   # basis kept
  q = np.asarray(t.basis[0])
  np.testing.assert_allclose(q @ q.T, np.eye(3), atol=1e-5)   # still orthonormal


def test_init_basis_deterministic_and_path_keys():
  view = spectral.MatrixView((3, 10, 6), 1, 1)
  a = spectral.init_basis(view, 2, 0, "a/kernel")
  b = spectral.init_basis(view, 2, 0, "a/kernel")
  c = spectral.init_basis(view, 2, 0, "b/kernel")
  d = spectral.init_basis(view, 2, 1, "a/kernel")
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c) and not np.allclose(a, d)
  assert a.dtype == jnp.float32 and a.shape == (3, 2, 6)
  np.testing.assert_allclose(np.einsum("lkq,ljq->lkj", a, a), np.broadcast_to(np.eye(2), (3, 2, 2)),
                             atol=1e-6)


def test_kernel_mask_selects_kernels_and_honours_exclude():
  params = {
      "Transformer": {"encoderblock": {
          "MlpBlock_0": {"Dense_0": {"kernel": jnp.zeros((2, 4, 8)),
                                     "bias": jnp.zeros((2, 8))}},
          "LayerNorm_0": {"scale": jnp.zeros((2, 4))}}},
      "embedding": {"kernel": jnp.zeros((2, 2, 3, 4)), "bias": jnp.zeros((4,))},
      "head": {"kernel": jax.ShapeDtypeStruct((4, 3), jnp.float32)},
      "pos_embedding": jnp.zeros((1, 4, 4)),
      "ids": {"kernel": jnp.zeros((4, 3), jnp.int32)},
  }
  m = spectral.kernel_mask(params)
  assert m["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"] == {
      "kernel": True, "bias": False}
  assert m["embedding"] == {"kernel": True, "bias": False}
  assert m["head"]["kernel"] is True and m["pos_embedding"] is False
  assert m["ids"]["kernel"] is False  # integer leaves are not kernels
  m = spectral.kernel_mask(params, exclude=(r"^head/", "embedding"))
  assert m["head"]["kernel"] is False and m["embedding"]["kernel"] is False
  assert m["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"] is True
  with pytest.raises(ValueError, match=r"'\('"):
    spectral.kernel_mask(params, exclude=("(",))
