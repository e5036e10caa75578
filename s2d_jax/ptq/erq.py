"""ERQ: Error Reduction for post-training Quantization of ViTs (``"ERQ/WxAy"``).

(Pipeline docstring: see below; filled in with the model-level port.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# The official weight quantizer's candidate quantiles (quant/quantizer.py, weights;
# the activation quantizers search (0.999, 0.9999, 0.99999) as RepQ-ViT does).
WEIGHT_QUANTILES = (0.97, 0.98, 0.99, 0.995, 0.9995, 0.9997, 0.9999, 0.99995,
                    0.99999, 1.0)
DUAL_PERCENTILE = 99.0   # outlier threshold of the dual-uniform split, per channel
DUAL_FRACTION = 20       # n_top = out_channels // 20 input rows get their own grid


@functools.partial(jax.jit, static_argnames=("bits", "quantiles"))
def weight_grid(w: jax.Array, bits: int, rows: jax.Array | None = None,
                quantiles: tuple[float, ...] = WEIGHT_QUANTILES
                ) -> tuple[jax.Array, jax.Array]:
  """ERQ's per-output-channel weight grid: least-L2 quantile pair.

  For each column ``o`` of ``w (d, out)`` (an output channel), over the rows
  selected by ``rows`` (bool ``(d,)``, default all) and each ``p`` in
  ``quantiles``: ``hi = quantile_p(w_o)``, ``lo = quantile_{1−p}(w_o)``
  (linear interpolation), ``s = (hi − lo)/(2^b − 1)``, ``z = round(−lo/s)``,
  score ``mean((Q(w_o) − w_o)²)``; the first least score wins (the official
  ``init_quantization_scale`` of a non-activation ``UniformQuantizer``).

  Returns:
    ``(scale, zero)`` of shape ``(1, out)``.
  """
  qmax = 2 ** bits - 1
  w = jnp.asarray(w, jnp.float32)
  sel = jnp.ones(w.shape[:1], bool) if rows is None else jnp.asarray(rows, bool)
  wm = jnp.where(sel[:, None], w, jnp.nan)
  p = jnp.asarray(quantiles, jnp.float32)
  hi = jnp.nanquantile(wm, p, axis=0)          # (P, out)
  lo = jnp.nanquantile(wm, 1.0 - p, axis=0)
  s = (hi - lo) / qmax
  z = jnp.round(-lo / s)
  q = (jnp.clip(jnp.round(w[None] / s[:, None]) + z[:, None], 0, qmax)
       - z[:, None]) * s[:, None]             # (P, d, out)
  err = jnp.sum(jnp.where(sel[None, :, None], (q - w[None]) ** 2, 0.0), axis=1)
  err = jnp.where(jnp.isfinite(err), err, jnp.inf)
  best = jnp.argmin(err, axis=0)               # first least score
  pick = lambda a: jnp.take_along_axis(a, best[None], axis=0)
  return pick(s), pick(z)


@functools.partial(jax.jit, static_argnames=("n_top",))
def dual_rows(w: jax.Array, n_top: int) -> jax.Array:
  """The official dual-uniform split: input rows of ``w (d, out)`` with many outliers.

  Per output channel ``o``: rows ``i`` with ``w_io`` above the 99th percentile
  of the channel's positive weights or below the 1st percentile of its
  negative ones are outliers. Rows are ranked by how many channels flag them
  (ties: the row flagged by the earliest channel first, then the lower row
  index: the insertion order of the official ``Counter.most_common``), and
  the first ``n_top`` flagged rows are returned as a bool mask ``(d,)``.
  """
  w = jnp.asarray(w, jnp.float32)
  d, n_out = w.shape
  thr_pos = jnp.nanpercentile(jnp.where(w > 0, w, jnp.nan), DUAL_PERCENTILE, axis=0)
  thr_neg = jnp.nanpercentile(jnp.where(w < 0, w, jnp.nan),
                              100.0 - DUAL_PERCENTILE, axis=0)
  flag = (w > thr_pos[None]) | (w < thr_neg[None])          # NaN thresholds: False
  count = jnp.sum(flag, axis=1)
  first = jnp.min(jnp.where(flag, jnp.arange(n_out)[None], n_out), axis=1)
  order = jnp.lexsort((jnp.arange(d), first, -count))
  rank = jnp.zeros((d,), jnp.int32).at[order].set(jnp.arange(d, dtype=jnp.int32))
  return (rank < n_top) & (count > 0)


def dual_weight_grid(w: jax.Array, bits: int, n_top: int,
                     quantiles: tuple[float, ...] = WEIGHT_QUANTILES
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """ERQ's dual-uniform weight grid (official ``two_part`` quantizer).

  The rows of :func:`dual_rows` get one :func:`weight_grid` per output channel,
  the remaining rows another. Returns ``(scale, zero, top)`` with ``scale``,
  ``zero`` of shape ``(d, out)`` and ``top`` the bool ``(d,)`` split; with
  ``n_top == 0`` (fewer than 20 output channels) or no flagged row it is the
  plain per-channel grid broadcast to ``(d, out)``.
  """
  d, n_out = w.shape
  if n_top <= 0:
    s, z = weight_grid(w, bits, quantiles=quantiles)
    return (jnp.broadcast_to(s, (d, n_out)), jnp.broadcast_to(z, (d, n_out)),
            jnp.zeros((d,), bool))
  top = dual_rows(w, n_top)
  s1, z1 = weight_grid(w, bits, top, quantiles=quantiles)
  s2, z2 = weight_grid(w, bits, ~top, quantiles=quantiles)
  any_top = jnp.any(top)
  s1 = jnp.where(any_top, s1, s2)
  z1 = jnp.where(any_top, z1, z2)
  return (jnp.where(top[:, None], s1, s2), jnp.where(top[:, None], z1, z2), top)
