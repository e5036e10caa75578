"""PTQ4ViT: twin-uniform quantizers, Hessian-guided search, calibration flow."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from s2d_jax.ptq import twin_uniform as tu

CFG = tu.SearchConfig()  # the official configs/PTQ4ViT.py values


# ----------------------------------------------------------------------------
# Quantizers: hand-computed grids
# ----------------------------------------------------------------------------


def test_uniform_grid_3_bits():
  # m = 4: levels -4..3 times 0.5; round half to even; clipped at -2 and 1.5.
  x = jnp.array([-3.0, -1.2, 0.26, 0.74, 1.6, 5.0, 0.25, 0.75])
  np.testing.assert_array_equal(
      tu.uniform(x, 0.5, 3), [-2.0, -1.0, 0.5, 0.5, 1.5, 1.5, 0.0, 1.0])


def test_post_gelu_twin_grid():
  # 3 bits: positive range 0.5·{0..3}; negative range Δ₋ = 0.16997.../4 · {-4..0}.
  neg = 0.16997124254703522 / 4
  x = jnp.array([-0.17, -0.05, -0.01, 0.0, 0.3, 0.8, 2.0])
  np.testing.assert_allclose(
      tu.post_gelu(x, 0.5, 3), [-4 * neg, -neg, 0.0, 0.0, 0.5, 1.0, 1.5],
      rtol=1e-7)


def test_post_softmax_twin_grid_with_official_offsets():
  # 3 bits: m - 1 = 3 levels per range. Split 1/4: Δ = 1/12; the high part is
  # round(clip(x, 1/4, 1)·3)/3, i.e. 1/3 even below the split, and the low part
  # adds the split above it -- the official code's offsets.
  x = jnp.array([0.0, 0.05, 0.1, 0.25, 0.5, 0.9, 1.0])
  np.testing.assert_allclose(tu.post_softmax(x, 0.25, 3) * 12,
                             [4, 5, 5, 7, 11, 15, 15], rtol=1e-6)
  # Split 1/16: 3/16 < 1/2, so below the split only the low range (Δ = 1/48)
  # is non-zero; above it, round(x·3)/3 + 1/16 (1.5 rounds to 2).
  x = jnp.array([0.0, 0.03, 0.0625, 0.2, 0.5, 1.0])
  np.testing.assert_allclose(tu.post_softmax(x, 1 / 16, 3) * 48,
                             [0, 1, 3, 19, 35, 51], rtol=1e-6)


def test_candidates_and_initial_intervals():
  c = tu.interval_candidates(jnp.array([2.0, 4.0]), CFG)
  assert c.shape == (101, 2)
  np.testing.assert_allclose(c[0], [0.02, 0.04], rtol=1e-6)
  np.testing.assert_allclose(c[-1], [2.4, 4.8], rtol=1e-6)
  np.testing.assert_allclose(c[50], [2 * 0.605, 4 * 0.605], rtol=1e-6)
  np.testing.assert_array_equal(tu.split_candidates(CFG), 2.0 ** -np.arange(20))
  np.testing.assert_allclose(tu.minmax_interval(7.5, 4), 1.0)   # 7.5 / (8 - 0.5)
  assert float(tu.minmax_interval(0.0, 4)) == pytest.approx(1 / 7.5)  # no NaN


@pytest.mark.parametrize("kw, match", [
    (dict(eq_n=0), "eq_n"), (dict(eq_alpha=1.5), "eq_alpha"),
    (dict(search_round=0), "search_round"), (dict(n_splits=0), "n_splits"),
    (dict(candidate_batch=0), "candidate_batch")])
def test_search_config_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    tu.SearchConfig(**kw)


def test_bits_errors():
  with pytest.raises(ValueError, match="bits"):
    tu.uniform(jnp.ones(3), 1.0, 1)
  with pytest.raises(ValueError, match="bits"):
    tu.post_softmax(jnp.ones(3), 0.5, 17)


# ----------------------------------------------------------------------------
# Search: a numpy transcription of the official loops (float64)
# ----------------------------------------------------------------------------


def _np_uniform(x, d, bits):
  m = 2 ** (bits - 1)
  return np.clip(np.round(x / d), -m, m - 1) * d


def _np_post_gelu(x, d, bits):
  m = 2 ** (bits - 1)
  neg = 0.16997124254703522 / m
  return (np.clip(np.round(x / d), 0, m - 1) * d
          + np.clip(np.round(x / neg), -m, 0) * neg)


def _np_post_softmax(x, s, bits):
  m1 = 2 ** (bits - 1) - 1
  lo = s / m1
  return (np.clip(np.round(np.clip(x, s, 1) * m1), 0, m1) / m1
          + np.clip(np.round(np.clip(x, 0, s) / lo), 0, m1) * lo)


def _ratios(cfg=CFG):
  return np.array([cfg.eq_alpha + i * (cfg.eq_beta - cfg.eq_alpha) / cfg.eq_n
                   for i in range(cfg.eq_n + 1)])


def _np_search_linear(x, w, b, out, g, w_bits, a_bits, n_groups, act, rounds=3):
  """One candidate at a time, every group at once, argmax of -mean (official)."""
  m_w, m_a = 2 ** (w_bits - 1), 2 ** (a_bits - 1)
  n = w.shape[1]
  gs = n // n_groups
  w_int = np.abs(w).reshape(-1, n_groups, gs).max(axis=(0, 2)) / (m_w - 0.5)
  amax = x.max() if act == "post_gelu" else np.abs(x).max()
  a_int = amax / (m_a - 0.5)
  w_cands, a_cands = _ratios()[:, None] * w_int, _ratios() * a_int
  qa = _np_post_gelu if act == "post_gelu" else _np_uniform
  for _ in range(rounds):
    sims = []
    for cand in w_cands:
      o = qa(x, a_int, a_bits) @ _np_uniform(w, np.repeat(cand, gs), w_bits) + b
      sims.append(-(g * (out - o)) ** 2)
    sims = np.stack(sims).mean(axis=1).reshape(len(w_cands), n_groups, gs).mean(-1)
    w_int = w_cands[np.argmax(sims, axis=0), np.arange(n_groups)]
    sims = [np.mean(-(g * (out - (qa(x, c, a_bits) @ _np_uniform(
        w, np.repeat(w_int, gs), w_bits) + b))) ** 2) for c in a_cands]
    a_int = a_cands[int(np.argmax(sims))]
  return w_int, a_int


@pytest.mark.parametrize("act, n_groups", [("uniform", 3), ("post_gelu", 1)])
def test_search_linear_matches_official_loops(act, n_groups):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(48, 16))
  if act == "post_gelu":
    x = np.asarray(jax.nn.gelu(jnp.asarray(x) * 2, approximate=False), np.float64)
  w = rng.normal(size=(16, 12)) * np.linspace(0.2, 2, 12)
  b = rng.normal(size=12)
  out = x @ w + b
  g = rng.normal(size=out.shape) * np.linspace(0.1, 3, 12)
  f32 = lambda t: jnp.asarray(t, jnp.float32)
  got = tu.search_linear(f32(x), f32(w), f32(b), f32(out), f32(g), w_bits=4,
                         a_bits=4, n_groups=n_groups, act=act, cfg=CFG)
  ref_w, ref_a = _np_search_linear(x.astype(np.float32), w.astype(np.float32),
                                   b.astype(np.float32), out.astype(np.float32),
                                   g.astype(np.float32), 4, 4, n_groups, act)
  np.testing.assert_allclose(got["w_interval"], ref_w, rtol=1e-5)
  np.testing.assert_allclose(got["a_interval"], ref_a, rtol=1e-5)
  assert 1 <= int(got["rounds"]) <= 3


def test_search_picks_least_hessian_error_not_least_mse():
  # Two output columns of very different scale: plain L2 favours the large one,
  # the gradient weights (zero on the large column) make only the small one count.
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, size=(64, 8)).astype(np.float32)
  w = np.stack([rng.normal(size=8) * 10, rng.normal(size=8) * 0.1], 1)
  w = w.astype(np.float32)
  out = x @ w
  picks = {}
  for name, g in (("mse", np.ones_like(out)),
                  ("hessian", np.stack([np.zeros(64), np.ones(64)], 1))):
    g = g.astype(np.float32)
    r = tu.search_linear(x, w, None, out, g, w_bits=3, a_bits=None, n_groups=1,
                         act=None, cfg=CFG)
    cands = np.asarray(tu.interval_candidates(r["w_init"], CFG))[:, 0]
    errs = [float(np.sum((g * (out - x @ _np_uniform(w, c, 3))) ** 2))
            for c in cands]
    assert float(r["w_interval"][0]) == pytest.approx(cands[int(np.argmin(errs))])
    assert int(r["rounds"]) == 1 or int(r["rounds"]) == 2   # float input: 1 step
    picks[name] = float(r["w_interval"][0])
  assert picks["hessian"] < picks["mse"]   # the small column wants a fine grid


def test_search_per_channel_conv_view():
  # Per output channel (n_groups = N): each column picks its own candidate and
  # equals an independent one-column search.
  rng = np.random.default_rng(2)
  x = rng.normal(size=(40, 6)).astype(np.float32)
  w = (rng.normal(size=(6, 4)) * [0.1, 1, 5, 20]).astype(np.float32)
  out, g = x @ w, rng.normal(size=(40, 4)).astype(np.float32)
  r = tu.search_linear(x, w, None, out, g, w_bits=4, a_bits=None, n_groups=4,
                       act=None, cfg=CFG)
  for j in range(4):
    rj = tu.search_linear(x, w[:, j:j + 1], None, out[:, j:j + 1], g[:, j:j + 1],
                          w_bits=4, a_bits=None, n_groups=1, act=None, cfg=CFG)
    assert float(r["w_interval"][j]) == pytest.approx(float(rj["w_interval"][0]),
                                                      rel=1e-6)
  assert np.isnan(float(r["a_interval"]))


def _np_search_qk(q, k, s, g, bits, rounds=3):
  m = 2 ** (bits - 1)
  q_int = np.abs(q).max(axis=(0, 1, 3)) / (m - 0.5)
  k_int = np.abs(k).max(axis=(0, 1, 3)) / (m - 0.5)
  qc, kc = _ratios()[:, None] * q_int, _ratios()[:, None] * k_int
  lg = lambda a, b_: np.einsum("bqhd,bkhd->bhqk", a / np.sqrt(a.shape[-1]), b_)
  for _ in range(rounds):
    e = [((g * (s - lg(_np_uniform(q, c[:, None], bits),
                       _np_uniform(k, k_int[:, None], bits)))) ** 2).sum((0, 2, 3))
         for c in qc]
    q_int = qc[np.argmin(np.stack(e), 0), np.arange(len(q_int))]
    e = [((g * (s - lg(_np_uniform(q, q_int[:, None], bits),
                       _np_uniform(k, c[:, None], bits)))) ** 2).sum((0, 2, 3))
         for c in kc]
    k_int = kc[np.argmin(np.stack(e), 0), np.arange(len(k_int))]
  return q_int, k_int


def _np_search_pv(p, v, o, g, bits, rounds=3):
  m = 2 ** (bits - 1)
  v_int = np.abs(v).max(axis=(0, 1, 3)) / (m - 0.5)
  vc = _ratios()[:, None] * v_int
  splits = 2.0 ** -np.arange(20)
  mm = lambda a, b_: np.einsum("bhqk,bkhd->bqhd", a, b_)
  for _ in range(rounds):
    e = [((g * (o - mm(_np_post_softmax(p, sp, bits), v))) ** 2).sum()
         for sp in splits]
    split = splits[int(np.argmin(e))]
    pq = _np_post_softmax(p, split, bits)
    e = [((g * (o - mm(pq, _np_uniform(v, c[:, None], bits)))) ** 2).sum((0, 1, 3))
         for c in vc]
    v_int = vc[np.argmin(np.stack(e), 0), np.arange(len(v_int))]
  return split, v_int


def test_search_attention_matmuls_match_official_loops():
  rng = np.random.default_rng(3)
  q = (rng.normal(size=(2, 5, 3, 4)) * [[0.5], [1], [3]]).astype(np.float32)
  k = rng.normal(size=(2, 6, 3, 4)).astype(np.float32)
  s = np.einsum("bqhd,bkhd->bhqk", q / 2, k)   # d = 4: 1/√d = 1/2
  gs = rng.normal(size=s.shape).astype(np.float32)
  got = tu.search_qk(q, k, s, gs, bits=4, cfg=CFG)
  ref_q, ref_k = _np_search_qk(q, k, s, gs, 4)
  np.testing.assert_allclose(got["q_interval"], ref_q, rtol=1e-5)
  np.testing.assert_allclose(got["k_interval"], ref_k, rtol=1e-5)

  p = np.asarray(jax.nn.softmax(jnp.asarray(s) * 3, -1))
  v = (rng.normal(size=(2, 6, 3, 4)) * [[0.2], [1], [4]]).astype(np.float32)
  o = np.einsum("bhqk,bkhd->bqhd", p, v)
  go = rng.normal(size=o.shape).astype(np.float32)
  got = tu.search_pv(p, v, o, go, bits=4, cfg=CFG)
  ref_split, ref_v = _np_search_pv(p, v, o, go, 4)
  assert float(got["split"]) == ref_split
  np.testing.assert_allclose(got["v_interval"], ref_v, rtol=1e-5)


def test_search_independent_of_candidate_batch():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(32, 8)).astype(np.float32)
  w = rng.normal(size=(8, 6)).astype(np.float32)
  out, g = x @ w, rng.normal(size=(32, 6)).astype(np.float32)
  a = tu.search_linear(x, w, None, out, g, w_bits=4, a_bits=4, n_groups=2,
                       act="uniform", cfg=CFG)
  b = tu.search_linear(x, w, None, out, g, w_bits=4, a_bits=4, n_groups=2,
                       act="uniform", cfg=tu.SearchConfig(candidate_batch=16))
  for key in ("w_interval", "a_interval", "rounds"):
    np.testing.assert_array_equal(a[key], b[key])
