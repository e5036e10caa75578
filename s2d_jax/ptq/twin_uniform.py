"""PTQ4ViT's quantizers and its Hessian-guided interval search, in pure jax.numpy.

A port of the quantizers and of the ``calibration_step2`` searches of the official
PTQ4ViT code (hahnyuan/PTQ4ViT ``quant_layers/{linear,matmul,conv}.py``, the
``*Batching*`` classes that ``configs/PTQ4ViT.py`` selects); the calibration flow that
feeds them lives in :mod:`s2d_jax.ptq.ptq4vit`.

Quantizers (``b`` bits, ``m = 2^(b-1)``, ``round`` half-to-even as in torch):

* uniform (weights, linear inputs, q, k, v)::

      x̂ = Δ · clip(round(x / Δ), -m, m - 1)

* post-GELU twin uniform (the input of MLP fc2): a positive range with a searched
  interval ``Δ₊`` and a negative range with the fixed ``Δ₋ = 0.16997124254703522 / m``
  (``|min GELU| / m``), ``b - 1`` bits each::

      x̂ = Δ₊ · clip(round(x / Δ₊), 0, m - 1) + Δ₋ · clip(round(x / Δ₋), -m, 0)

* post-softmax twin uniform ("split of softmax", the probabilities of probs·v): a
  split point ``s`` (searched among ``2^-i``, ``i = 0..19``), the low range
  ``[0, s]`` with ``Δ = s / (m - 1)`` and the high range with ``1 / (m - 1)``::

      x̂ = round(clip(x, s, 1) · (m-1)) / (m-1)  [clipped to 0..1]
         + Δ · clip(round(clip(x, 0, s) / Δ), 0, m - 1)

  exactly as the official code writes it, offsets included: below ``s`` the high
  part is the constant ``round(s·(m-1)) / (m-1)`` (zero only when
  ``s·(m-1) < 1/2``), and above ``s`` the low part adds ``s``. The search is what
  keeps these offsets small (large splits lose).

Initial ("min-max") intervals: ``Δ₀ = max|x| / (m - 1/2)`` per group (post-GELU:
``max x``, not ``|x|``). Candidates: ``Δ_i = (α + i(β - α)/n) · Δ₀``, ``i = 0..n``
(``configs/PTQ4ViT.py``: α = eq_alpha = 0.01, β = eq_beta = 1.2, n = eq_n = 100,
so 101 candidates from 0.01·Δ₀ to 1.2·Δ₀), fixed from the initial interval for all
rounds.

Hessian-guided metric (PTQ4ViT Sec. 4.2): with ``O`` the float output of the
layer, ``Ô`` its output with quantized operands and ``g = ∂L/∂O`` (one value per
output element), a candidate's error is::

    err = Σ (g ⊙ (O - Ô))²

summed over the scale group's output elements (the official ``-mean`` similarity
with ``argmax``; the per-group element counts are equal, so ``argmin`` of the sum
picks the same candidate, first index on ties as ``torch.argmax``).

Search (``search_round`` = 3 rounds, alternating; candidates evaluated by
``lax.map``, one matmul each, never a Python loop):

* linear / conv (:func:`search_linear`): weight intervals per output group (the
  ``n_V`` row blocks of the torch weight: 1 for most layers, 3 for qkv, one per
  output channel for the patch-embedding conv) with the input quantized at its
  current interval, then the input interval with the weight quantized at its
  current intervals; a float input (conv: ``a_bit = 32``) skips the second step.
* q·kᵀ (:func:`search_qk`): per-head intervals of q (k quantized), then of k
  (q quantized); the error is summed per head (q is quantized before flax's
  ``1/√d``, the error measured on the scaled logits).
* probs·v (:func:`search_pv`): the split on the error of ``Q(probs)·v`` with v in
  float (as the official code), then per-head intervals of v with the probabilities
  quantized at the chosen split.

A round that leaves every interval unchanged is a fixed point of the next rounds,
so the loop stops there (same result as running all rounds, fewer matmuls).
Searches are jitted per shape with the bit widths traced (one compile serves every
``WxAy``) and their matmuls in full float32 (``Precision.HIGHEST``, as the official
fp32 PyTorch code; no TF32).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

# |min_x GELU(x)| (exact erf GELU), the official fixed negative range of post-GELU
# activations: Δ₋ = GELU_NEG / 2^(b-1).
GELU_NEG = 0.16997124254703522

_HI = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Search hyper-parameters (defaults: the official ``configs/PTQ4ViT.py``).

  Attributes:
    eq_alpha, eq_beta, eq_n: candidate grid ``(α + i(β-α)/n)·Δ₀``, ``i = 0..n``.
    search_round: alternating rounds (weight/input or A/B).
    n_splits: post-softmax split candidates ``2^-i``, ``i < n_splits``.
    candidate_batch: candidates evaluated at once (``lax.map`` ``batch_size``);
      ``None`` = one at a time (least memory). Results do not depend on it.
  """
  eq_alpha: float = 0.01
  eq_beta: float = 1.2
  eq_n: int = 100
  search_round: int = 3
  n_splits: int = 20
  candidate_batch: int | None = None

  def __post_init__(self):
    if not (isinstance(self.eq_n, int) and self.eq_n >= 1):
      raise ValueError(f"eq_n must be an int >= 1, got {self.eq_n!r}")
    if not 0 < self.eq_alpha < self.eq_beta:
      raise ValueError(f"need 0 < eq_alpha < eq_beta, got eq_alpha={self.eq_alpha}, "
                       f"eq_beta={self.eq_beta}")
    if not (isinstance(self.search_round, int) and self.search_round >= 1):
      raise ValueError(f"search_round must be an int >= 1, got {self.search_round!r}")
    if not (isinstance(self.n_splits, int) and 1 <= self.n_splits <= 60):
      raise ValueError(f"n_splits must be an int in [1, 60], got {self.n_splits!r}")
    if self.candidate_batch is not None and not (
        isinstance(self.candidate_batch, int) and self.candidate_batch >= 1):
      raise ValueError("candidate_batch must be None or an int >= 1, got "
                       f"{self.candidate_batch!r}")


def check_bits(bits, what: str = "bits") -> int:
  if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
    raise ValueError(f"{what} must be an int in [2, 16], got {bits!r}")
  return bits


def qmax(bits):
  """The official ``qmax = 2^(b-1)`` (signed levels ``-m .. m-1``).

  ``bits`` is a Python int (checked) or a traced integer array (inside the jitted
  searches, so that every bit width shares one compiled search).
  """
  if isinstance(bits, (int, np.integer)) and not isinstance(bits, bool):
    return 2 ** (check_bits(int(bits)) - 1)
  if isinstance(bits, jax.Array) and jnp.issubdtype(bits.dtype, jnp.integer):
    return jnp.left_shift(jnp.int32(1), bits.astype(jnp.int32) - 1).astype(jnp.float32)
  return 2 ** (check_bits(bits) - 1)   # raises with the offending value


# ----------------------------------------------------------------------------
# Quantizers
# ----------------------------------------------------------------------------


def uniform(x: jax.Array, interval, bits) -> jax.Array:
  """``Δ · clip(round(x/Δ), -m, m-1)``; ``interval`` broadcasts against ``x``."""
  m = qmax(bits)
  return jnp.clip(jnp.round(x / interval), -m, m - 1) * interval


def post_gelu(x: jax.Array, interval, bits) -> jax.Array:
  """Twin uniform for post-GELU values: searched ``Δ₊`` above 0, fixed ``Δ₋`` below."""
  m = qmax(bits)
  neg = GELU_NEG / m
  pos = jnp.clip(jnp.round(x / interval), 0, m - 1) * interval
  return pos + jnp.clip(jnp.round(x / neg), -m, 0) * neg


def post_softmax(x: jax.Array, split, bits) -> jax.Array:
  """Twin uniform for softmax probabilities with split ``s`` (module docstring)."""
  m1 = qmax(bits) - 1
  low = split / m1
  high = jnp.clip(jnp.round(jnp.clip(x, split, 1.0) * m1), 0, m1) / m1
  return high + jnp.clip(jnp.round(jnp.clip(x, 0.0, split) / low), 0, m1) * low


def minmax_interval(absmax, bits):
  """Initial interval ``max / (m - 1/2)``; all-zero groups get the max 1 (no NaN)."""
  absmax = jnp.asarray(absmax, jnp.float32)
  absmax = jnp.where(absmax > 0, absmax, 1.0)
  return absmax / (qmax(bits) - 0.5)


def interval_candidates(init, cfg: SearchConfig = SearchConfig()) -> jax.Array:
  """``(eq_n + 1, *init.shape)``: ``(α + i(β-α)/n) · Δ₀`` for ``i = 0..n``."""
  i = jnp.arange(cfg.eq_n + 1, dtype=jnp.float32)
  ratios = cfg.eq_alpha + i * (cfg.eq_beta - cfg.eq_alpha) / cfg.eq_n
  init = jnp.asarray(init, jnp.float32)
  return ratios.reshape((-1,) + (1,) * init.ndim) * init


def split_candidates(cfg: SearchConfig = SearchConfig()) -> jax.Array:
  """Post-softmax split candidates ``2^-i``, ``i = 0..n_splits-1``."""
  return 2.0 ** -jnp.arange(cfg.n_splits, dtype=jnp.float32)


def softmax_grad(p: jax.Array, dp: jax.Array) -> jax.Array:
  """``∂L/∂S`` from ``∂L/∂P`` for ``P = softmax(S)`` over the last axis:
  ``P ⊙ (∂L/∂P - Σ_j P_j ∂L/∂P_j)`` (masked entries, ``P = 0``, get 0)."""
  return p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True))


def hessian_error(out, out_hat, grad, axis=None) -> jax.Array:
  """``Σ (g ⊙ (O - Ô))²`` over ``axis`` (all by default): the official metric, negated."""
  return jnp.sum(jnp.square(grad * (out - out_hat)), axis=axis)


def _best(errors: jax.Array, candidates: jax.Array) -> jax.Array:
  """Per group, the candidate with the least error (first on ties)."""
  idx = jnp.argmin(errors, axis=0)
  return jnp.take_along_axis(candidates, idx[None], axis=0)[0]


def _map(f, xs, cfg: SearchConfig):
  return lax.map(f, xs, batch_size=cfg.candidate_batch)


def _alternate(step_a, step_b, state, cfg: SearchConfig):
  """Up to ``search_round`` rounds of ``state = step_b(step_a(state))``.

  Stops after a round that changed nothing (a fixed point of every later round).
  Returns ``(state, rounds_run)``.
  """

  def cond(c):
    _, r, changed = c
    return (r < cfg.search_round) & changed

  def body(c):
    s, r, _ = c
    new = step_b(step_a(s))
    changed = jnp.any(jnp.stack([jnp.any(a != b) for a, b in zip(
        jax.tree.leaves(new), jax.tree.leaves(s))]))
    return new, r + 1, changed

  state, rounds, _ = lax.while_loop(cond, body, (state, jnp.int32(0), jnp.bool_(True)))
  return state, rounds


# ----------------------------------------------------------------------------
# Linear / conv (matrix view) search
# ----------------------------------------------------------------------------


def quantize_input(x, interval, bits: int | None, act: str | None):
  """Input quantizer of a linear layer: ``'uniform'``, ``'post_gelu'`` or float."""
  if act is None or bits is None:
    return x
  if act == "uniform":
    return uniform(x, interval, bits)
  if act == "post_gelu":
    return post_gelu(x, interval, bits)
  raise ValueError(f"unknown input quantizer {act!r}; expected 'uniform', "
                   "'post_gelu' or None")


def group_intervals(intervals: jax.Array, n_out: int) -> jax.Array:
  """Per-group intervals ``(n_groups,)`` -> per output column ``(n_out,)``."""
  n_groups = intervals.shape[-1]
  return jnp.repeat(intervals, n_out // n_groups, axis=-1,
                    total_repeat_length=n_out)


def quantize_weight(w: jax.Array, intervals: jax.Array, bits: int) -> jax.Array:
  """Weights ``(K, N)`` on per-group intervals ``(n_groups,)`` (contiguous columns)."""
  return uniform(w, group_intervals(intervals, w.shape[-1]), bits)


def _bits_arg(bits, what):
  """Checked Python bits -> int32 array (traced in the searches: one compile)."""
  return jnp.int32(check_bits(bits, what))


def search_linear(x: jax.Array, w: jax.Array, b: jax.Array | None,
                  out: jax.Array | None,
                  grad: jax.Array, *, w_bits: int, a_bits: int | None,
                  n_groups: int = 1, act: str | None = "uniform",
                  cfg: SearchConfig = SearchConfig()) -> dict[str, jax.Array]:
  """PTQ4ViT's search for one linear layer in matrix view ``O = X W + b``.

  Args:
    x: ``(M, K)`` float inputs (rows: tokens of every calibration image).
    w: ``(K, N)`` weight; ``b``: ``(N,)`` bias or None.
    out: ``(M, N)`` float outputs ``X W + b``, or None to compute them here (in
      float32 at full precision, as the official fp32 code); ``grad``: ``(M, N)``
      ``∂L/∂O``.
    w_bits, a_bits: bit widths (``a_bits``/``act`` None: the input stays float).
    n_groups: weight interval groups, contiguous equal blocks of the ``N``
      output columns (``n_V``: 1, 3 for a fused qkv, ``N`` for per-channel).
    act: input quantizer, ``'uniform'`` or ``'post_gelu'`` (max, not |max|, for
      its initial interval), or None.
    cfg: search hyper-parameters.

  Returns:
    dict with ``w_interval`` ``(n_groups,)``, ``a_interval`` ``()`` (NaN when the
    input stays float), ``rounds`` (rounds run) and the initial intervals
    ``w_init``, ``a_init``.
  """
  if act not in (None, "uniform", "post_gelu"):
    raise ValueError(f"unknown input quantizer {act!r}; expected 'uniform', "
                     "'post_gelu' or None")
  if act is not None and a_bits is None:
    act = None
  n = w.shape[-1]
  if n % n_groups:
    raise ValueError(f"search_linear: {n} output columns do not split into "
                     f"{n_groups} equal groups")
  if b is None:
    b = jnp.zeros((n,), jnp.float32)
  return _search_linear(x, w, b, out, grad, _bits_arg(w_bits, "w_bits"),
                        _bits_arg(a_bits if act else 8, "a_bits"),
                        n_groups=n_groups, act=act, cfg=cfg)


@functools.partial(jax.jit, static_argnames=("n_groups", "act", "cfg"))
def _search_linear(x, w, b, out, grad, w_bits, a_bits, *, n_groups, act, cfg):
  x, w, b, grad = (jnp.asarray(t, jnp.float32) for t in (x, w, b, grad))
  n = w.shape[-1]
  quant_in = act is not None
  out = (jnp.dot(x, w, precision=_HI) + b if out is None
         else jnp.asarray(out, jnp.float32))

  w_init = minmax_interval(jnp.max(jnp.abs(w).reshape(-1, n_groups, n // n_groups),
                                   axis=(0, 2)), w_bits)
  w_cands = interval_candidates(w_init, cfg)                      # (C, G)
  if quant_in:
    amax = jnp.max(x) if act == "post_gelu" else jnp.max(jnp.abs(x))
    a_init = minmax_interval(amax, a_bits)
    a_cands = interval_candidates(a_init, cfg)                    # (C,)
  else:
    a_init = jnp.float32(jnp.nan)

  def w_step(state):
    w_int, a_int = state
    xq = quantize_input(x, a_int, a_bits, act if quant_in else None)

    def err(cand):
      o = jnp.dot(xq, quantize_weight(w, cand, w_bits), precision=_HI) + b
      e = hessian_error(out, o, grad, axis=0)                     # (N,)
      return e.reshape(n_groups, -1).sum(-1)                      # (G,)

    return _best(_map(err, w_cands, cfg), w_cands), a_int

  def a_step(state):
    w_int, a_int = state
    if not quant_in:
      return state
    wq = quantize_weight(w, w_int, w_bits)

    def err(cand):
      o = jnp.dot(quantize_input(x, cand, a_bits, act), wq, precision=_HI) + b
      return hessian_error(out, o, grad)[None]

    return w_int, _best(_map(err, a_cands, cfg), a_cands[:, None])[0]

  (w_int, a_int), rounds = _alternate(
      w_step, a_step, (w_init, a_init if quant_in else jnp.float32(0)), cfg)
  return dict(w_interval=w_int,
              a_interval=a_int if quant_in else jnp.float32(jnp.nan),
              rounds=rounds, w_init=w_init, a_init=a_init)


# ----------------------------------------------------------------------------
# Attention matmuls (flax layouts: q, k, v (B, N, H, d); probs (B, H, Nq, Nk))
# ----------------------------------------------------------------------------


def _head_absmax(t: jax.Array, head_axis: int) -> jax.Array:
  axes = tuple(i for i in range(t.ndim) if i != head_axis % t.ndim)
  return jnp.max(jnp.abs(t), axis=axes)


def qk_logits(q, k):
  """``S[b, h, i, j] = Σ_d q[b, i, h, d] k[b, j, h, d] / √d`` (flax's scaling and einsum)."""
  q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
  return jnp.einsum("...qhd,...khd->...hqk", q, k, precision=_HI)


def pv_out(p, v):
  """``O[b, i, h, d] = Σ_j p[b, h, i, j] v[b, j, h, d]`` (flax's einsum)."""
  return jnp.einsum("...hqk,...khd->...qhd", p, v, precision=_HI)


def search_qk(q: jax.Array, k: jax.Array, s: jax.Array | None, grad: jax.Array, *,
              bits: int, cfg: SearchConfig = SearchConfig()) -> dict[str, jax.Array]:
  """Per-head intervals of q and k for ``S = q·kᵀ`` (``PTQSLBatchingQuantMatMul``).

  q and k are quantized as the projections give them (before flax's ``1/√d``,
  as the official code quantizes ``q`` and ``kᵀ`` before its ``* scale``); the
  error is measured on the scaled logits (a constant factor: same argmin).

  Args:
    q: ``(B, Nq, H, d)``, k: ``(B, Nk, H, d)``, s: ``(B, H, Nq, Nk)`` the float
      logits ``q·kᵀ/√d`` (None: computed here) and grad ``∂L/∂S`` (same shape).
    bits: A bits of both operands.

  Returns:
    dict with ``q_interval``, ``k_interval`` ``(H,)``, ``rounds`` and the inits.
  """
  return _search_qk(q, k, s, grad, _bits_arg(bits, "bits"), cfg=cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _search_qk(q, k, s, grad, bits, *, cfg):
  q, k, grad = (jnp.asarray(t, jnp.float32) for t in (q, k, grad))
  s = qk_logits(q, k) if s is None else jnp.asarray(s, jnp.float32)
  head = lambda iv: iv[:, None]                       # (H,) against (..., H, d)
  q_init = minmax_interval(_head_absmax(q, -2), bits)
  k_init = minmax_interval(_head_absmax(k, -2), bits)
  q_cands, k_cands = interval_candidates(q_init, cfg), interval_candidates(k_init, cfg)
  per_head = lambda e: jnp.sum(e, axis=(0, 2, 3))     # (B, H, Nq, Nk) -> (H,)

  def q_step(state):
    q_int, k_int = state
    kq = uniform(k, head(k_int), bits)

    def err(cand):
      sq = qk_logits(uniform(q, head(cand), bits), kq)
      return per_head(jnp.square(grad * (s - sq)))

    return _best(_map(err, q_cands, cfg), q_cands), k_int

  def k_step(state):
    q_int, k_int = state
    qq = uniform(q, head(q_int), bits)

    def err(cand):
      sq = qk_logits(qq, uniform(k, head(cand), bits))
      return per_head(jnp.square(grad * (s - sq)))

    return q_int, _best(_map(err, k_cands, cfg), k_cands)

  (q_int, k_int), rounds = _alternate(q_step, k_step, (q_init, k_init), cfg)
  return dict(q_interval=q_int, k_interval=k_int, rounds=rounds,
              q_init=q_init, k_init=k_init)


def search_pv(p: jax.Array, v: jax.Array, o: jax.Array | None, grad: jax.Array, *,
              bits: int, cfg: SearchConfig = SearchConfig()) -> dict[str, jax.Array]:
  """Softmax split and per-head v intervals for ``O = probs·v``.

  ``SoSPTQSLBatchingQuantMatMul``: the split among ``2^-i`` on the error of
  ``Q_split(probs)·v`` (v float), then per-head v intervals with the probabilities
  quantized; ``search_round`` alternating rounds.

  Args:
    p: ``(B, H, Nq, Nk)`` softmax probabilities, v: ``(B, Nk, H, d)``,
      o: ``(B, Nq, H, d)`` float output (None: computed here) and grad ``∂L/∂O``
      (same shape).
    bits: A bits of both operands.

  Returns:
    dict with ``split`` ``()``, ``v_interval`` ``(H,)``, ``rounds``, ``v_init``.
  """
  return _search_pv(p, v, o, grad, _bits_arg(bits, "bits"), cfg=cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _search_pv(p, v, o, grad, bits, *, cfg):
  p, v, grad = (jnp.asarray(t, jnp.float32) for t in (p, v, grad))
  o = pv_out(p, v) if o is None else jnp.asarray(o, jnp.float32)
  head = lambda iv: iv[:, None]
  v_init = minmax_interval(_head_absmax(v, -2), bits)
  v_cands = interval_candidates(v_init, cfg)
  splits = split_candidates(cfg)
  per_head = lambda e: jnp.sum(e, axis=(0, 1, 3))     # (B, Nq, H, d) -> (H,)

  def split_step(state):
    _, v_int = state

    def err(split):
      return hessian_error(o, pv_out(post_softmax(p, split, bits), v), grad)[None]

    return _best(_map(err, splits, cfg), splits[:, None])[0], v_int

  def v_step(state):
    split, v_int = state
    pq = post_softmax(p, split, bits)

    def err(cand):
      return per_head(jnp.square(grad * (o - pv_out(pq, uniform(v, head(cand), bits)))))

    return split, _best(_map(err, v_cands, cfg), v_cands)

  # The official initial split (0.01) is overwritten by the first split search.
  (split, v_int), rounds = _alternate(split_step, v_step,
                                      (jnp.float32(0.01), v_init), cfg)
  return dict(split=split, v_interval=v_int, rounds=rounds, v_init=v_init)
