"""Error-reduction linear algebra shared by ERQ (Aqer, Wqer) and GPTQ.

Pure ``jax.numpy`` functions on one layer's weight matrix and on *streamed*
statistics of its inputs (the "model side" at the end of the module finds a
model's layers and streams those statistics through :mod:`s2d_jax.ptq.ops`;
nothing above it knows about models). Layout is the
project's matrix view: a layer computes ``y = x @ W + b`` with ``x (N, d)``,
``W (d, out)``, ``b (out,)`` (Dense as is; attention q/k/v ``(D, H, Dh)`` ->
``(D, H·Dh)``, out ``(H, Dh, D)`` -> ``(H·Dh, D)``; a conv's im2col rows). With
a bias the weight is augmented to ``W̃ = [W; b]`` ``(d+1, out)`` and the input to
``A = [x, 1]`` ``(N, d+1)``, so ``y = A @ W̃``.

Streamed statistics (:class:`Moments`). Over calibration batches, for the
layer's float input ``x`` and its quantized input ``x̄ = Q_a(x)``
(``Ā = [x̄, 1]``, ``F = [x, 1]``), accumulate in float32

    aa = Σ Āᵀ Ā  (d+1, d+1)        af = Σ Āᵀ F  (d+1, d+1)

never holding the activations themselves. ``aa[d, d] = N`` (the token count),
``aa[:d, d] = Σ x̄`` (so the mean ``μ`` is in it too). Batches and devices
combine by plain addition.

**Aqer** (ERQ, Zhong et al. ICML 2024, Sec. 4.1; ``replace_W`` in the official
``test_quant_expand.py``): with ``y_float = F W̃`` the float layer output, the
ridge regression ``min_β ‖Ā (W̃ + β) − y_float‖² + λ₁ ‖β‖²``, i.e. with
``Y = y_float − Ā W̃``,

    β = (ĀᵀĀ + λ₁ I)⁻¹ ĀᵀY = (aa + λ₁ I)⁻¹ (af − aa) W̃,      W̃ ← W̃ + β

(the ``I`` covers the bias row too, as in the official code). :func:`aqer`.

**Wqer** (Sec. 4.2; ``replace_W_afterquant_vector_twopart``): quantize the
rows of ``W̃`` (the input features) in *successive halves*: with ``n`` the
number of rows of ``W̃`` (``d+1`` with a bias, whose row is never quantized),
``done = 0``; while ``n − done > 1``: the block ``B = [done, done + ⌊(n −
done)/2⌋)``, ``R = [end of B, n)`` the rows still in float:

1. errors of the three roundings on the *fixed* weight grid ``(s, z)`` of the
   calibrated weight quantizer: ``δ^∘ = Q^∘(W̃_B) − W̃_B`` for ∘ ∈ {round,
   floor, ceil}, ``Q^∘(w) = s·(clip(∘(w/s) + z, 0, 2^b − 1) − z)``;
2. *rounding refinement* per output channel ``o`` (a column here) from
   ``δ = δ^round``, minimising the proxy ``δᵀ C δ`` with
   ``C = μμᵀ + Σ`` the mean and (unbiased) covariance of ``x̄_B``,
   ``C = (aa_BB − μμᵀ)/(N − 1)`` with ``μ = aa_{B,d}/N``: at most
   ``max_steps`` (100) times: ``g = 2 C δ``; among the coordinates with
   ``δ_j g_j > 0`` take ``j = argmax |g_j|``; ``v = δ_j − g_j`` snapped to the
   nearer of ``δ^ceil_j``, ``δ^floor_j`` (ties: ceil); keep it if the proxy
   does not increase, else undo it and stop this channel (:func:`refine_rounding`);
3. the block goes on the grid, ``W̃_B ← Q(W̃_B)`` (= ``W̃_B + δ``), and the
   float rows compensate by ridge regression,
   ``W̃_R ← W̃_R − (aa_RR + λ₂ I)⁻¹ aa_RB δ``
   (the minimiser of ``‖Ā_R Δ_R + Ā_B δ‖² + λ₂‖Δ_R‖²``).

The last row left is the bias (stays float); without a bias it is the last
weight row, which is then rounded to nearest (the official code leaves it
to the final weight quantizer). Output channels are independent throughout
(the official code processes them in groups of 500 only to bound memory).
:func:`wqer` runs every half with the same shapes (the block and the float
rows are masks over all rows, the float rows' system padded with identity):
one compiled loop body per layer shape, at the price of ``n × n`` instead of
shrinking solves: ``⌈log₂ n⌉`` Cholesky factorisations of size ``n`` (ViT-B's
fc2, ``n = 3073``: 12 × n³/3 ≈ 1.2·10¹¹ flop, against ≈ 1.4·10⁹ for the
shrinking ones) and a refinement over all ``n`` rows per half.

**GPTQ** (Frantar et al. ICLR 2023, Alg. 1; IST-DASLab/gptq ``fasterquant``):
``H = XᵀX`` (the scale is irrelevant), dead inputs (``H_ii = 0``) get
``H_ii = 1`` and ``W_i = 0``; ``H += percdamp·mean(diag H)·I``;
``U = chol(H⁻¹)ᵀ`` (upper, ``UᵀU = H⁻¹``); input rows in order, in lazy blocks
of ``blocksize``: ``q_i = Q(w_i)``, ``e_i = (w_i − q_i)/U_ii``,
``W_{j≥i} −= U_{i,j} e_i`` (the OBS update), the rows after the block updated
once per block. :func:`gptq`.

All solves are Cholesky in float32 on symmetric positive definite systems
(the ridge / damping term makes them well posed); every function is jitted
with static shapes (the halves a ``lax.fori_loop``, the rounding refinement a
``lax.while_loop``, GPTQ's lazy blocks a static loop of ``lax.fori_loop``\ s),
and bit widths are traced values (one compilation for every setting).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import linalg as jsl

from s2d_jax import intercept
from s2d_jax import spectral
from s2d_jax.ptq import ops

_HI = jax.lax.Precision.HIGHEST
ROUNDINGS = ("round", "floor", "ceil")


class Moments(NamedTuple):
  """Streamed input statistics of one layer (see module docstring).

  Attributes:
    aa: ``Σ ĀᵀĀ`` ``(..., d+1, d+1)`` float32, ``Ā = [x̄, 1]``.
    af: ``Σ ĀᵀF`` ``(..., d+1, d+1)`` float32, ``F = [x, 1]``; ``None`` when
      only ``aa`` is needed (Wqer, GPTQ).
  """
  aa: jax.Array
  af: jax.Array | None = None

  @property
  def count(self) -> jax.Array:
    """Number of accumulated rows (tokens) ``N``."""
    return self.aa[..., -1, -1]


def _augment(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
  return jnp.concatenate([x, jnp.ones((x.shape[0], 1), jnp.float32)], axis=1)


def batch_moments(x_quant: jax.Array, x_float: jax.Array | None = None
                  ) -> Moments:
  """One batch's :class:`Moments` from inputs ``(..., d)`` (all leading axes = rows).

  Args:
    x_quant: the layer's input as quantized by its activation quantizer (``x̄``);
      for weight-only methods the float input.
    x_float: the float input ``x`` (same shape) for ``af``; None to skip ``af``.
  """
  a = _augment(x_quant)
  aa = jnp.einsum("ni,nj->ij", a, a, precision=_HI)
  if x_float is None:
    return Moments(aa)
  if x_float.shape != x_quant.shape:
    raise ValueError(f"batch_moments: x_float {x_float.shape} and x_quant "
                     f"{x_quant.shape} differ in shape")
  return Moments(aa, jnp.einsum("ni,nj->ij", a, _augment(x_float), precision=_HI))


def add_moments(m1: Moments, m2: Moments) -> Moments:
  """Sum of two :class:`Moments` (batches, devices); ``af`` kept if both have it."""
  af = None if m1.af is None or m2.af is None else m1.af + m2.af
  return Moments(m1.aa + m2.aa, af)


def _check_square(name, g, n):
  if g.shape[-2:] != (n, n):
    raise ValueError(f"{name}: expected statistics of shape ({n}, {n}) for a "
                     f"weight with {n - 1} input rows (+ ones row), got {g.shape}")


def _spd_solve(g: jax.Array, rhs: jax.Array, lam) -> jax.Array:
  """``(g + lam·I)⁻¹ rhs`` by Cholesky (g symmetric PSD, lam > 0)."""
  g = 0.5 * (g + g.T) + lam * jnp.eye(g.shape[0], dtype=g.dtype)
  return jsl.cho_solve(jsl.cho_factor(g, lower=True), rhs)


@jax.jit
def aqer(w: jax.Array, b: jax.Array | None, moments: Moments, lam: float
         ) -> tuple[jax.Array, jax.Array | None]:
  """Aqer: ridge-regression update of a float weight for its quantized input.

  ``[W; b] += (aa + λ I)⁻¹ (af − aa) [W; b]`` (module docstring); without a
  bias the ones row/column of the statistics is dropped.

  Args:
    w: ``(d, out)`` float weight (matrix view).
    b: ``(out,)`` bias or None.
    moments: the layer's :class:`Moments` with ``af``, shapes ``(d+1, d+1)``.
    lam: ridge coefficient λ₁ > 0.

  Returns:
    ``(w_new, b_new)`` (``b_new`` None without a bias), float32.
  """
  d = w.shape[0]
  if moments.af is None:
    raise ValueError("aqer: moments.af (Σ ĀᵀF) is required; accumulate with x_float")
  _check_square("aqer", moments.aa, d + 1)
  _check_square("aqer", moments.af, d + 1)
  aa, af = moments.aa, moments.af
  w = jnp.asarray(w, jnp.float32)
  if b is None:
    aa, af, wc = aa[:d, :d], af[:d, :d], w
  else:
    wc = jnp.concatenate([w, jnp.asarray(b, jnp.float32)[None]], axis=0)
  rhs = jnp.matmul(af - aa, wc, precision=_HI)
  wc = wc + _spd_solve(aa, rhs, lam)
  if b is None:
    return wc, None
  return wc[:d], wc[d]


# ----------------------------------------------------------------- weight grid

@functools.partial(jax.jit, static_argnames=("rounding",))
def grid_quantize(w: jax.Array, scale: jax.Array, zero: jax.Array, qmax: int,
                  rounding: str = "round") -> jax.Array:
  """``s·(clip(∘(w/s) + z, 0, qmax) − z)`` with ∘ = round (half to even) / floor / ceil.

  The asymmetric integer grid of RepQ-ViT / ERQ / GPTQ weight quantizers;
  ``scale`` and ``zero`` (integer valued) broadcast against ``w``; ``qmax``
  may be traced (one compile for every bit width).
  """
  if rounding not in ROUNDINGS:
    raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
  r = {"round": jnp.round, "floor": jnp.floor, "ceil": jnp.ceil}[rounding]
  return (jnp.clip(r(w / scale) + zero, 0, qmax) - zero) * scale


@jax.jit
def minmax_grid(w: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
  """GPTQ's weight quantizer: per output channel (column) asymmetric min–max.

  ``lo = min(min_i w_io, 0)``, ``hi = max(max_i w_io, 0)`` (an all-zero column
  gets ``[−1, 1]``), ``s = (hi − lo)/(2^b − 1)``, ``z = round(−lo/s)``.
  Returns ``(scale, zero)`` of shape ``(1, out)``.
  """
  lo = jnp.minimum(jnp.min(w, axis=0, keepdims=True), 0.0)
  hi = jnp.maximum(jnp.max(w, axis=0, keepdims=True), 0.0)
  dead = (lo == 0) & (hi == 0)
  lo, hi = jnp.where(dead, -1.0, lo), jnp.where(dead, 1.0, hi)
  s = (hi - lo) / (jnp.exp2(jnp.asarray(bits, jnp.float32)) - 1.0)
  return s, jnp.round(-lo / s)


# ---------------------------------------------------------------------- Wqer

def halves(n: int) -> list[tuple[int, int]]:
  """The successive-halves schedule: blocks ``[start, stop)`` over ``n`` rows.

  ``halves(385) = [(0, 192), (192, 288), ..., (383, 384)]``: each block is the
  first ⌊r/2⌋ of the ``r`` rows left; it stops when one row is left.
  """
  out, done = [], 0
  while n - done > 1:
    k = (n - done) // 2
    out.append((done, done + k))
    done += k
  return out


def proxy(delta: jax.Array, c: jax.Array) -> jax.Array:
  """Wqer's proxy ``δᵀ C δ`` per output channel: ``delta (k, out)`` -> ``(out,)``."""
  return jnp.einsum("io,ij,jo->o", delta, c, delta, precision=_HI)


@functools.partial(jax.jit, static_argnames=("max_steps",))
def refine_rounding(err_floor: jax.Array, err_ceil: jax.Array, up: jax.Array,
                    c: jax.Array, max_steps: int = 100
                    ) -> tuple[jax.Array, jax.Array]:
  """Wqer's rounding refinement (module docstring, step 2), all channels at once.

  Args:
    err_floor, err_ceil: ``(k, out)`` errors ``Q^floor(w) − w`` (≤ 0) and
      ``Q^ceil(w) − w`` (≥ 0) of one block.
    up: ``(k, out)`` bool, the starting choice (True = ceil), e.g. nearest.
    c: ``(k, k)`` symmetric PSD proxy matrix ``μμᵀ + Σ``.
    max_steps: most accepted moves per channel (the official 100).

  Returns:
    ``(up, steps)``: the refined choice and the number of loop iterations run.
    Per channel: take ``j = argmax{|g_j| : δ_j g_j > 0}`` for ``g = 2Cδ``;
    ``v = δ_j − g_j`` snapped to the nearer of ceil/floor (ties to ceil); keep
    it iff the proxy change ``t·g_j + t²·C_jj ≤ 0`` (``t`` the move), else the
    channel stops (it would make the same move again). ``g`` is updated by
    ``2t·C_j`` instead of recomputed (the same numbers, O(k) per move).
  """
  c = jnp.asarray(c, jnp.float32)
  err_floor = jnp.asarray(err_floor, jnp.float32).T   # (out, k): rows = channels
  err_ceil = jnp.asarray(err_ceil, jnp.float32).T
  up = jnp.asarray(up, bool).T
  n_out = up.shape[0]
  cdiag = jnp.diagonal(c)
  delta = jnp.where(up, err_ceil, err_floor)
  g = 2.0 * jnp.matmul(delta, c, precision=_HI)

  def cond(state):
    step, _, _, _, active = state
    return (step < max_steps) & jnp.any(active)

  cols = jnp.arange(up.shape[1])

  def body(state):
    step, up, delta, g, active = state
    cand = delta * g > 0
    has = jnp.any(cand, axis=1)
    j = jnp.argmax(jnp.where(cand, jnp.abs(g), -1.0), axis=1)
    hot = cols[None, :] == j[:, None]                       # (out, k) one-hot
    pick = lambda a: jnp.sum(jnp.where(hot, a, 0.0), axis=1)
    dj, gj, cj, fj = pick(delta), pick(g), pick(err_ceil), pick(err_floor)
    v = dj - gj
    new_up = jnp.abs(v - cj) <= jnp.abs(v - fj)
    t = jnp.where(new_up, cj, fj) - dj
    change = t * gj + t * t * cdiag[j]
    move = active & has & (change <= 0) & (t != 0)
    tm = jnp.where(move, t, 0.0)
    up = jnp.where(hot & move[:, None], new_up[:, None], up)
    delta = delta + jnp.where(hot, tm[:, None], 0.0)
    g = g + 2.0 * tm[:, None] * jnp.take(c, j, axis=0)
    return step + 1, up, delta, g, move

  active = jnp.ones((n_out,), bool)
  steps, up, _, _, _ = jax.lax.while_loop(
      cond, body, (jnp.int32(0), up, delta, g, active))
  return up.T, steps


def proxy_matrix(aa: jax.Array, start: int, stop: int) -> jax.Array:
  """``C = μμᵀ + Σ`` of ``x̄`` rows ``[start, stop)`` from ``aa`` (unbiased Σ)."""
  n = aa[-1, -1]
  s = aa[start:stop, start:stop]
  mu = aa[start:stop, -1] / n
  return (s - jnp.outer(mu, mu)) / (n - 1.0)


@functools.partial(jax.jit, static_argnames=("refine", "max_steps"))
def wqer(w: jax.Array, b: jax.Array | None, aa: jax.Array, scale: jax.Array,
         zero: jax.Array, qmax: int, lam: float, *, refine: bool = True,
         max_steps: int = 100) -> jax.Array:
  """Wqer: weight on its grid with rounding refinement and ridge compensation.

  Args:
    w: ``(d, out)`` float weight (after Aqer).
    b: ``(out,)`` bias or None; it absorbs the last compensation and stays float.
    aa: ``(d+1, d+1)`` ``Σ ĀᵀĀ`` of the quantized input (ones last).
    scale, zero: the calibrated weight grid, broadcastable to ``(d, out)``.
    qmax: ``2^bits − 1``.
    lam: ridge coefficient λ₂ > 0.
    refine: run the rounding refinement (the official code skips it for the
      patch-embedding convolution).
    max_steps: refinement steps per block and channel.

  Returns:
    ``(w_q, b_new)``: ``w_q (d, out)`` exactly on the grid, ``b_new`` the
    compensated bias (None without a bias).
  """
  d, n_out = w.shape
  _check_square("wqer", aa, d + 1)
  w = jnp.asarray(w, jnp.float32)
  aa = jnp.asarray(aa, jnp.float32)
  n = d if b is None else d + 1
  pad = ((0, n - d), (0, 0))
  scale = jnp.pad(jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (d, n_out)),
                  pad, constant_values=1.0)
  zero = jnp.pad(jnp.broadcast_to(jnp.asarray(zero, jnp.float32), (d, n_out)), pad)
  cur = w if b is None else jnp.concatenate(
      [w, jnp.asarray(b, jnp.float32)[None]], axis=0)
  g = aa[:n, :n]
  # the proxy matrix of all weight rows (the bias row, if any, never in a block)
  c_all = jnp.pad(proxy_matrix(aa, 0, d), pad[:1] * 2)
  sched = halves(n)
  starts = jnp.asarray([a for a, _ in sched], jnp.int32)
  stops = jnp.asarray([z for _, z in sched], jnp.int32)
  idx = jnp.arange(n)

  def one_half(h, cur):
    # Fixed shapes for every half (one compiled body): the block B and the
    # float rows R are masks over all n rows; R's system is padded with identity.
    in_b = (idx >= starts[h]) & (idx < stops[h])
    in_r = idx >= stops[h]
    qf = grid_quantize(cur, scale, zero, qmax, "floor")
    qc = grid_quantize(cur, scale, zero, qmax, "ceil")
    up = grid_quantize(cur, scale, zero, qmax, "round") == qc
    if refine:
      mb = in_b[:, None]
      up, _ = refine_rounding(jnp.where(mb, qf - cur, 0.0),
                              jnp.where(mb, qc - cur, 0.0), up,
                              c_all * (mb & in_b[None, :]), max_steps)
    qb = jnp.where(up, qc, qf)
    delta = jnp.where(in_b[:, None], qb - cur, 0.0)
    rhs = jnp.where(in_r[:, None], jnp.matmul(g, delta, precision=_HI), 0.0)
    g_r = jnp.where(in_r[:, None] & in_r[None, :], g, 0.0)
    g_r = g_r + jnp.diag(jnp.where(in_r, lam, 1.0))
    comp = jsl.cho_solve(jsl.cho_factor(0.5 * (g_r + g_r.T), lower=True), rhs)
    return jnp.where(in_b[:, None], qb, cur - comp)

  cur = jax.lax.fori_loop(0, len(sched), one_half, cur)
  if b is None:  # the last weight row: nearest rounding, no one left to compensate
    cur = cur.at[n - 1].set(grid_quantize(cur[n - 1], scale[n - 1], zero[n - 1],
                                          qmax))
    return cur, None
  return cur[:d], cur[d]


# ---------------------------------------------------------------------- GPTQ

@functools.partial(jax.jit, static_argnames=("blocksize",))
def gptq(w: jax.Array, h: jax.Array, scale: jax.Array, zero: jax.Array,
         qmax: int, *, blocksize: int = 128, percdamp: float = 0.01
         ) -> jax.Array:
  """GPTQ (module docstring): ``w (d, out)``, ``h = XᵀX (d, d)`` -> ``Q (d, out)``.

  ``scale``/``zero`` (the grid, broadcastable to ``(d, out)``) are fixed
  beforehand, as GPTQ does with ``find_params`` on the original weight.
  Returns the quantized weight, exactly on the grid.
  """
  d, n_out = w.shape
  if h.shape != (d, d):
    raise ValueError(f"gptq: Hessian shape {h.shape} does not match weight rows {d}")
  if blocksize < 1:
    raise ValueError(f"gptq: blocksize must be >= 1, got {blocksize}")
  w = jnp.asarray(w, jnp.float32)
  h = 0.5 * (h + h.T).astype(jnp.float32)
  scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (d, n_out))
  zero = jnp.broadcast_to(jnp.asarray(zero, jnp.float32), (d, n_out))
  hd = jnp.diagonal(h)
  dead = hd == 0
  h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
  w = jnp.where(dead[:, None], 0.0, w)
  h = h + percdamp * jnp.mean(jnp.diagonal(h)) * jnp.eye(d, dtype=h.dtype)
  hinv = jsl.cho_solve(jsl.cho_factor(h, lower=True), jnp.eye(d, dtype=h.dtype))
  u = jnp.linalg.cholesky(0.5 * (hinv + hinv.T)).T   # upper, UᵀU = H⁻¹
  q_rows = []
  for i1 in range(0, d, blocksize):
    i2 = min(i1 + blocksize, d)
    u1 = u[i1:i2, i1:i2]
    s1, z1 = scale[i1:i2], zero[i1:i2]

    def col(i, carry, u1=u1, s1=s1, z1=z1):
      w1, q1, e1 = carry
      wi = w1[i]
      qi = grid_quantize(wi, s1[i], z1[i], qmax)
      ei = (wi - qi) / u1[i, i]
      w1 = w1 - jnp.outer(u1[i], ei)   # u1 upper: rows j < i untouched
      return w1, q1.at[i].set(qi), e1.at[i].set(ei)

    w1 = w[i1:i2]
    _, q1, e1 = jax.lax.fori_loop(
        0, i2 - i1, col, (w1, jnp.zeros_like(w1), jnp.zeros_like(w1)))
    q_rows.append(q1)
    if i2 < d:
      w = w.at[i2:].add(-jnp.matmul(u[i1:i2, i2:].T, e1, precision=_HI))
  return jnp.concatenate(q_rows, axis=0)


# ================================================================ model side
#
# Layers of a Flax model seen from the outside (s2d_jax.intercept): which matmuls
# there are, in forward order, their kernels as matrices, and their input moments
# streamed over calibration batches inside one jitted forward pass per batch.

@dataclasses.dataclass(frozen=True)
class Layer:
  """One matmul layer (Dense / DenseGeneral / Conv) of a model.

  Attributes:
    path: module path, e.g. ``'Transformer/encoderblock_0/MlpBlock_0/Dense_0'``
      (= the path of its params; under ``nn.scan`` the stacked module).
    kind: ``'Dense'``, ``'DenseGeneral'`` or ``'Conv'``.
    view: matrix view of the *stored* kernel (leading layer axis under scan).
    bias: whether the layer has a bias.
    calls: calls per forward pass. Statistics use the **last** call (big_vision's
      head is called on the token map, then on the pooled features that make
      the logits).
    input_ndim: rank of the last call's input as the layer sees it (2 for a
      pooled ``(B, D)`` input: ERQ's "2-D input" rule).
    order: position of the layer's first call in the forward pass.
    shares: path of the first layer in forward order called (last call) with the
      very same input array and the same parent module (attention q/k/v on one
      input: their statistics are identical and computed once); itself if none.
  """
  path: str
  kind: str
  view: spectral.MatrixView
  bias: bool
  calls: int
  input_ndim: int
  order: int
  shares: str

  @property
  def depth(self) -> int:
    """Stacked layers under ``nn.scan`` (1 in the loop layout)."""
    return self.view.num_matrices

  @property
  def rows(self) -> int:
    return self.view.rows

  @property
  def cols(self) -> int:
    return self.view.cols


def _parent(path: str) -> str:
  return path.rsplit("/", 1)[0] if "/" in path else ""


def discover_layers(apply_fn: Callable[..., Any], variables: Mapping[str, Any],
                    images: jax.Array, **apply_kwargs: Any) -> list[Layer]:
  """All matmul layers of ``apply_fn`` in forward order (traced, nothing run)."""
  counter = intercept.CallCounter()
  calls: dict[str, dict[int, tuple[Any, int]]] = {}
  kinds: dict[str, tuple[str, bool]] = {}
  order: list[str] = []

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if (intercept.is_call(context) and intercept.is_matmul(mod) and args
        and not intercept.is_wrapped(mod)):
      path = intercept.module_path(mod)
      i = counter.index(mod, path)
      if path not in kinds:
        kinds[path] = (type(mod).__name__, bool(getattr(mod, "use_bias", True)))
        order.append(path)
      # keep the input object itself: identity marks layers sharing one input
      calls.setdefault(path, {})[i] = (args[0], jnp.ndim(args[0]))
    return next_fun(*args, **kwargs)

  def f(v, x):
    with nn.intercept_methods(interceptor):
      return apply_fn(v, x, **apply_kwargs)

  jax.eval_shape(f, variables, images)
  params = variables["params"]
  layers, first_input = [], {}
  for k, path in enumerate(order):
    kernel = intercept.subtree(params, path + "/kernel")
    if kernel is None:
      raise ValueError(f"layer {path!r}: no params at '{path}/kernel'")
    kp = tuple(path.split("/")) + ("kernel",)
    view = spectral.matrix_view(kp, kernel.shape)
    if view is None:
      raise ValueError(f"layer {path!r}: kernel {kernel.shape} has no matrix view")
    last = calls[path][max(calls[path])]
    shares = path
    for other, (obj, parent) in first_input.items():
      if obj is last[0] and parent == _parent(path):
        shares = other
        break
    else:
      first_input[path] = (last[0], _parent(path))
    kind, bias = kinds[path]
    bias = bias and intercept.subtree(params, path + "/bias") is not None
    layers.append(Layer(path, kind, view, bias, len(calls[path]), last[1], k,
                        shares))
  calls.clear()
  first_input.clear()
  return layers


def split_batches(images: Any, batch_size: int) -> list[np.ndarray]:
  """Consecutive batches of at most ``batch_size`` (the order is part of the
  result), sliced on the host (no per-slice device program)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  images = np.asarray(images)
  return [images[i:i + batch_size] for i in range(0, images.shape[0], batch_size)]


@jax.jit
def _tree_add(a, b):
  return jax.tree.map(jnp.add, a, b)


MOMENTS = "moments"   # name of the moments record at a matmul_input point


class MomentStream:
  """Streams :class:`Moments` of the inputs of the layers ``paths`` over images.

  ``MomentStream(apply_fn, paths, ...)(variables, images)`` runs one *float*
  forward pass per batch through the PTQ op interception
  (:mod:`s2d_jax.ptq.ops`, calibration mode), jitted once and reused across
  calls with new ``variables``. At each listed layer's ``matmul_input`` point,
  ``x̄ = act_provider(ctx, x)`` (the layer's calibrated activation quantizer,
  whose state is in ``variables``; identity if None) and the moments of
  ``matmul_rows(x̄)`` (and of ``x`` if ``with_float``) are recorded, so that
  only ``(d+1)²`` numbers per layer and call leave the pass; the pass itself
  continues in float. Batches are summed in order (deterministic). Under
  ``nn.scan`` a stacked layer's moments carry the layer axis. A module
  called several times contributes its **last** call.
  """

  def __init__(self, apply_fn: Callable[..., Any], paths: Iterable[str], *,
               act_provider: Callable[[Any, jax.Array], jax.Array] | None = None,
               with_float: bool = False, **apply_kwargs: Any):
    self.paths = frozenset(paths)
    self.with_float = with_float
    paths_ = self.paths

    def stats(ctx, x):
      p = ctx.point
      if p.kind == "matmul_input" and p.path in paths_:
        xq = x if act_provider is None else act_provider(ctx, x)
        rows_q = intercept.matmul_rows(ctx.module, jnp.asarray(xq, jnp.float32))
        rows_f = (intercept.matmul_rows(ctx.module, jnp.asarray(x, jnp.float32))
                  if with_float else None)
        m = batch_moments(rows_q, rows_f)
        ctx.put({"aa": m.aa} if m.af is None else {"aa": m.aa, "af": m.af},
                MOMENTS)
      return x

    stats.attention = False   # q, k, probs, v: float (nothing to record there)
    f = ops.intercepted(apply_fn, stats, mode="calib")
    suffix = "." + MOMENTS

    def one(variables, x):
      _, tree = f(variables, x, **apply_kwargs)
      out = {}
      for (path, name), v in ops.entries(tree).items():
        if name.endswith(suffix):
          out[f"{path}|{name}"] = v
      return out

    self._one = jax.jit(one)

  def __call__(self, variables: Mapping[str, Any], images: jax.Array,
               batch_size: int = 32) -> dict[str, Moments]:
    """``{path: Moments}`` summed over ``images`` in batches of ``batch_size``."""
    total = None
    for batch in split_batches(images, batch_size):
      tree = self._one(variables, batch)
      total = tree if total is None else _tree_add(total, tree)
    last: dict[str, tuple[int, Moments]] = {}
    for key, v in (total or {}).items():
      path, name = key.split("|")
      point = name[len(ops.PREFIX):-len(MOMENTS) - 1]     # 'matmul_input@1'
      call = int(point.split("@")[1]) if "@" in point else 0
      if path not in last or call > last[path][0]:
        last[path] = (call, Moments(v["aa"], v.get("af")))
    missing = sorted(self.paths - set(last))
    if missing:
      raise ValueError(f"MomentStream: layers {missing} were not called")
    return {path: m for path, (_, m) in sorted(last.items())}


def torch_row_order(layer: Layer) -> np.ndarray | None:
  """For a Conv, the permutation of its matrix-view rows into PyTorch's order.

  Flax kernels ``(*kernel, cin, cout)`` give rows ordered ``(*kernel, cin)``;
  the official codes flatten ``(cout, cin, *kernel)`` weights, rows ordered
  ``(cin, *kernel)``. Order matters to the order-dependent algorithms (Wqer's
  successive halves, GPTQ's column sweep): ``rows[perm]`` is PyTorch's order,
  ``rows_torch[argsort(perm)]`` ours. None for Dense / DenseGeneral (same order).
  """
  if layer.kind != "Conv":
    return None
  shape = layer.view.shape[layer.view.batch_ndim:]
  kernel, cin = tuple(shape[:-2]), shape[-2]
  return np.asarray([np.ravel_multi_index(sp + (c,), kernel + (cin,))
                     for c in range(cin) for sp in np.ndindex(*kernel)], np.int32)


def layer_matrix(params: Mapping[str, Any], layer: Layer, index: int | None = None
                 ) -> tuple[jax.Array, jax.Array | None]:
  """``(W (rows, cols), b (cols,) | None)`` of ``layer`` (layer ``index`` under scan)."""
  w = layer.view.to_matrix(jnp.asarray(intercept.subtree(params, layer.path + "/kernel")))
  b = intercept.subtree(params, layer.path + "/bias") if layer.bias else None
  if b is not None:
    b = jnp.asarray(b).reshape(layer.view.batch_shape + (layer.cols,))
  if layer.view.batch_ndim:
    if index is None:
      raise ValueError(f"layer {layer.path!r} is stacked ({layer.depth} layers): "
                       "pass index=")
    w = w.reshape((-1,) + w.shape[-2:])[index]
    b = None if b is None else b.reshape(-1, layer.cols)[index]
  return w, b


def _replace(tree: Mapping[str, Any], parts: tuple[str, ...], value: Any):
  out = dict(tree)
  out[parts[0]] = value if len(parts) == 1 else _replace(tree[parts[0]], parts[1:],
                                                         value)
  return out


def set_layer_matrix(params: Mapping[str, Any], layer: Layer, w: jax.Array,
                     b: jax.Array | None, index: int | None = None
                     ) -> dict[str, Any]:
  """``params`` with ``layer``'s kernel (and bias, if given) set from matrix ``w``.

  Values are cast to the stored dtype; under scan only layer ``index`` changes.
  """
  parts = tuple(layer.path.split("/"))
  kernel = jnp.asarray(intercept.subtree(params, layer.path + "/kernel"))
  core = layer.view.shape[layer.view.batch_ndim:]
  new_k = w.reshape(core).astype(kernel.dtype)
  if layer.view.batch_ndim:
    flat = kernel.reshape((-1,) + core).at[index].set(new_k)
    new_k = flat.reshape(kernel.shape)
  params = _replace(params, parts + ("kernel",), new_k)
  if b is not None:
    bias = jnp.asarray(intercept.subtree(params, layer.path + "/bias"))
    per = bias.shape[layer.view.batch_ndim:]
    new_b = b.reshape(per).astype(bias.dtype)
    if layer.view.batch_ndim:
      new_b = bias.reshape((-1,) + per).at[index].set(new_b).reshape(bias.shape)
    params = _replace(params, parts + ("bias",), new_b)
  return params
