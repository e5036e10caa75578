"""Outlier statistics: exact merges across batches/devices vs numpy (s2d_jax/outliers.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2d_jax import capture
from s2d_jax import outliers as ol
from s2d_jax.models import vit
import ptq_fixtures  # the shared tiny-ViT helpers (tests/)

TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=(8, 8),
            pool_type="gap", head_zeroinit=False)


def np_reference(x):
  """Statistics of x (tokens..., C) computed directly in float64."""
  x = np.asarray(x, np.float64)
  flat = x.reshape(-1)
  mu = flat.mean()
  m2 = ((flat - mu) ** 2).sum()
  m4 = ((flat - mu) ** 4).sum()
  rows = x.reshape(-1, x.shape[-1])
  edges = np.concatenate([[0.0], 10.0 ** np.linspace(
      ol.HIST_LO, ol.HIST_HI, (ol.HIST_HI - ol.HIST_LO) * ol.HIST_PER_DECADE + 1),
                          [np.inf]])
  hist, _ = np.histogram(np.abs(flat), edges)
  return dict(n=flat.size, mean=mu, m2=m2, kurt=flat.size * m4 / m2 ** 2,
              amax=np.abs(flat).max(),
              tok_inf=np.abs(rows).max(-1).mean(), ch_min=rows.min(0),
              ch_max=rows.max(0), hist=hist, median=np.median(np.abs(flat)))


def _data(seed, b=6, n=5, c=7, offset=0.0):
  rs = np.random.RandomState(seed)
  x = rs.standard_t(4, size=(b, n, c)).astype(np.float32) + offset
  return x


def check(summary_or_stats, ref):
  s = ol._to_host(summary_or_stats)
  assert int(s.n) == ref["n"]
  np.testing.assert_allclose(s.mean, ref["mean"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s.m2, ref["m2"], rtol=1e-5)
  np.testing.assert_allclose(int(s.n) * s.m4 / s.m2 ** 2, ref["kurt"], rtol=1e-4)
  np.testing.assert_allclose(s.amax, ref["amax"], rtol=1e-6)
  np.testing.assert_allclose(s.tok_inf_sum / s.tokens, ref["tok_inf"], rtol=1e-5)
  np.testing.assert_allclose(s.ch_min, ref["ch_min"], rtol=1e-6)
  np.testing.assert_allclose(s.ch_max, ref["ch_max"], rtol=1e-6)
  # float32 log10 may move a value sitting on a bin edge by one bin
  assert np.abs(s.hist - ref["hist"]).sum() <= 2
  assert s.hist.sum() == ref["n"]


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_merge_over_batches_with_masks_matches_numpy(offset):
  xs = [_data(i, offset=offset) for i in range(3)]
  masks = [np.array([1, 1, 0, 1, 0, 1]), np.ones(6, int), np.array([0, 1, 0, 0, 0, 0])]
  total = None
  for x, m in zip(xs, masks):
    total = ol.merge_stats(total, ol.act_stats(jnp.asarray(x), jnp.asarray(m)))
  real = np.concatenate([x[m > 0] for x, m in zip(xs, masks)])
  check(total, np_reference(real))


@pytest.mark.parametrize("ndev", [1, 2, 8])
def test_pmap_reduce_matches_numpy(ndev):
  x = _data(7, b=8, offset=3.0)
  mask = np.array([1, 0, 1, 1, 1, 1, 0, 1])
  f = jax.pmap(lambda x, m: ol.reduce_stats(ol.act_stats(x, m), "d"),
               axis_name="d", devices=jax.devices()[:ndev])
  out = f(x.reshape(ndev, -1, 5, 7), mask.reshape(ndev, -1))
  for d in range(ndev):  # every device holds the same, global, result
    check(ol.finalize_reduced(jax.tree.map(lambda a: a[d], out)),
          np_reference(x[mask > 0]))


def test_median_massive_and_summary():
  hist = np.zeros(ol.NUM_BINS, np.int64)
  hist[ol._bin_index(jnp.float32(1.0))] = 3  # three values in the bin at 1.0
  assert 1.0 <= ol.hist_median(hist) <= 10 ** (1 / ol.HIST_PER_DECADE)
  assert np.isnan(ol.hist_median(np.zeros(ol.NUM_BINS)))
  rs = np.random.RandomState(0)
  x = (rs.randn(4, 64, 16) * 0.05).astype(np.float32)
  s = ol.summary(ol.act_stats(jnp.asarray(x)))
  assert not s["massive"]
  np.testing.assert_allclose(s["median_abs"], np.median(np.abs(x)), rtol=0.04)
  x[1, 3, 5] = 500.0
  s = ol.summary(ol.act_stats(jnp.asarray(x)))
  assert s["massive"] and s["max_abs"] == 500.0
  assert s["top1_median_ratio"] > 1000 and s["top_channels"][0] == 5
  assert s["channel_range_spread"] > 100
  np.testing.assert_allclose(s["kurtosis"], np_reference(x)["kurt"], rtol=1e-4)
  with pytest.raises(ValueError, match="mask of shape"):
    ol.act_stats(jnp.asarray(x), jnp.ones(3))


def np_pcdr(x, w, k_max, top_fraction=1e-3):
  """PCDR_k of pcdr.py's docstring in float64: X (tokens, rows) in matrix-view
  rows, W reshaped to (rows, cols); the ceil(top_fraction·T·cols) largest |A|."""
  x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
  w = np.asarray(w, np.float64).reshape(x.shape[1], -1)
  a = x @ w
  n_top = max(1, int(np.ceil(top_fraction * a.size)))
  idx = np.argsort(-np.abs(a).ravel(), kind="stable")[:n_top]
  j, c = np.divmod(idx, a.shape[1])
  u, s, vt = np.linalg.svd(w, full_matrices=False)
  r = min(k_max, s.size)
  comp = (x[j] @ u[:, :r]) * s[:r] * vt[:r, c].T          # (n_top, r)
  partial = np.abs(np.cumsum(comp, axis=1)).sum(0) / np.abs(a.ravel()[idx]).sum()
  return np.concatenate([partial, np.full(k_max - r, partial[-1])])


def _kernels_and_inputs(params, inputs, path=()):
  for k, v in inputs.items():
    if isinstance(v, dict):
      yield from _kernels_and_inputs(params[k], v, path + (k,))
    else:
      yield path + (k,), np.asarray(params[k]), np.asarray(v)


@pytest.fixture(scope="module")
def tiny():
  model = vit.Model(10, scan=False, **TINY)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  inputs = jax.jit(lambda p, x: capture.capture_matmul_inputs(
      model.apply, {"params": p}, x)[1])(params, x)
  return model, params, x, inputs


_loop_to_scan = ptq_fixtures.loop_to_scan


def test_model_stats_mask_and_scan_equals_loop(tiny):
  model, params, x, inputs = tiny
  mask = jnp.array([1, 0, 1, 1])
  f = jax.jit(ol.stats_apply(model.apply))
  st = f({"params": params}, mask, x)[1]
  summ = ol.summarize(ol.merge_stats(None, st))
  # the masked example does not count: garbage in its place changes nothing
  xg = x.at[1].set(1e3 * jax.random.normal(jax.random.key(9), x.shape[1:]))
  ref = f({"params": params}, mask, xg)[1]
  ref = ol.summarize(ol.merge_stats(None, ref))
  assert summ.keys() == ref.keys()
  for k in summ:
    np.testing.assert_allclose(summ[k]["max_abs"], ref[k]["max_abs"], rtol=1e-5)
    np.testing.assert_allclose(summ[k]["kurtosis"], ref[k]["kurtosis"], rtol=1e-4)
  assert "Transformer/encoderblock_1/output" in summ
  assert "Transformer/encoderblock_0/MlpBlock_0/Dense_1/input" in summ
  # direct check of one layer against the captured input (numpy reference)
  xin = inputs["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_1"]["kernel"]
  xin = xin[np.array([0, 2, 3])]
  r = np_reference(xin)
  s = summ["Transformer/encoderblock_0/MlpBlock_0/Dense_1/input"]
  np.testing.assert_allclose(s["kurtosis"], r["kurt"], rtol=1e-4)
  np.testing.assert_allclose(s["max_abs"], r["amax"], rtol=1e-6)
  # scan layout: same keys and numbers
  smodel = vit.Model(10, scan=True, **TINY)
  sp = _loop_to_scan(params, TINY["depth"])
  sst = jax.jit(ol.stats_apply(smodel.apply))({"params": sp}, mask, x)[1]
  ssum = ol.summarize(ol.merge_stats(None, sst))
  assert ssum.keys() == summ.keys()
  for k in summ:
    for f in ("max_abs", "kurtosis", "mean_token_inf_norm", "median_abs"):
      np.testing.assert_allclose(ssum[k][f], summ[k][f], rtol=1e-4, err_msg=k + f)


def test_weight_spectrum_and_pcdr(tiny):
  model, params, x, inputs = tiny
  spec = ol.weight_spectrum(params)
  k = params["Transformer"]["encoderblock_1"]["MultiHeadDotProductAttention_0"][
      "query"]["kernel"]  # (in, h, hd) -> (in, h*hd)
  sv = np.linalg.svd(np.asarray(k).reshape(k.shape[0], -1), compute_uv=False)
  e = spec["Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query"]
  np.testing.assert_allclose(e["top_sigma"], sv[:3], rtol=1e-4)
  np.testing.assert_allclose(e["sigma_ratio_12"], sv[0] / sv[1], rtol=1e-4)
  o = params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"][
      "out"]["kernel"]  # (h, hd, out) -> (h*hd, out)
  sv = np.linalg.svd(np.asarray(o).reshape(-1, o.shape[-1]), compute_uv=False)
  np.testing.assert_allclose(
      spec["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out"][
          "sigma_max"], sv[0], rtol=1e-4)
  sspec = ol.weight_spectrum(_loop_to_scan(params, TINY["depth"]))
  assert sspec.keys() == spec.keys()
  for key in spec:
    np.testing.assert_allclose(sspec[key]["top_sigma"], spec[key]["top_sigma"],
                               rtol=1e-5)
  pc = ol.pcdr_stats(params, inputs, 3)
  # every kernel (patch embedding conv, q/k/v/out, MLP, head) vs numpy
  kernels = {"/".join(p[:-1]): (w, x) for p, w, x in _kernels_and_inputs(
      params, inputs)}
  assert set(pc) == set(kernels) and len(pc) == 2 * 6 + 2
  for name, (w, xin) in kernels.items():
    np.testing.assert_allclose(pc[name], np_pcdr(xin, w, 3), rtol=1e-4, atol=1e-6,
                               err_msg=name)
