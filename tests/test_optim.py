"""Tests for s2d_jax.optim.s2d against an exact numpy SVD reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from s2d_jax import optim, spectral

DEPTH = 2
SIGMAS = 4.0 * 0.6 ** np.arange(16)   # planted spectrum: gaps make iteration converge fast


def planted(rng, rows, cols, sigmas=SIGMAS):
  u, _ = np.linalg.qr(rng.normal(size=(rows, rows)))
  v, _ = np.linalg.qr(rng.normal(size=(cols, cols)))
  r = min(rows, cols)
  s = np.zeros(r)
  s[:min(r, len(sigmas))] = sigmas[:r]
  return ((u[:, :r] * s) @ v[:, :r].T).astype(np.float32)


def kernel(rng, path, shape):
  view = spectral.matrix_view(path, shape)
  mats = [planted(rng, view.rows, view.cols) for _ in range(view.num_matrices)]
  return np.stack(mats).reshape(shape)


def bv_params(seed=0):
  """A small big_vision ViT-shaped tree: conv stem, scan and loop blocks, head."""
  rng = np.random.default_rng(seed)
  shapes = {
      ("embedding", "kernel"): (2, 2, 3, 8),
      ("Transformer", "encoderblock", "MultiHeadDotProductAttention_0", "query", "kernel"): (DEPTH, 8, 2, 4),
      ("Transformer", "encoderblock", "MultiHeadDotProductAttention_0", "key", "kernel"): (DEPTH, 8, 2, 4),
      ("Transformer", "encoderblock", "MultiHeadDotProductAttention_0", "out", "kernel"): (DEPTH, 2, 4, 8),
      ("Transformer", "encoderblock", "MlpBlock_0", "Dense_0", "kernel"): (DEPTH, 8, 16),
      ("Transformer", "encoderblock_0", "MultiHeadDotProductAttention_0", "value", "kernel"): (8, 2, 4),
      ("Transformer", "encoderblock_0", "MultiHeadDotProductAttention_0", "out", "kernel"): (2, 4, 8),
      ("Transformer", "encoderblock_0", "MlpBlock_0", "Dense_1", "kernel"): (16, 8),
      ("head", "kernel"): (8, 5),
  }
  params = {}
  def put(path, value):
    d = params
    for p in path[:-1]:
      d = d.setdefault(p, {})
    d[path[-1]] = jnp.asarray(value)
  for path, shape in shapes.items():
    put(path, kernel(rng, path, shape))
  put(("embedding", "bias"), rng.normal(size=8))
  put(("pos_embedding",), rng.normal(size=(1, 4, 8)))
  put(("Transformer", "encoderblock", "LayerNorm_0", "scale"), rng.normal(size=(DEPTH, 8)))
  put(("Transformer", "encoderblock", "MlpBlock_0", "Dense_0", "bias"), rng.normal(size=(DEPTH, 16)))
  put(("Transformer", "encoder_norm", "scale"), rng.normal(size=8))
  put(("Embed_0", "embedding"), rng.normal(size=(10, 8)))
  put(("head", "bias"), rng.normal(size=5))
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


NUM_KERNELS = 9

SMALL = ("Transformer/encoderblock/MlpBlock_0/Dense_0/kernel",
         "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/kernel", "head/kernel")


def small_params(seed=0):
  """Three kernels (scan Dense, loop attention out, head) plus non-kernel leaves."""
  full = bv_params(seed)
  blk, loop = full["Transformer"]["encoderblock"], full["Transformer"]["encoderblock_0"]
  return {"Transformer": {
      "encoderblock": {"MlpBlock_0": blk["MlpBlock_0"], "LayerNorm_0": blk["LayerNorm_0"]},
      "encoderblock_0": {"MultiHeadDotProductAttention_0": {
          "out": loop["MultiHeadDotProductAttention_0"]["out"]}}},
          "head": full["head"], "pos_embedding": full["pos_embedding"]}


_compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *a, **kw: _compiles.append(1)
    if name == "/jax/core/compile/backend_compile_duration" else None)


def reference_term(w, view, k, strength, power):
  """strength * sum_{i<k} sigma_i^power u_i v_i^T per matrix, exact (float64)."""
  mats = np.asarray(view.to_matrix(jnp.asarray(w, jnp.float32)), np.float64)
  mats = mats.reshape(-1, view.rows, view.cols)
  out = []
  for m in mats:
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    kk = min(k, len(s))
    out.append((u[:, :kk] * strength * s[:kk] ** power) @ vt[:kk])
  return np.stack(out).reshape(view.shape)


def grads_like(params, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)


def items(tree):
  return {spectral.path_str(p): x for p, x in spectral.leaves_with_paths(tree)}


# ----------------------------------------------------------------------------
# Exactness against numpy SVD.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("k,dtype", [(1, jnp.float32), (2, jnp.float32), (3, jnp.float32),
                                     (2, jnp.bfloat16)])
def test_term_matches_exact_svd(k, dtype):
  params = jax.tree.map(lambda x: x.astype(dtype), bv_params())
  grads = grads_like(params)
  strength, power = 0.3, 2.0
  tx = optim.s2d(k=k, strength=strength, power=power, iters=40, init_iters=0)
  state = tx.init(params)
  new, state = jax.jit(tx.update)(grads, state, params)
  sel = spectral.select_kernels(params)
  assert len(sel) == NUM_KERNELS
  got, g0, p0 = items(new), items(grads), items(params)
  for name, x in got.items():
    assert x.dtype == dtype, name
    if name not in sel:
      np.testing.assert_array_equal(x, g0[name], err_msg=name)   # untouched
      continue
    view = sel[name][1]
    ref = reference_term(np.asarray(p0[name], np.float32), view, k, strength, power)
    if dtype == jnp.float32:
      np.testing.assert_allclose(np.asarray(x) - np.asarray(g0[name]), ref, atol=2e-5,
                                 err_msg=name)
    else:   # result rounded once to bf16
      want = np.asarray(g0[name], np.float32) + ref
      np.testing.assert_allclose(np.asarray(x, np.float32), want, rtol=1e-2, atol=1e-2,
                                 err_msg=name)
    # sigma estimates (largest first) match the exact singular values.
    mats = np.asarray(view.to_matrix(p0[name].astype(jnp.float32))).reshape(-1, view.rows, view.cols)
    s_ref = np.stack([np.linalg.svd(m, compute_uv=False)[:k] for m in mats])
    np.testing.assert_allclose(np.asarray(optim.sigma_estimates(state)[name]).reshape(-1, k),
                               s_ref, rtol=1e-5, err_msg=name)
  assert set(optim.sigma_estimates(state)) == set(sel)
  assert all(optim.active_counts(state)[n].shape == sel[n][1].batch_shape for n in sel)


def test_power_and_strength_enter_exactly():
  rng = np.random.default_rng(5)
  w = jnp.asarray(planted(rng, 6, 10))
  params = {"d": {"kernel": w}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = optim.s2d(k=2, strength=0.7, power=3.5, iters=40)
  new, _ = tx.update(zeros, tx.init(params), params)
  view = spectral.matrix_view(("d", "kernel"), w.shape)
  np.testing.assert_allclose(new["d"]["kernel"], reference_term(w, view, 2, 0.7, 3.5), atol=2e-5)


def test_k_larger_than_min_dim_is_clamped():
  rng = np.random.default_rng(6)
  params = {"thin": {"kernel": jnp.asarray(planted(rng, 9, 2))},
            "encoderblock": {"wide": {"kernel": jnp.asarray(np.stack([planted(rng, 1, 7)] * 2))}}}
  tx = optim.s2d(k=3, strength=1.0, iters=20)
  state = tx.init(params)
  bases = lambda st: optim.tracked_bases(st)
  assert bases(state)["thin/kernel"].shape == (2, 2)
  assert bases(state)["encoderblock/wide/kernel"].shape == (2, 1, 1)
  assert bases(optim.s2d(k=2).init(params))["thin/kernel"].shape == (2, 2)   # (K_eff, min side)
  assert bases(optim.s2d(k=1).init(params))["thin/kernel"].shape == (1, 2)
  new, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  for name, x in items(new).items():
    view = spectral.matrix_view(tuple(name.split("/")), x.shape)
    np.testing.assert_allclose(x, reference_term(items(params)[name], view, 3, 1.0, 2.0), atol=2e-5)
  assert optim.sigma_estimates(state)["thin/kernel"].shape == (3,)
  assert float(optim.sigma_estimates(state)["thin/kernel"][2]) == 0.0
  np.testing.assert_array_equal(
      optim.sigma_estimates(state)["encoderblock/wide/kernel"][:, 1:], 0.0)


# ----------------------------------------------------------------------------
# Degenerate and invalid inputs.
# ----------------------------------------------------------------------------


def test_zero_rank_deficient_and_nonfinite_kernels():
  rng = np.random.default_rng(7)
  good = planted(rng, 8, 6)
  rank1 = planted(rng, 8, 6, np.array([3.0]))
  nan = good.copy()
  nan[2, 3] = np.nan
  params = {"good": {"kernel": jnp.asarray(good)}, "zero": {"kernel": jnp.zeros((8, 6))},
            "rank1": {"kernel": jnp.asarray(rank1)}, "nan": {"kernel": jnp.asarray(nan)},
            "encoderblock": {"mix": {"kernel": jnp.asarray(np.stack([nan, good]))}}}
  tx = optim.s2d(k=3, strength=1.0, iters=30)
  state0 = tx.init(params)
  grads = grads_like(params)
  new, state = jax.jit(tx.update)(grads, state0, params)
  g = items(grads)
  for name in ["good/kernel", "rank1/kernel"]:
    view = spectral.matrix_view(tuple(name.split("/")), (8, 6))
    np.testing.assert_allclose(items(new)[name] - g[name],
                               reference_term(items(params)[name], view, 3, 1.0, 2.0), atol=2e-5)
  np.testing.assert_array_equal(new["zero"]["kernel"], g["zero/kernel"])
  np.testing.assert_array_equal(new["nan"]["kernel"], g["nan/kernel"])     # no S2D term
  np.testing.assert_array_equal(optim.tracked_bases(state)["nan/kernel"],
                                optim.tracked_bases(state0)["nan/kernel"])
  sig, sig0 = optim.sigma_estimates(state), optim.sigma_estimates(state0)
  np.testing.assert_array_equal(sig["nan/kernel"], sig0["nan/kernel"])
  np.testing.assert_allclose(sig["rank1/kernel"], [3.0, 0.0, 0.0], atol=1e-5)
  np.testing.assert_array_equal(sig["zero/kernel"], 0.0)
  # Scan kernel: the NaN layer gets no term, the finite layer its exact term.
  mix = np.asarray(new["encoderblock"]["mix"]["kernel"]) - np.asarray(g["encoderblock/mix/kernel"])
  np.testing.assert_array_equal(mix[0], 0.0)
  view = spectral.matrix_view(("d", "kernel"), (8, 6))
  np.testing.assert_allclose(mix[1], reference_term(good, view, 3, 1.0, 2.0), atol=2e-5)
  for x in jax.tree.leaves((state.basis, sig["good/kernel"])):
    assert np.all(np.isfinite(np.asarray(x)))


def test_errors():
  params = small_params()
  tx = optim.s2d(init_iters=0)
  state = tx.init(params)
  upd = jax.jit(tx.update)   # errors are raised while tracing
  with pytest.raises(ValueError, match="needs params"):
    upd(params, state)
  with pytest.raises(ValueError, match="tree structures"):
    upd({"head": params["head"]}, state, params)
  smaller = jax.tree.map(lambda x: x, params)
  del smaller["head"]
  with pytest.raises(KeyError, match="head/kernel"):
    upd(smaller, state, smaller)
  changed = jax.tree.map(lambda x: x, params)
  changed["head"]["kernel"] = jnp.ones((8, 7))
  with pytest.raises(ValueError, match="head/kernel.*re-run init"):
    upd(changed, state, changed)
  for kwargs, msg in [(dict(power=0.0), "power"), (dict(strength=-1.0), "strength"),
                      (dict(iters=0), "iters"), (dict(k=4, k_max=3), "k_max"),
                      (dict(k=-1), "k"), (dict(decoupled=True), "learning_rate"),
                      (dict(learning_rate=0.1), "decoupled")]:
    with pytest.raises(ValueError, match=msg):
      optim.s2d(**kwargs)
  with pytest.raises(ValueError, match="k_max must be >= 1"):
    optim.s2d(k=0).init(params)
  assert optim.active_counts(optim.s2d(k=0, k_max=2).init(params))["head/kernel"] == 0


def test_kernel_shape_change_with_same_basis_shape_raises():
  # (16, 8) -> (12, 8): the stored basis (K, 8) fits both, the kernel does not.
  rng = np.random.default_rng(12)
  tx = optim.s2d(k=2, init_iters=0)
  state = tx.init({"d": {"kernel": jnp.asarray(planted(rng, 16, 8))}})
  changed = {"d": {"kernel": jnp.asarray(planted(rng, 12, 8))}}
  with pytest.raises(ValueError, match=r"'d/kernel' has shape \(12, 8\).*\(16, 8\).*re-run init"):
    jax.jit(tx.update)(changed, state, changed)


def test_empty_kernel_is_named():
  params = {"ok": {"kernel": jnp.ones((4, 3))}, "empty": {"kernel": jnp.zeros((0, 5))}}
  for init_iters in (0, 8):
    with pytest.raises(ValueError, match=r"'empty/kernel' of shape \(0, 5\) is empty.*mask="):
      optim.s2d(init_iters=init_iters).init(params)
  # Left out with a mask, the rest works.
  mask = {"ok": {"kernel": True}, "empty": {"kernel": False}}
  assert list(optim.sigma_estimates(optim.s2d(mask=mask).init(params))) == ["ok/kernel"]


def test_schedule_as_strength_names_the_fix():
  with pytest.raises(TypeError, match=r"inject_hyperparams\(s2d\)\(strength=schedule"):
    optim.s2d(strength=optax.linear_schedule(1e-3, 0.0, 10))
  # The fix works (and is exercised with exact values in
  # test_inject_hyperparams_numeric_k_and_scheduled_strength).
  optax.inject_hyperparams(optim.s2d)(strength=optax.linear_schedule(1e-3, 0.0, 10))


def test_k_above_four_matches_exact_svd():
  """k = 6 (the matmul path of the rank-k term) on scan, loop and transposed kernels."""
  rng = np.random.default_rng(13)
  sig = 4.0 * 0.7 ** np.arange(16)
  params = {"encoderblock": {"Dense_0": {"kernel": jnp.asarray(
                np.stack([planted(rng, 12, 16, sig) for _ in range(2)]))}},
            "Dense_1": {"kernel": jnp.asarray(planted(rng, 16, 12, sig))},
            "thin": {"kernel": jnp.asarray(planted(rng, 10, 5, sig))}}
  grads = grads_like(params)
  tx = optim.s2d(k=6, strength=0.3, iters=60, init_iters=0)
  new, state = jax.jit(tx.update)(grads, tx.init(params), params)
  sig_est = optim.sigma_estimates(state)
  for name, (_, view) in spectral.select_kernels(params).items():
    w = items(params)[name]
    np.testing.assert_allclose(np.asarray(items(new)[name]) - np.asarray(items(grads)[name]),
                               reference_term(w, view, 6, 0.3, 2.0), atol=2e-5, err_msg=name)
    mats = np.asarray(view.to_matrix(w), np.float64).reshape(-1, view.rows, view.cols)
    want = np.stack([np.pad(np.linalg.svd(m, compute_uv=False)[:6], (0, max(0, 6 - min(m.shape))))
                     for m in mats])
    np.testing.assert_allclose(np.asarray(sig_est[name]).reshape(-1, 6), want, rtol=1e-5,
                               atol=1e-6, err_msg=name)


def test_non_float_leaves():
  params = {"q": {"kernel": jnp.ones((4, 4), jnp.int8)}, "d": {"kernel": jnp.ones((4, 3))},
            "step": jnp.zeros((), jnp.int32)}
  state = optim.s2d().init(params)
  assert list(optim.tracked_bases(state)) == ["d/kernel"]
  with pytest.raises(ValueError, match="q/kernel.*int8"):
    optim.s2d(mask={"q": {"kernel": True}, "d": {"kernel": True}, "step": False}).init(params)


def test_custom_mask_and_views():
  rng = np.random.default_rng(8)
  w = planted(rng, 12, 5)
  params = {"lin": {"w": jnp.asarray(w.reshape(3, 4, 5))}, "other": {"kernel": jnp.ones((3, 3))}}
  mask = {"lin": {"w": True}, "other": {"kernel": False}}
  tx = optim.s2d(k=1, strength=1.0, iters=40, mask=mask, views={"lin/w": (0, 2)})
  state = tx.init(params)
  assert list(optim.tracked_bases(state)) == ["lin/w"]
  new, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  view = spectral.MatrixView((3, 4, 5), 0, 2)
  np.testing.assert_allclose(new["lin"]["w"], reference_term(w.reshape(3, 4, 5), view, 1, 1.0, 2.0),
                             atol=2e-5)
  np.testing.assert_array_equal(new["other"]["kernel"], 0.0)


# ----------------------------------------------------------------------------
# Tracking.
# ----------------------------------------------------------------------------


def _drift_run(w0, steps, drift, iters, init_iters, k, seed=0):
  """Apply s2d every step to W_t = W_0 + drift * t-dependent perturbation."""
  rng = np.random.default_rng(seed)
  d1 = rng.normal(size=w0.shape) / np.sqrt(w0.size)
  d2 = rng.normal(size=w0.shape) / np.sqrt(w0.size)
  tx = optim.s2d(k=k, strength=0.0, iters=iters, init_iters=init_iters)
  p = {"d": {"kernel": jnp.asarray(w0)}}
  state = tx.init(p)
  upd = jax.jit(tx.update)
  errs = []
  for t in range(steps):
    w = w0 + drift * np.linalg.norm(w0) * (np.sin(0.1 * t) * d1 + np.cos(0.07 * t) * d2)
    p = {"d": {"kernel": jnp.asarray(w, jnp.float32)}}
    _, state = upd(p, state, p)
    s_ref = np.linalg.svd(np.asarray(p["d"]["kernel"], np.float64), compute_uv=False)[:k]
    est = np.asarray(optim.sigma_estimates(state)["d/kernel"])
    errs.append(np.max(np.abs(est - s_ref) / s_ref))
  return np.array(errs)


def test_tracking_under_drift_with_one_iteration():
  rng = np.random.default_rng(9)
  w0 = planted(rng, 32, 24, 4.0 * 0.8 ** np.arange(24))
  errs = _drift_run(w0, steps=60, drift=0.05, iters=1, init_iters=8, k=3)
  assert errs[10:].max() < 1e-3, errs


def test_cold_start_converges():
  rng = np.random.default_rng(10)
  w0 = planted(rng, 32, 24, 4.0 * 0.8 ** np.arange(24))
  errs = _drift_run(w0, steps=40, drift=0.0, iters=1, init_iters=0, k=2)
  assert errs[0] > 1e-2           # a random start is far off,
  assert errs[-1] < 1e-5          # one iteration per step converges.


# ----------------------------------------------------------------------------
# Coupled vs decoupled.
# ----------------------------------------------------------------------------


def _s2d_grad(params, k, strength, power=2.0):
  out = {}
  for name, (_, view) in spectral.select_kernels(params).items():
    out[name] = reference_term(np.asarray(items(params)[name]), view, k, strength, power)
  return out


def test_coupled_s2d_adamw_equals_adamw_on_augmented_gradient():
  params = small_params()
  grads = grads_like(params)
  tx = optim.s2d_adamw(1e-2, weight_decay=1e-3, k=1, strength=0.1, iters=40, init_iters=0)
  new, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  extra = _s2d_grad(params, 1, 0.1)
  aug = jax.tree_util.tree_map_with_path(
      lambda kp, g: g + extra.get(spectral.path_str(spectral.path_tuple(kp)), 0.0), grads)
  ref_tx = optax.adamw(1e-2, weight_decay=1e-3)
  ref, _ = ref_tx.update(aug, ref_tx.init(params), params)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_decoupled_adds_scaled_term_after_optimizer():
  params = small_params()
  grads = grads_like(params)
  sched = optax.linear_schedule(1e-2, 1e-3, 10)
  tx = optim.s2d_adamw(sched, weight_decay=1e-3, decoupled=True, k=2, strength=0.5, iters=40,
                       init_iters=0)
  ref_tx = optax.adamw(sched, weight_decay=1e-3)
  state, ref_state = tx.init(params), ref_tx.init(params)
  extra = _s2d_grad(params, 2, 0.5)
  upd = jax.jit(tx.update)
  for step in range(3):
    new, state = upd(grads, state, params)
    ref, ref_state = ref_tx.update(grads, ref_state, params)
    lr = float(sched(step))
    for name, x in items(new).items():
      want = np.asarray(items(ref)[name]) - lr * extra.get(name, 0.0)
      np.testing.assert_allclose(x, want, rtol=1e-4, atol=1e-6, err_msg=f"{name} step {step}")
  assert int(optim.find_s2d_state(state).count) == 3


# ----------------------------------------------------------------------------
# State helpers and active counts.
# ----------------------------------------------------------------------------


def test_set_active_sigma_estimates_and_find():
  params = small_params()
  tx = optax.chain(optim.s2d(k=1, k_max=3, strength=1.0, iters=40, init_iters=40), optax.sgd(1.0))
  state = tx.init(params)
  s2d_state = optim.find_s2d_state(state)
  assert isinstance(s2d_state, optim.S2DState)
  sig = optim.sigma_estimates(state)
  assert set(sig) == set(SMALL)
  scan, out = SMALL[0], SMALL[1]
  assert sig[scan].shape == (DEPTH, 3)
  for name, x in items(params).items():   # init_iters estimates are exact here
    if name in SMALL:
      view = spectral.matrix_view(tuple(name.split("/")), x.shape)
      mats = np.asarray(view.to_matrix(x)).reshape(-1, view.rows, view.cols)
      np.testing.assert_allclose(np.asarray(sig[name]).reshape(-1, 3),
                                 [np.linalg.svd(m, compute_uv=False)[:3] for m in mats], rtol=1e-5)
  state = optim.set_active(state, {scan: np.array([0, 3]),
                                   "head": {"kernel": 2}})   # flat and nested keys
  act = optim.active_counts(state)
  np.testing.assert_array_equal(act[scan], [0, 3])
  assert int(act["head/kernel"]) == 2
  assert act[scan].dtype == jnp.int32
  assert int(act[out]) == 1   # untouched
  state = optim.set_active(state, {out: 0})
  new, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
  got = items(new)
  view = spectral.matrix_view(tuple(scan.split("/")), (DEPTH, 8, 16))
  ref3 = reference_term(items(params)[scan], view, 3, 1.0, 2.0)
  np.testing.assert_array_equal(got[scan][0], 0.0)
  np.testing.assert_allclose(-got[scan][1], ref3[1], atol=2e-5)
  view = spectral.matrix_view(("head", "kernel"), (8, 5))
  np.testing.assert_allclose(-got["head/kernel"],
                             reference_term(items(params)["head/kernel"], view, 2, 1.0, 2.0), atol=2e-5)
  np.testing.assert_array_equal(got[out], 0.0)
  # Broadcast scalar to a scan kernel.
  state = optim.set_active(state, {scan: 2})
  np.testing.assert_array_equal(optim.active_counts(state)[scan], [2, 2])


@pytest.mark.parametrize("active,exc,msg", [
    ({"head/kernel": 4}, ValueError, r"\[0, 3\]"),
    ({"head/kernel": -1}, ValueError, r"\[0, 3\]"),
    ({"head/kernel": 1.5}, ValueError, "integer"),
    ({"Transformer/encoderblock/MlpBlock_0/Dense_0/kernel": np.array([1, 1, 1])}, ValueError,
     "broadcastable"),
    ({"nope/kernel": 1}, KeyError, "nope/kernel"),
    ([1, 2], TypeError, "dict"),
])
def test_set_active_errors(active, exc, msg):
  state = optim.s2d(k=1, k_max=3, init_iters=0).init(small_params())
  with pytest.raises(exc, match=msg):
    optim.set_active(state, active)


def test_set_active_non_strict_and_find_errors():
  state = optim.s2d(k=1, init_iters=0).init(small_params())
  out = optim.set_active(state, {"nope/kernel": 1, "head/kernel": 0}, strict=False)
  assert int(optim.active_counts(out)["head/kernel"]) == 0
  with pytest.raises(ValueError, match="found 0"):
    optim.find_s2d_state(optax.sgd(1.0).init(small_params()))
  two = (state, state)
  with pytest.raises(ValueError, match="found 2"):
    optim.find_s2d_state(two)
  assert set(optim.sigma_estimates(two)) == set(SMALL)


def test_no_recompile_when_active_or_scheduled_strength_change():
  # Committed inputs from the start (uncommitted -> committed alone recompiles).
  params = jax.device_put(small_params(), jax.devices()[0])
  tx = optax.chain(
      optax.inject_hyperparams(optim.s2d)(k=1, k_max=3, strength=optax.linear_schedule(0.1, 0.0, 5),
                                          iters=1),
      optax.sgd(1.0))
  state = jax.device_put(tx.init(params), jax.devices()[0])
  traces = []

  def step(params, state, grads):
    traces.append(1)
    upd, state = tx.update(grads, state, params)
    return optax.apply_updates(params, upd), state

  step = jax.jit(step)
  grads = jax.tree.map(jnp.zeros_like, params)
  sig = []
  for i in range(4):
    state = optim.set_active(state, {"head/kernel": i % 4,
                                     "Transformer/encoderblock/MlpBlock_0/Dense_0/kernel": [i % 2, 1]})
    if i == 1:
      compiles_after_first = len(_compiles)
    params, state = step(params, state, grads)
    assert step._cache_size() == 1
    sig.append(float(optim.sigma_estimates(state)["head/kernel"][0]))
  assert len(traces) == 1                           # traced once,
  assert len(_compiles) == compiles_after_first     # and no XLA compilation after step 1.
  assert step._cache_size() == 1
  # strength 0.1, 0.08, ... with active head counts 0, 1, 2, 3: sigma_1 shrinks from step 1.
  assert sig[0] == pytest.approx(sig[1], rel=1e-6) and sig[2] < sig[1] and sig[3] < sig[2]


def test_inject_hyperparams_numeric_k_and_scheduled_strength():
  params = small_params()
  sched = optax.linear_schedule(1.0, 0.0, 4)
  tx = optax.inject_hyperparams(optim.s2d)(k=2, strength=sched, iters=40, init_iters=0)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  upd = jax.jit(tx.update)
  extra = _s2d_grad(params, 2, 1.0)
  for step in range(2):
    new, state = upd(zeros, state, params)
    for name, ref in extra.items():
      np.testing.assert_allclose(items(new)[name], float(sched(step)) * ref, atol=2e-5, err_msg=name)
  assert optim.sigma_estimates(state)["head/kernel"].shape == (2,)


# ----------------------------------------------------------------------------
# Wrappers and distribution.
# ----------------------------------------------------------------------------


def test_masked_wrapper():
  params = small_params()
  mask = jax.tree_util.tree_map_with_path(
      lambda kp, _: "head" not in spectral.path_tuple(kp), params)
  tx = optax.masked(optim.s2d(k=1, strength=1.0, iters=40, init_iters=0), mask)
  state = tx.init(params)
  s2d_state = optim.find_s2d_state(state)
  assert sorted(optim.tracked_bases(s2d_state)) == sorted(SMALL[:2])
  grads = grads_like(params)
  new, _ = jax.jit(tx.update)(grads, state, params)
  extra = _s2d_grad(params, 1, 1.0)
  for name, x in items(new).items():
    add = extra[name] if name in SMALL[:2] else 0.0
    np.testing.assert_allclose(x, np.asarray(items(grads)[name]) + add, atol=2e-5, err_msg=name)


def test_multisteps_wrapper():
  params = small_params()
  tx = optax.MultiSteps(optax.chain(optim.s2d(k=1, strength=1.0, iters=40, init_iters=0),
                                    optax.sgd(1.0)),
                        every_k_schedule=2)
  state = tx.init(params)
  count0 = int(optim.find_s2d_state(state).count)
  grads = grads_like(params)
  upd = jax.jit(tx.update)
  new, state = upd(grads, state, params)
  assert int(optim.find_s2d_state(state).count) == count0
  np.testing.assert_array_equal(new["head"]["kernel"], 0.0)
  new, state = upd(grads, state, params)
  assert int(optim.find_s2d_state(state).count) == count0 + 1
  extra = _s2d_grad(params, 1, 1.0)
  np.testing.assert_allclose(-new["head"]["kernel"],
                             np.asarray(grads["head"]["kernel"]) + extra["head/kernel"], atol=2e-5)


def test_pmap_identical_state_on_every_replica():
  n = jax.local_device_count()
  assert n == 8
  params = small_params()
  grads = grads_like(params)
  tx = optim.s2d(k=2, strength=0.5, iters=3, init_iters=0)
  ref_state = tx.init(params)
  ref_new, ref_state = jax.jit(tx.update)(grads, ref_state, params)
  rep = lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), t)
  state = jax.pmap(tx.init)(rep(params))
  new, state = jax.pmap(tx.update)(rep(grads), state, rep(params))
  for x, r in zip(jax.tree.leaves((new, state)), jax.tree.leaves((ref_new, ref_state))):
    x = np.asarray(x)
    for d in range(1, n):
      np.testing.assert_array_equal(x[d], x[0])
    np.testing.assert_allclose(x[0], r, rtol=1e-5, atol=1e-6)
  state = optim.set_active(state, {"head/kernel": 0})
  np.testing.assert_array_equal(optim.active_counts(state)["head/kernel"], np.zeros(n))


def test_sharded_params():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
  rng = np.random.default_rng(11)
  params = {"a": {"kernel": jnp.asarray(planted(rng, 16, 32))},
            "encoderblock": {"b": {"kernel": jnp.asarray(np.stack([planted(rng, 32, 8)] * 2))}}}
  shardings = {"a": {"kernel": NamedSharding(mesh, P("data", "model"))},
               "encoderblock": {"b": {"kernel": NamedSharding(mesh, P(None, "model", None))}}}
  sharded = jax.device_put(params, shardings)
  grads = grads_like(params)
  tx = optim.s2d(k=2, strength=1.0, iters=40, init_iters=0)
  state = jax.jit(tx.init)(sharded)
  new, state = jax.jit(tx.update)(jax.device_put(grads, shardings), state, sharded)
  extra = _s2d_grad(params, 2, 1.0)
  for name, x in items(new).items():
    np.testing.assert_allclose(x, np.asarray(items(grads)[name]) + extra[name], atol=3e-5)
  assert new["a"]["kernel"].sharding.is_equivalent_to(shardings["a"]["kernel"], 2)
