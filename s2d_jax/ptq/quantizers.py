"""PTQ quantizers in pure jax.numpy: RepQ-ViT's uniform and log√2 quantizers.

Ports of ``UniformQuantizer`` and ``LogSqrt2Quantizer`` of the official RepQ-ViT
(zkkli/RepQ-ViT ``classification/quant/quantizer.py``; ERQ builds on the same ones).
Everything here is a pure function of arrays (jit / vmap friendly, no state); the
calibrated parameters live in flax variables (:mod:`s2d_jax.ptq.ops`).

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
  _check_bits(bits)
  xf = x.astype(jnp.float32)
  q = jnp.clip(jnp.round(xf / delta) + zero_point, 0, 2 ** bits - 1)
  return ((q - zero_point) * delta).astype(x.dtype)


def quantile_candidates(x: jax.Array, keep_axes=None,
                        percentiles: Sequence[float] = PERCENTILES):
  """``(lo, hi)``, each ``(len(percentiles),) + group_shape``: the candidate ranges.

  ``hi_i = quantile(x, p_i)``, ``lo_i = quantile(x, 1 - p_i)`` per scale group.
  """
  keep = _keep(x.ndim, keep_axes)
  rows = _groups(x.astype(jnp.float32), keep)
  ps = np.asarray(percentiles, np.float64)
  qs = jnp.asarray(np.concatenate([ps, 1.0 - ps]), jnp.float32)
  v = jnp.quantile(rows, qs, axis=1, method="linear")  # (2P, G)
  gshape = group_shape(x.shape, keep)
  n = len(ps)
  hi = v[:n].reshape((n,) + gshape)
  lo = v[n:].reshape((n,) + gshape)
  return lo, hi


def _group_mse(x, xq, keep):
  red = tuple(i for i in range(x.ndim) if i not in keep)
  return jnp.mean(jnp.square(xq - x), axis=red, keepdims=True)


def uniform_search(x: jax.Array, bits: int, keep_axes=None,
                   percentiles: Sequence[float] = PERCENTILES):
  """RepQ-ViT's range search: ``(Δ, z)`` per group (``keepdims`` shapes, float32).

  Per group, the quantile candidate (see module docstring) with the least
  ``mean((x̂ - x)²)``; the first on ties. ``keep_axes`` = None: one group.
  """
  _check_bits(bits)
  keep = _keep(x.ndim, keep_axes)
  xf = x.astype(jnp.float32)
  lo, hi = quantile_candidates(xf, keep, percentiles)
  best = None
  for i in range(len(percentiles)):
    d, z = uniform_params(lo[i], hi[i], bits)
    err = _group_mse(xf, uniform_quantize(xf, d, z, bits), keep)
    if best is None:
      best = (err, d, z)
    else:
      better = err < best[0]
      best = tuple(jnp.where(better, new, old)
                   for new, old in zip((err, d, z), best))
  return best[1], best[2]


# -------------------------------------------------------------- log√2 --


def log_sqrt2_quantize(x: jax.Array, delta, bits: int) -> jax.Array:
  """RepQ-ViT's log√2 quantizer of ``x ≥ 0`` (see the module docstring)."""
  _check_bits(bits)
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
  _check_bits(bits)
  xf = x.astype(jnp.float32)
  cands = jnp.quantile(xf.reshape(-1), jnp.asarray(percentiles, jnp.float32),
                       method="linear")
  best_err, best = None, None
  for i in range(len(percentiles)):
    d = jnp.maximum(cands[i], MIN_DELTA)
    err = jnp.mean(jnp.square(log_sqrt2_quantize(xf, d, bits) - xf))
    if best is None:
      best_err, best = err, d
    else:
      better = err < best_err
      best_err = jnp.where(better, err, best_err)
      best = jnp.where(better, d, best)
  return best
