"""ERQ (Aqer, Wqer) and GPTQ: the linear algebra against numpy references of the
official loops, and the end-to-end methods on the planted-outlier ViT."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from s2d_jax import ptq
from s2d_jax.ptq import erq
from s2d_jax.ptq import error_reduction as er
from s2d_jax.ptq import gptq
from s2d_jax.ptq import ops

import ptq_fixtures as fx


# --------------------------------------------------------------- references

def _np_quant(w, s, z, qmax, how="round"):
  r = {"round": np.round, "floor": np.floor, "ceil": np.ceil}[how]
  return (np.clip(r(w / s) + z, 0, qmax) - z) * s


def _np_refine(err_r, err_f, err_c, c, steps=100):
  """The official rounding refinement, row = output channel, float64."""
  delta = err_r.copy()
  fail = np.zeros(len(delta), bool)
  count = 0
  while count < steps and np.sum(~fail) > 0:
    count += 1
    grad = (2 * c @ delta.T).T
    grad[~(delta * grad > 0)] = 0
    k = int(np.max(np.minimum(np.sum(grad != 0, axis=1), 1)))
    if k == 0:
      continue
    j = np.argmax(np.abs(grad), axis=1)
    r = np.arange(len(delta))
    v = delta[r, j] - grad[r, j]
    v = np.where(np.abs(v - err_c[r, j]) <= np.abs(v - err_f[r, j]),
                 err_c[r, j], err_f[r, j])
    before = np.einsum("oi,ij,oj->o", delta, c, delta)
    old = delta[r, j].copy()
    delta[r, j] = v
    after = np.einsum("oi,ij,oj->o", delta, c, delta)
    fail = after > before
    delta[r[fail], j[fail]] = old[fail]
  return delta


def _np_wqer(w, b, xq, s, z, qmax, lam, refine=True):
  """The official Wqer loop in the torch layout (out, in+1), float64."""
  cur = np.concatenate([w, b[None]], 0).T.copy()
  a = np.concatenate([xq, np.ones((len(xq), 1))], 1)
  s = np.concatenate([np.broadcast_to(s, w.shape), np.ones((1, w.shape[1]))], 0).T
  z = np.concatenate([np.broadcast_to(z, w.shape), np.zeros((1, w.shape[1]))], 0).T
  mask = np.ones(cur.shape[1], bool)
  while mask.sum() > 1:
    nq = mask.sum() // 2
    e = {h: _np_quant(cur, s, z, qmax, h) - cur for h in ("round", "floor", "ceil")}
    for h in e:
      e[h][:, -1] = 0
    blk = np.arange((~mask).sum(), (~mask).sum() + nq)
    if refine:
      c = np.outer(a[:, blk].mean(0), a[:, blk].mean(0)) + np.cov(a[:, blk].T)
      e["round"][:, blk] = _np_refine(e["round"][:, blk], e["floor"][:, blk],
                                      e["ceil"][:, blk], c)
    mask[blk] = False
    rem = np.nonzero(mask)[0]
    i1, i2 = a[:, blk], a[:, rem]
    d1 = e["round"][:, blk]
    d2 = -np.linalg.solve(i2.T @ i2 + lam * np.eye(len(rem)), i2.T @ i1 @ d1.T)
    cur[:, rem] += d2.T
    cur[:, blk] += d1
  return cur[:, :-1].T, cur[:, -1]


def _np_gptq(w, h, s, z, qmax, percdamp=0.01):
  """Unblocked OBS column loop (GPTQ Alg. 1 without lazy batches), float64."""
  w = w.copy()
  h = h + percdamp * np.mean(np.diag(h)) * np.eye(len(h))
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  q = np.zeros_like(w)
  for i in range(len(w)):
    q[i] = _np_quant(w[i], s[0], z[0], qmax)
    e = (w[i] - q[i]) / u[i, i]
    w[i:] -= np.outer(u[i, i:], e)
  return q


def _correlated(rng, n, d, outlier=None):
  mix = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
  x = rng.normal(size=(n, d)) @ mix + rng.normal(size=d)
  if outlier is not None:
    x[:, outlier] *= 8.0
  return x


def _moments(xq, x, batches=3):
  m = None
  parts_f = [None] * batches if x is None else np.array_split(x, batches)
  for part_q, part_f in zip(np.array_split(xq, batches), parts_f):
    mb = er.batch_moments(jnp.asarray(part_q, jnp.float32),
                          None if part_f is None else jnp.asarray(part_f, jnp.float32))
    m = mb if m is None else er.add_moments(m, mb)
  return m


# -------------------------------------------------------------------- Aqer

@pytest.mark.parametrize("bias", [True, False])
def test_aqer_equals_numpy_ridge_and_lowers_error(bias):
  rng = np.random.default_rng(0)
  x = _correlated(rng, 300, 6)
  xq = np.clip(np.round(x * 2) / 2, -1.5, 1.5)  # a coarse, clipping grid
  w = rng.normal(size=(6, 5))
  b = rng.normal(size=5) if bias else None
  lam = 3.0
  new_w, new_b = er.aqer(w, b, _moments(xq, x), lam)
  # numpy: A = [x̄, 1], Y = y_float − A·[W; b], β = (AᵀA + λI)⁻¹AᵀY
  ones = np.ones((300, 1))
  a = np.concatenate([xq, ones], 1) if bias else xq
  f = np.concatenate([x, ones], 1) if bias else x
  wc = np.concatenate([w, b[None]], 0) if bias else w
  y = f @ wc
  beta = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (y - a @ wc))
  want = wc + beta
  got = np.concatenate([new_w, new_b[None]], 0) if bias else np.asarray(new_w)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
  assert (new_b is None) == (not bias)
  # the layer's output error under activation quantization goes down
  before = np.sum((a @ wc - y) ** 2)
  after = np.sum((a @ got - y) ** 2)
  assert after < 0.8 * before, (before, after)


def test_moments_stream_and_errors():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 7, 4))               # leading axes are rows
  m = er.batch_moments(jnp.asarray(x), jnp.asarray(2 * x))
  a = np.concatenate([x.reshape(14, 4), np.ones((14, 1))], 1)
  f = np.concatenate([2 * x.reshape(14, 4), np.ones((14, 1))], 1)
  np.testing.assert_allclose(m.aa, a.T @ a, rtol=1e-5)
  np.testing.assert_allclose(m.af, a.T @ f, rtol=1e-5)
  assert float(m.count) == 14
  assert er.add_moments(m, er.batch_moments(jnp.asarray(x))).af is None
  with pytest.raises(ValueError, match="x_float"):
    er.batch_moments(jnp.ones((3, 4)), jnp.ones((3, 5)))
  with pytest.raises(ValueError, match="af"):
    er.aqer(jnp.ones((4, 2)), None, er.Moments(m.aa), 1.0)
  with pytest.raises(ValueError, match=r"\(6, 6\)"):
    er.aqer(jnp.ones((5, 2)), None, m, 1.0)


# ------------------------------------------------------------------- grids

def test_grid_quantize_hand_computed():
  w = jnp.array([-1.0, -0.26, 0.0, 0.24, 0.26, 0.5, 10.0, 0.125, 0.375])
  s, z, qmax = 0.25, 4.0, 7
  np.testing.assert_array_equal(
      er.grid_quantize(w, s, z, qmax),   # round half to even: 0.5 -> 0, 1.5 -> 2
      [-1.0, -0.25, 0.0, 0.25, 0.25, 0.5, 0.75, 0.0, 0.5])
  np.testing.assert_array_equal(
      er.grid_quantize(w, s, z, qmax, "floor"),
      [-1.0, -0.5, 0.0, 0.0, 0.25, 0.5, 0.75, 0.0, 0.25])
  np.testing.assert_array_equal(
      er.grid_quantize(w, s, z, qmax, "ceil"),
      [-1.0, -0.25, 0.0, 0.25, 0.5, 0.5, 0.75, 0.25, 0.5])
  with pytest.raises(ValueError, match="rounding"):
    er.grid_quantize(w, s, z, qmax, "stochastic")
  # GPTQ's per-column min–max grid: range always holds 0; zero columns [-1, 1]
  s, z = er.minmax_grid(jnp.array([[0.5, 0.0, -3.0], [1.5, 0.0, -1.5]]), 2)
  np.testing.assert_allclose(s, [[0.5, 2 / 3, 1.0]], rtol=1e-6)
  np.testing.assert_array_equal(z, [[0.0, 2.0, 3.0]])


def test_torch_row_order_of_a_conv():
  """Flax conv rows (kh, kw, cin) -> PyTorch's (cin, kh, kw) flattening."""
  from s2d_jax import spectral
  conv = er.Layer("embedding", "Conv", spectral.MatrixView((2, 3, 4, 5), 0, 3),
                  True, 1, 4, 0, "embedding")
  k = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)       # (kh, kw, cin, cout)
  perm = er.torch_row_order(conv)
  np.testing.assert_array_equal(k.reshape(24, 5)[perm],
                                k.transpose(2, 0, 1, 3).reshape(24, 5))
  dense = er.Layer("d", "Dense", spectral.MatrixView((4, 5), 0, 1), True, 1, 2, 0, "d")
  assert er.torch_row_order(dense) is None


def test_halves_schedule():
  assert er.halves(1) == []
  assert er.halves(2) == [(0, 1)]
  assert er.halves(5) == [(0, 2), (2, 3), (3, 4)]
  h = er.halves(385)   # 384 inputs + bias: the bias row is never in a block
  assert h[:3] == [(0, 192), (192, 288), (288, 336)]
  assert h[-1][1] == 384 and all(b[0] == a[1] for a, b in zip(h, h[1:]))


# -------------------------------------------------------------------- Wqer

def test_refine_rounding_matches_official_loop_and_never_increases_proxy():
  rng = np.random.default_rng(2)
  k, n_out = 12, 40
  x = _correlated(rng, 200, k)
  c = np.outer(x.mean(0), x.mean(0)) + np.cov(x.T)
  w = rng.normal(size=(k, n_out))
  s, z = np.full((1, n_out), 0.3), np.full((1, n_out), 8.0)
  qf, qc, qr = (_np_quant(w, s, z, 15, h) for h in ("floor", "ceil", "round"))
  up0 = qr == qc
  up, steps = er.refine_rounding(qf - w, qc - w, up0, c)
  got = np.where(np.asarray(up), qc - w, qf - w)
  want = _np_refine((qr - w).T, (qf - w).T, (qc - w).T, c).T
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert 0 < int(steps) <= 100
  p0 = np.einsum("io,ij,jo->o", qr - w, c, qr - w)
  p1 = np.einsum("io,ij,jo->o", got, c, got)
  assert np.all(p1 <= p0 + 1e-9) and np.any(p1 < p0 - 1e-3)
  np.testing.assert_allclose(er.proxy(jnp.asarray(got), jnp.asarray(c)), p1,
                             rtol=1e-4)
  # max_steps bounds the number of moves per channel
  up1, steps1 = er.refine_rounding(qf - w, qc - w, up0, c, max_steps=1)
  assert int(steps1) == 1
  assert np.all(np.sum(np.asarray(up1) != up0, axis=0) <= 1)


def _layer(seed, d=10, n_out=7, n=400):
  rng = np.random.default_rng(seed)
  x = _correlated(rng, n, d, outlier=3)
  xq = np.round(x * 4) / 4
  w = rng.normal(size=(d, n_out)) * 0.5
  b = rng.normal(size=n_out)
  lo, hi = w.min(0, keepdims=True), w.max(0, keepdims=True)
  s = (hi - lo) / 15
  z = np.round(-lo / s)
  return x, xq, w, b, s, z


def test_wqer_matches_official_loop_on_grid_and_beats_rounding():
  x, xq, w, b, s, z = _layer(3)
  lam = 10.0
  aa = _moments(xq, None).aa
  wq, bq = er.wqer(w, b, aa, s, z, 15, lam)
  want_w, want_b = _np_wqer(w, b, xq, s, z, 15, lam)
  np.testing.assert_allclose(wq, want_w, atol=1e-4)
  np.testing.assert_allclose(bq, want_b, rtol=1e-3, atol=1e-3)
  wq = np.asarray(wq)
  np.testing.assert_array_equal(wq, er.grid_quantize(wq, s, z, 15))  # on the grid
  y = xq @ w + b
  err = lambda ww, bb: np.sum((xq @ ww + bb - y) ** 2)
  rtn = err(_np_quant(w, s, z, 15), b)
  assert err(wq, np.asarray(bq)) < 0.9 * rtn
  # without refinement (the patch-embedding path) still on the grid, and worse
  wq0, bq0 = er.wqer(w, b, aa, s, z, 15, lam, refine=False)
  want0 = _np_wqer(w, b, xq, s, z, 15, lam, refine=False)
  np.testing.assert_allclose(wq0, want0[0], atol=1e-4)
  assert err(np.asarray(wq0), np.asarray(bq0)) < rtn


def test_wqer_without_bias_rounds_the_last_row():
  x, xq, w, _, s, z = _layer(4, d=5)
  wq, bq = er.wqer(w, None, _moments(xq, None).aa, s, z, 15, 1.0)
  assert bq is None
  wq = np.asarray(wq)
  np.testing.assert_array_equal(wq, er.grid_quantize(wq, s, z, 15))
  assert not np.allclose(wq[:-1], _np_quant(w, s, z, 15)[:-1])  # compensated


# -------------------------------------------------------------------- GPTQ

def test_gptq_matches_unblocked_obs_loop():
  rng = np.random.default_rng(5)
  d, n_out = 10, 6
  x = _correlated(rng, 300, d)
  x[:, 7] = 0.0                                  # a dead input
  w = rng.normal(size=(d, n_out))
  h = x.T @ x
  s, z = (np.asarray(a) for a in er.minmax_grid(jnp.asarray(w), 4))
  q = er.gptq(w, h, s, z, 15, blocksize=4)       # ragged blocks 4, 4, 2
  hd = h.copy()
  hd[7, 7] = 1.0
  wd = w.copy()
  wd[7] = 0.0
  want = _np_gptq(wd, hd, s, z, 15)
  np.testing.assert_allclose(q, want, atol=1e-5)
  np.testing.assert_array_equal(q, er.grid_quantize(q, s, z, 15))
  err = lambda qq: np.sum((x @ (qq - w)) ** 2)
  assert err(np.asarray(q)) < 0.8 * err(_np_quant(w, s, z, 15))
  with pytest.raises(ValueError, match="Hessian"):
    er.gptq(w, h[:5, :5], s, z, 15)


# ------------------------------------------------------- ERQ weight grids

def _np_weight_grid(row, bits):
  """The official per-channel search (init_quantization_scale, weights)."""
  qmax, best, out = 2 ** bits - 1, 1e10, None
  for pct in erq.WEIGHT_QUANTILES:
    hi, lo = np.quantile(row, pct), np.quantile(row, 1.0 - pct)
    s = (hi - lo) / qmax
    z = np.round(-lo / s)
    score = np.mean((_np_quant(row, s, z, qmax) - row) ** 2)
    if score < best:
      best, out = score, (s, z)
  return out


def _np_dual_rows(w_torch, n_top):
  """The official two_part split on a torch-layout (out, in) weight."""
  from collections import Counter
  counts = Counter()
  for row in w_torch:
    pos = np.percentile(row[row > 0], 99)
    neg = np.percentile(row[row < 0], 1)
    counts.update(np.unique(np.nonzero((row > pos) | (row < neg))[0]).tolist())
  return sorted(i for i, _ in counts.most_common(n_top))


def test_weight_grid_and_dual_split_match_the_official_search():
  rng = np.random.default_rng(6)
  w = rng.standard_t(3, size=(64, 45)).astype(np.float32)   # heavy tails
  w[5] *= 6.0                                   # an outlier input row
  s, z = erq.weight_grid(jnp.asarray(w), 4)
  for o in range(w.shape[1]):
    ws, wz = _np_weight_grid(w[:, o].astype(np.float64), 4)
    np.testing.assert_allclose(s[0, o], ws, rtol=1e-5)
    assert z[0, o] == wz
  ds, dz, top = (np.asarray(a) for a in erq.dual_weight_grid(jnp.asarray(w), 4,
                                                             45 // 20))
  assert np.nonzero(top)[0].tolist() == _np_dual_rows(w.T, 45 // 20)
  assert top[5]
  rest = np.nonzero(~top)[0]
  for o in range(w.shape[1]):                   # each part: the official search
    for rows in (np.nonzero(top)[0], rest):
      ws, wz = _np_weight_grid(w[rows, o].astype(np.float64), 4)
      np.testing.assert_allclose(ds[rows, o], ws, rtol=1e-5)
      np.testing.assert_array_equal(dz[rows, o], wz)
  # the dual grid fits the other rows far better than one grid per channel
  q1, q2 = _np_quant(w, np.asarray(s), np.asarray(z), 15), _np_quant(w, ds, dz, 15)
  assert np.sum((q2 - w)[rest] ** 2) < 0.7 * np.sum((q1 - w)[rest] ** 2)
  # n_top = 0 (fewer than 20 output channels, or a single-grid layer): no split
  s0, _, top0 = erq.dual_weight_grid(jnp.asarray(w), 4, 0)
  assert not np.any(top0)
  np.testing.assert_array_equal(s0, np.broadcast_to(s, s0.shape))


# ------------------------------------------------------------ GPTQ (model)

def _np_minmax_grid(w, bits):
  lo = np.minimum(w.min(0, keepdims=True), 0.0)
  hi = np.maximum(w.max(0, keepdims=True), 0.0)
  s = (hi - lo) / (2 ** bits - 1)
  return s, np.round(-lo / s)


def _matrices(params, layers):
  """{path: (W (rows, cols), b)} as float64 numpy, loop layout."""
  out = {}
  for l in layers:
    k = np.asarray(params_at(params, l.path + "/kernel"), np.float64)
    b = params_at(params, l.path + "/bias")
    out[l.path] = (k.reshape(l.rows, l.cols),
                   None if b is None else np.asarray(b).reshape(-1))
  return out


def params_at(params, path):
  node = params
  for p in path.split("/"):
    if p not in node:
      return None
    node = node[p]
  return node


def test_gptq_w4a16_on_the_vit():
  m, params = fx.vit_model("map")
  x = fx.images(32)
  qapply, qvars = ptq.quantize(m.apply, {"params": params}, x, "GPTQ/W4A16",
                               batch_size=16)
  assert qapply.info["method"] == "GPTQ" and qapply.info["a_bits"] == 16
  layers = er.discover_layers(m.apply, {"params": params}, x[:1])
  assert [l["path"] for l in qapply.info["plan"]] == [l.path for l in layers]
  assert {e["kind"] for e in qapply.info["plan"]} == {"weight"}
  assert len(layers) == 1 + 2 * 6 + 6 + 1        # embedding, 2 blocks, MAP head, head
  fmat, qmat = _matrices(params, layers), _matrices(qvars["params"], layers)
  rtn = jax.tree.map(np.asarray, params)
  for l in layers:                                # every kernel on its grid
    (w, b), (q, qb) = fmat[l.path], qmat[l.path]
    s, z = _np_minmax_grid(w, 4)
    np.testing.assert_allclose(q, _np_quant(q, s, z, 15), atol=1e-6)
    assert np.any(np.abs(q - _np_quant(w, s, z, 15)) > 1e-6)   # not plain RTN
    np.testing.assert_array_equal(qb, b)          # biases untouched
    node = params_at(rtn, l.path)
    node["kernel"] = _np_quant(w, s, z, 15).reshape(node["kernel"].shape).astype(
        np.float32)
  np.testing.assert_array_equal(qvars["params"]["Transformer"]["encoder_norm"]["scale"],
                                params["Transformer"]["encoder_norm"]["scale"])
  fwd = jax.jit(lambda p: m.apply({"params": p}, x)[0])
  f = fwd(params)
  err = lambda p: float(jnp.mean((fwd(p) - f) ** 2))
  assert err(qvars["params"]) < 0.8 * err(rtn)


def test_gptq_stages_and_errors():
  m, params = fx.vit_model("map", scan=True)
  x = fx.images(2)
  layers = er.discover_layers(m.apply, {"params": params}, x[:1])
  st = gptq.stages(layers)
  names = [[(l.path.split("/")[-1], i) for l, i in s] for s in st]
  assert names[0] == [("embedding", None)]
  assert names[1] == [(n, 0) for n in ("query", "key", "value", "out", "Dense_0",
                                       "Dense_1")]
  assert names[2] == [(n, 1) for n, _ in names[1]]
  assert names[-1] == [("head", None)] and len(st) == 3 + 6 + 1
  with pytest.raises(ValueError, match="weight-only"):
    ptq.quantize(m.apply, {"params": params}, x, "GPTQ/W4A8")
  with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
    ptq.quantize(m.apply, {"params": params}, x[0], "GPTQ/W4A16")
  with pytest.raises(ValueError, match="no Dense"):
    ptq.quantize(m.apply, {"params": params}, x, "GPTQ/W4A16", exclude=(".",))
  # ERQ's argument errors come before any tracing
  with pytest.raises(ValueError, match="W9A4"):
    ptq.quantize(m.apply, {"params": params}, x, "ERQ/W9A4")
  with pytest.raises(ValueError, match="coe"):
    ptq.quantize(m.apply, {"params": params}, x, "ERQ/W4A4", coe=0.0)
  with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
    ptq.quantize(m.apply, {"params": params}, x[0], "ERQ/W4A4")
  with pytest.raises(ValueError, match="dual_uniformm"):
    ptq.quantize(m.apply, {"params": params}, x, "ERQ/W4A4", dual_uniformm=False)


# ------------------------------------------------------------- ERQ (model)

@pytest.fixture(scope="module")
def planted():
  """The tiny ViT with a planted post-LayerNorm outlier channel (float unchanged)."""
  m, params = fx.vit_model("map")
  return m, fx.planted_outlier(params), fx.images(32), fx.images(256, seed=1)


@pytest.fixture(scope="module")
def erq_loop(planted):
  m, params, x, _ = planted
  return ptq.quantize(m.apply, {"params": params}, x, "ERQ/W4A4")


def _is_grid(col, levels):
  """Values of one output channel lie on one uniform grid of <= `levels` points."""
  u = np.unique(col)
  if len(u) > levels:
    return False
  if len(u) < 3:
    return True
  step = np.min(np.diff(u))
  k = (u - u[0]) / step
  return bool(np.allclose(k, np.round(k), atol=1e-3))


def test_erq_w4a4_beats_repq_on_planted_outlier(planted, erq_loop):
  """ERQ's logits are closer to the float model's than RepQ-ViT's (held-out images)
  once the head's Aqer is regularised like every other layer (``lambda_2d = 0.1·coe``).

  With the official λ₁ = 0.1 for 2-D inputs the head's ridge regression fits 32
  pooled calibration vectors with 33 unknowns per class and overfits on this toy
  model: measured logit MSE 6.88 (ERQ, official) vs 6.77 (RepQ-ViT) vs 6.14 (ERQ,
  lambda_2d=1000) vs 5.87 (ERQ without Aqer). The official setting is asserted to
  stay within 5 % of RepQ-ViT, so a regression of the error reduction shows here.
  """
  m, params, x, xe = planted
  f = fx.logits(m.apply, {"params": params}, xe)
  repq_q = fx.logits(*ptq.quantize(m.apply, {"params": params}, x, "RepQ-ViT/W4A4"),
                     xe)
  erq_q = fx.logits(*ptq.quantize(m.apply, {"params": params}, x, "ERQ/W4A4",
                                  lambda_2d=0.1 * erq.COE), xe)
  official_q = fx.logits(*erq_loop, xe)
  mse = lambda q: float(np.mean((q - f) ** 2))
  assert mse(erq_q) < 0.95 * mse(repq_q), (mse(erq_q), mse(repq_q))
  assert fx.agreement(f, erq_q) > 0.5
  assert mse(official_q) < 1.05 * mse(repq_q), (mse(official_q), mse(repq_q))


def test_erq_ops_grids_and_report(planted, erq_loop):
  m, params, x, _ = planted
  qapply, qvars = erq_loop
  info = qapply.info
  assert info["method"] == "ERQ" and info["calib_images"] == 32
  plan = {(e["path"], e["kind"], e["call"]): e for e in info["plan"]}
  assert ("embedding", "matmul_input", 0) not in plan          # patch input: float
  assert plan[("embedding", "weight", 0)]["quantizer"] == "uniform"
  blk = "Transformer/encoderblock_0/"
  for name in ("MultiHeadDotProductAttention_0/query", "MlpBlock_0/Dense_0"):
    assert plan[(blk + name, "weight", 0)]["quantizer"] == "dual-uniform"
    assert plan[(blk + name, "matmul_input", 0)]["granularity"].startswith("tensor (")
  assert plan[(blk + "MlpBlock_0/Dense_1", "weight", 0)]["quantizer"] == "uniform"
  assert plan[(blk + "MultiHeadDotProductAttention_0", "probs", 0)]["quantizer"] == "log2"
  units = {u["layers"][0]: u for u in info["units"]}
  qkv = units[blk + "MultiHeadDotProductAttention_0/query"]
  assert len(qkv["layers"]) == 3 and qkv["cols"] == 96      # q, k, v fused
  assert 0 < len(qkv["dual_rows"]) <= 96 // 20
  assert units["head"]["lambda1"] == pytest.approx(0.1)        # 2-D input
  assert units[blk + "MlpBlock_0/Dense_1"]["lambda1"] == pytest.approx(1000.0)
  assert units["embedding"]["aqer"] is False and units["embedding"]["lambda2"] == 1e4
  assert info["moments_bytes"] > 0
  # every kernel on its W4 grid(s); biases absorbed the compensation
  layers = er.discover_layers(m.apply, {"params": params}, x[:1])
  fmat, qmat = _matrices(params, layers), _matrices(qvars["params"], layers)
  for layer in layers:
    (w, b), (q, qb) = fmat[layer.path], qmat[layer.path]
    dual = plan[(layer.path, "weight", 0)]["quantizer"] == "dual-uniform"
    for o in range(q.shape[1]):
      assert len(np.unique(q[:, o])) <= (32 if dual else 16), layer.path
      if not dual:
        assert _is_grid(q[:, o], 16), (layer.path, o)
    assert not np.allclose(qb, b)


def test_erq_scan_equals_loop_and_devices(planted, erq_loop):
  """Loop and scan layouts give the same rewritten weights and activation ranges
  (two different compiled pipelines, one result: ERQ is deterministic), and the
  quantized model gives identical logits under pmap on 1, 2 and 8 devices."""
  m, params, x, xe = planted
  qapply, qvars = erq_loop
  ms = fx.model("map", scan=True)
  sq, svars = ptq.quantize(ms.apply, {"params": fx.loop_to_scan(params)}, x,
                           "ERQ/W4A4")
  want = fx.loop_to_scan(qvars["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
               svars["params"], want)
  for (path, name), v in ops.entries(qvars[ops.COLLECTION]).items():
    if "encoderblock_" in path:
      i = int(path.split("encoderblock_")[1].split("/")[0])
      spath = path.replace(f"encoderblock_{i}", "encoderblock")
      got = jax.tree.map(lambda a, i=i: a[i],
                         ops.entries(svars[ops.COLLECTION])[(spath, name)])
    else:
      got = ops.entries(svars[ops.COLLECTION])[(path, name)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, v)
  # evaluation under pmap: identical logits on 1, 2 and 8 devices
  xb = xe[:32]
  outs = []
  for n in (1, 2, 8):
    f = jax.pmap(lambda v, im: qapply(v, im)[0], in_axes=(None, 0),
                 devices=jax.devices()[:n])
    outs.append(np.asarray(f(qvars, xb.reshape((n, -1) + xb.shape[1:]))).reshape(32, -1))
  np.testing.assert_array_equal(outs[0], outs[1])
  np.testing.assert_array_equal(outs[0], outs[2])
