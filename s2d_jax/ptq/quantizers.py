"""PTQ quantizers in pure jax.numpy: RepQ-ViT's uniform and log√2 quantizers.

Ports of ``UniformQuantizer`` and ``LogSqrt2Quantizer`` of the official RepQ-ViT
(zkkli/RepQ-ViT ``classification/quant/quantizer.py``; ERQ builds on the same ones).
Everything here is a pure function of arrays (jit / vmap friendly, no state), each
compiled once per shape and bit width when called outside a trace (an eager calibration
pass compiles one search per distinct layer shape, not one per layer); the calibrated
parameters live in flax variables (:mod:`s2d_jax.ptq.ops`).

**Uniform asymmetric** (``b`` bits, levels ``0 .. 2^b - 1``, scale ``Δ``, zero point
``z``)::

    x̂ = (clamp(round(x / Δ) + z, 0, 2^b - 1) - z) · Δ

with ``round`` half-to-even (``torch.round`` and ``jnp.round`` agree). From a range
``[lo, hi]``: ``Δ = (hi - lo) / (2^b - 1)``, ``z = round(-lo / Δ)``. The range is not
forced to contain 0 (as in the official code). ``z`` may be fractional: RepQ-ViT's
reparameterised inputs use the unrounded mean of per-channel zero points.

**Quantile search** (:func:`uniform_search`): for each scale group (the whole tensor,
or each index of ``keep_axes``: one group per output channel of a weight, per input
channel of a post-LayerNorm activation) the candidates are
``[lo, hi] = [quantile(x, 1 - p), quantile(x, p)]`` for ``p`` in
:data:`PERCENTILES` ``= (0.999, 0.9999, 0.99999)`` (linear interpolation, as
``torch.quantile``); the candidate with the least mean squared error
``mean((x̂ - x)²)`` over the group wins, the first one on ties (the official strict
``<``).

**log√2** (:func:`log_sqrt2_quantize`, for softmax probabilities ``x ≥ 0``)::

    q = round(-2 · log2(x / Δ))                       (unclamped level)
    x̂ = 0                                   if q ≥ 2^b   (past the last level)
    x̂ = Δ · 2^(-q'/2),  q' = clamp(q, 0, 2^b - 1)  otherwise

computed as the official code does, ``2^(-ceil(q'/2)) · (√2 if q' odd else 1) · Δ``.
``x = 0`` maps to 0, ``x ≥ Δ·2^(1/4)`` to ``Δ``. ``Δ`` is searched among the
quantiles ``quantile(x, p)``, ``p`` in :data:`PERCENTILES`, by the same least-L2 rule
(per tensor; :func:`log_sqrt2_search`).

Deviation (documented): a group whose candidate range has zero width (a constant
channel, e.g. a zero-initialised head) gets ``Δ = 1e-8`` instead of the official
division by zero (NaN); such a group is then reproduced to ~1e-8. Likewise a log√2
candidate ``Δ = 0`` (a map whose quantile is 0) is raised to ``1e-8``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

PERCENTILES = (0.999, 0.9999, 0.99999)
MIN_DELTA = 1e-8
_SQRT2_M1 = float(np.sqrt(2.0) - 1.0)


def _check_bits(bits) -> int:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not (
      2 <= bits <= 16):
    raise ValueError(f"bits must be an int in [2, 16], got {bits!r}")
  return int(bits)


def _keep(ndim: int, keep_axes: Sequence[int] | int | None) -> tuple[int, ...]:
  if keep_axes is None:
    return ()
  axes = (keep_axes,) if isinstance(keep_axes, int) else tuple(keep_axes)
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"keep axis {a} out of range for rank {ndim}")
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"repeated keep axis in {keep_axes!r}")
  return tuple(sorted(out))


def group_shape(shape: Sequence[int], keep_axes) -> tuple[int, ...]:
  """The ``keepdims`` shape of per-group parameters: ``shape`` with 1 off ``keep_axes``."""
  keep = _keep(len(shape), keep_axes)
  return tuple(s if i in keep else 1 for i, s in enumerate(shape))


def _groups(x: jax.Array, keep: tuple[int, ...]) -> jax.Array:
  """x -> (G, M): one row per scale group (keep axes first, in order)."""
  red = tuple(i for i in range(x.ndim) if i not in keep)
  xt = jnp.transpose(x, keep + red)
  g = int(np.prod([x.shape[i] for i in keep])) if keep else 1
  return xt.reshape(g, -1)


# ------------------------------------------------------------- uniform --


def uniform_params(lo, hi, bits: int):
  """``Δ = (hi - lo) / (2^b - 1)`` (at least ``MIN_DELTA``), ``z = round(-lo / Δ)``."""
  _check_bits(bits)
  lo = jnp.asarray(lo, jnp.float32)
  hi = jnp.asarray(hi, jnp.float32)
  delta = (hi - lo) / (2 ** bits - 1)
  delta = jnp.where(delta > MIN_DELTA, delta, MIN_DELTA)
  return delta, jnp.round(-lo / delta)


def uniform_quantize(x: jax.Array, delta, zero_point, bits: int) -> jax.Array:
  """``(clamp(round(x/Δ) + z, 0, 2^b - 1) - z) · Δ`` in float32, cast back to x's dtype.

  ``delta`` and ``zero_point`` broadcast against ``x`` (scalars: per tensor;
  ``keepdims`` shapes: per group).
  """
  return _uniform_quantize(x, delta, zero_point, _check_bits(bits))


@functools.partial(jax.jit, static_argnums=3)
def _uniform_quantize(x, delta, zero_point, bits):
  xf = x.astype(jnp.float32)
  q = jnp.clip(jnp.round(xf / delta) + zero_point, 0, 2 ** bits - 1)
  return ((q - zero_point) * delta).astype(x.dtype)


def quantiles(rows: jax.Array, qs: Sequence[float]) -> jax.Array:
  """``torch.quantile`` (linear interpolation) of each row of ``rows (G, M)`` at the
  static levels ``qs``: ``(len(qs), G)``.

  One sort per row; position ``q·(M-1)``, interpolated between its two neighbours.
  The positions are static, so this is a sort and a few slices (cheap to compile).
  """
  m = rows.shape[1]
  srt = jnp.sort(rows, axis=1)
  out = []
  for q in qs:
    pos = float(q) * (m - 1)
    lo = min(int(np.floor(pos)), m - 1)
    hi = min(lo + 1, m - 1)
    frac = np.float32(pos - lo)
    a, b = srt[:, lo], srt[:, hi]
    out.append(a + frac * (b - a))
  return jnp.stack(out)


def quantile_candidates(x: jax.Array, keep_axes=None,
                        percentiles: Sequence[float] = PERCENTILES):
  """``(lo, hi)``, each ``(len(percentiles),) + group_shape``: the candidate ranges.

  ``hi_i = quantile(x, p_i)``, ``lo_i = quantile(x, 1 - p_i)`` per scale group.
  """
  keep = _keep(x.ndim, keep_axes)
  rows = _groups(x.astype(jnp.float32), keep)
  ps = [float(p) for p in percentiles]
  v = quantiles(rows, ps + [1.0 - p for p in ps])  # (2P, G)
  gshape = group_shape(x.shape, keep)
  n = len(ps)
  hi = v[:n].reshape((n,) + gshape)
  lo = v[n:].reshape((n,) + gshape)
  return lo, hi


def _group_mse(x, xq, keep):
  red = tuple(i for i in range(x.ndim) if i not in keep)
  return jnp.mean(jnp.square(xq - x), axis=red, keepdims=True)


def _first_best(errs: jax.Array, cands: jax.Array) -> jax.Array:
  """``cands[argmin(errs, 0)]`` per group (first index on ties: the official strict
  ``<``). ``errs``, ``cands``: ``(P, *group_shape)``."""
  idx = jnp.argmin(errs, axis=0)[None]
  return jnp.take_along_axis(cands, idx, axis=0)[0]


def uniform_search(x: jax.Array, bits: int, keep_axes=None,
                   percentiles: Sequence[float] = PERCENTILES):
  """RepQ-ViT's range search: ``(Δ, z)`` per group (``keepdims`` shapes, float32).

  Per group, the quantile candidate (see module docstring) with the least
  ``mean((x̂ - x)²)``; the first on ties. ``keep_axes`` = None: one group. The
  candidates are evaluated one after the other (``lax.map``: one copy of ``x`` in
  memory, one compiled body).
  """
  return _uniform_search(x, _check_bits(bits), _keep(x.ndim, keep_axes),
                         tuple(float(p) for p in percentiles))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _uniform_search(x, bits, keep, percentiles):
  xf = x.astype(jnp.float32)
  lo, hi = quantile_candidates(xf, keep, percentiles)
  deltas, zeros = uniform_params(lo, hi, bits)          # (P, *group_shape)

  def err(dz):
    return _group_mse(xf, _uniform_quantize(xf, dz[0], dz[1], bits), keep)

  errs = jax.lax.map(err, (deltas, zeros))
  return _first_best(errs, deltas), _first_best(errs, zeros)


# -------------------------------------------------------------- log√2 --


def log_sqrt2_quantize(x: jax.Array, delta, bits: int) -> jax.Array:
  """RepQ-ViT's log√2 quantizer of ``x ≥ 0`` (see the module docstring)."""
  return _log_sqrt2_quantize(x, delta, _check_bits(bits))


@functools.partial(jax.jit, static_argnums=2)
def _log_sqrt2_quantize(x, delta, bits):
  n_levels = 2 ** bits
  xf = x.astype(jnp.float32)
  q = jnp.round(-2.0 * jnp.log2(xf / delta))
  past_last = q >= n_levels
  q = jnp.clip(q, 0, n_levels - 1)
  odd = jnp.mod(q, 2.0)
  xq = jnp.exp2(-jnp.ceil(q / 2.0)) * (odd * _SQRT2_M1 + 1.0) * delta
  return jnp.where(past_last, 0.0, xq).astype(x.dtype)


def log_sqrt2_search(x: jax.Array, bits: int,
                     percentiles: Sequence[float] = PERCENTILES) -> jax.Array:
  """``Δ`` (a float32 scalar) of the log√2 quantizer: the quantile of ``x`` at one of
  ``percentiles`` with the least ``mean((x̂ - x)²)``, the first on ties."""
  return _log_sqrt2_search(x, _check_bits(bits), tuple(float(p) for p in percentiles))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _log_sqrt2_search(x, bits, percentiles):
  xf = x.astype(jnp.float32)
  cands = jnp.maximum(quantiles(xf.reshape(1, -1), percentiles)[:, 0], MIN_DELTA)
  errs = jax.lax.map(
      lambda d: jnp.mean(jnp.square(_log_sqrt2_quantize(xf, d, bits) - xf)), cands)
  return _first_best(errs, cands)
