"""PCDR (principal component dominance ratio) and the PCDR-based choice of k.

For a layer with matrix view ``W (rows, cols) = sum_r sigma_r u_r v_r^T`` (the
``(in, out)`` orientation of :mod:`s2d_jax.spectral`) and inputs ``X
(tokens, rows)``, the outputs (bias ignored) are ``A = X W``, i.e.

    A_jc = sum_r sigma_r (x_j . u_r) v_rc,      A^(k)_jc = sum_{r <= k} sigma_r (x_j . u_r) v_rc.

PCDR is measured on the outlier outputs: the set ``S`` of the ``n_top``
entries of ``A`` with the largest ``|A_jc|``, where ``n_top = num_outputs`` if
given, else ``max(1, ceil(top_fraction * tokens * cols))``. For one entry the
paper's ratio is ``|A^(k)_jc| / |A_jc|``; over ``S`` we take the
magnitude-weighted mean of those ratios::

    PCDR_k = sum_{(j,c) in S} |A^(k)_jc| / sum_{(j,c) in S} |A_jc|,

which equals the paper's ratio when ``n_top = 1`` and is 0 when all outputs
are 0. ``PCDR_k`` is not monotone in k (partial sums can overshoot).

The choice of k (paper, defaults ``K_max = 3``, ``tau = 0.95``, refreshed every
``m = 100`` steps by the trainer)::

    k_target = min{k <= K_max : PCDR_k >= tau},   or 0 (not regularised) if none.

``select_active(params, inputs)`` returns ``{kernel path: k_target}`` (int32,
shape ``(depth,)`` for scan-layout kernels), which
:func:`s2d_jax.optim.set_active` takes. The SVD is exact (``jnp.linalg.svd``,
float32); this runs every ``m`` steps, not in the training step.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from s2d_jax import spectral

HIGHEST = spectral.HIGHEST


def num_top_outputs(num_entries: int, top_fraction: float, num_outputs: Optional[int]) -> int:
  """``n_top`` of the module docstring, clamped to ``[1, num_entries]``."""
  if num_outputs is not None:
    if num_outputs < 1:
      raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
    return min(int(num_outputs), num_entries)
  if not 0 < top_fraction <= 1:
    raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
  return min(num_entries, max(1, math.ceil(top_fraction * num_entries)))


@functools.partial(jax.jit, static_argnames=("k_max", "n_top"))
def _pcdr(x: jax.Array, w: jax.Array, k_max: int, n_top: int) -> jax.Array:
  x = x.astype(jnp.float32)
  w = w.astype(jnp.float32)
  u, s, vt = jnp.linalg.svd(w, full_matrices=False)
  r = min(k_max, s.shape[0])
  a = jnp.matmul(x, w, precision=HIGHEST)                     # (T, cols)
  mag, flat_idx = jax.lax.top_k(jnp.abs(a).reshape(-1), n_top)
  j, c = jnp.divmod(flat_idx, a.shape[1])
  proj = jnp.matmul(x[j], u[:, :r], precision=HIGHEST)          # (n_top, r): x_j . u_r
  comp = proj * s[:r] * vt[:r, :][:, c].T                      # (n_top, r)
  partial = jnp.abs(jnp.cumsum(comp, axis=-1)).sum(0)           # (r,)
  if r < k_max:  # components beyond the rank are zero
    partial = jnp.concatenate([partial, jnp.full((k_max - r,), partial[-1])])
  total = mag.sum()
  return jnp.where(total > 0, partial / jnp.where(total > 0, total, 1.0), 0.0)


def pcdr(x_mat: jax.Array, w_mat: jax.Array, k_max: int = 3, *,
         top_fraction: float = 1e-3, num_outputs: Optional[int] = None) -> jax.Array:
  """``[PCDR_1, ..., PCDR_{k_max}]`` of one layer (see the module docstring).

  Args:
    x_mat: inputs ``(..., rows)`` (flattened to tokens).
    w_mat: the kernel's matrix view ``(rows, cols)``.
    k_max: number of ratios.
    top_fraction: fraction of the ``tokens * cols`` outputs that count as
      outliers (default 0.1 %), used unless ``num_outputs`` is given.
    num_outputs: number of largest-|A| outputs to use.

  Returns:
    float32 array ``(k_max,)``.
  """
  if w_mat.ndim != 2:
    raise ValueError(f"w_mat must be a (rows, cols) matrix, got shape {w_mat.shape}")
  if x_mat.ndim < 1 or x_mat.shape[-1] != w_mat.shape[0]:
    raise ValueError(f"x_mat's last axis ({x_mat.shape}) must equal w_mat's rows ({w_mat.shape[0]})")
  if k_max < 1:
    raise ValueError(f"k_max must be >= 1, got {k_max}")
  x = x_mat.reshape(-1, w_mat.shape[0])
  if x.shape[0] == 0:
    raise ValueError("x_mat holds no tokens")
  n_top = num_top_outputs(x.shape[0] * w_mat.shape[1], top_fraction, num_outputs)
  return _pcdr(x, w_mat, int(k_max), n_top)


def k_target(ratios: jax.Array, tau: float = 0.95) -> jax.Array:
  """Smallest ``k`` (1-based) with ``ratios[..., k-1] >= tau``, else 0 (int32, ``(...)``)."""
  hit = ratios >= tau
  return jnp.where(hit.any(-1), jnp.argmax(hit, axis=-1) + 1, 0).astype(jnp.int32)


def measure(params: Any, inputs: Any, k_max: int = 3, *, views: spectral.ViewsArg = None,
            mask: Any = None, top_fraction: float = 1e-3,
            num_outputs: Optional[int] = None) -> dict[str, jax.Array]:
  """PCDR of every selected kernel that has captured inputs.

  Args:
    params: the parameter tree.
    inputs: tree mirroring ``params`` whose leaves at kernel positions are the
      layer inputs ``(*layers, ..., rows)`` in matrix-view rows
      (``s2d_jax.capture.capture_matmul_inputs``); paths not selected by
      ``mask`` are ignored; selected kernels without inputs are absent.
    k_max, top_fraction, num_outputs: see :func:`pcdr`.
    views, mask: as in :func:`s2d_jax.s2d` (same selection).

  Returns:
    ``{kernel path: PCDR (*layers, k_max)}``.

  Raises:
    KeyError: an inputs path has no parameter.
    ValueError: inputs do not fit the kernel's matrix view.
  """
  selected = spectral.select_kernels(params, mask, views)
  leaves = {spectral.path_str(p): x for p, x in spectral.leaves_with_paths(params)}
  out = {}
  for path, x in spectral.leaves_with_paths(inputs):
    name = spectral.path_str(path)
    if name not in leaves:
      raise KeyError(f"pcdr: inputs given for {name!r}, which is not a parameter")
    if name not in selected:
      continue
    view = selected[name][1]
    w = view.to_matrix(leaves[name]).reshape((-1, view.rows, view.cols))
    try:
      xr = view.inputs_to_rows(jnp.asarray(x))
    except ValueError as e:
      raise ValueError(f"pcdr: {name!r}: {e}") from e
    xr = xr.reshape((-1,) + xr.shape[-2:])
    if xr.shape[1] == 0:
      raise ValueError(f"pcdr: {name!r}: inputs hold no tokens")
    if k_max < 1:
      raise ValueError(f"k_max must be >= 1, got {k_max}")
    n_top = num_top_outputs(xr.shape[1] * view.cols, top_fraction, num_outputs)
    ratios = jax.vmap(functools.partial(_pcdr, k_max=int(k_max), n_top=n_top))(xr, w)
    out[name] = ratios.reshape(view.batch_shape + (k_max,))
  return out


def select_active(params: Any, inputs: Any, k_max: int = 3, tau: float = 0.95, *,
                  views: spectral.ViewsArg = None, mask: Any = None,
                  top_fraction: float = 1e-3,
                  num_outputs: Optional[int] = None) -> dict[str, jax.Array]:
  """``{kernel path: k_target (*layers,) int32}`` for :func:`s2d_jax.optim.set_active`.

  Arguments as in :func:`measure`; ``tau`` is the PCDR threshold. Use the same
  ``k_max`` as the ``s2d`` transform (``set_active`` rejects larger counts).
  """
  ratios = measure(params, inputs, k_max, views=views, mask=mask,
                   top_fraction=top_fraction, num_outputs=num_outputs)
  return {name: k_target(r, tau) for name, r in ratios.items()}
