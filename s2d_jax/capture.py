"""Capture the inputs of every matmul-like layer, without touching model code.

S2D's PCDR and the outlier statistics need, for each kernel W, the activations X
that multiply it. This module records them through `flax.linen.intercept_methods`:
every call of an `nn.Dense`, `nn.DenseGeneral` or `nn.Conv` sows its input, already
reshaped to the rows of the kernel's *matrix view*, into the `'intermediates'`
collection under the name `'matmul_input'`:

    Dense         x (..., in)                W (in, out)             rows = in
    DenseGeneral  x (..., a_1..a_p)          W (a_1..a_p, f_1..f_q)  rows = a_1···a_p
                  (contracting axes moved last, flattened in kernel order)
    Conv          x (B, H, W, cin)           W (kh, kw, cin, cout)   rows = kh·kw·cin
                  (im2col patches (B, H', W', kh·kw·cin) in (kh, kw, cin) order)

so that, with `W_mat = W.reshape(rows, -1)`, the layer's output (before bias) is
exactly `X_mat @ W_mat`. These are the same views `s2d_jax.spectral` uses for S2D.

Models with the scan layout put `'intermediates'` in `nn.scan`'s `variable_axes`, so a
scanned layer's inputs carry the same leading layer axis as its stacked kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import math
from typing import Any

import flax.linen as nn
from flax.linen import linear as nn_linear
import jax
import jax.numpy as jnp

CAPTURE_NAME = "matmul_input"
_COLLECTION = "intermediates"


def is_matmul(module: nn.Module) -> bool:
  """Dense, DenseGeneral or (non-transposed) Conv: a layer with a matrix view."""
  return (isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Conv))
          and not isinstance(module, nn.ConvTranspose))


def _dense_general_rows(module: nn.DenseGeneral, x: jax.Array) -> jax.Array:
  """x (..., a_1..a_p ...) -> (..., a_1···a_p), contracting axes moved last."""
  if module.batch_dims:
    raise ValueError(
        f"capture: DenseGeneral at {'/'.join(module.path)} uses batch_dims="
        f"{module.batch_dims}, which has no single matrix view; exclude it with "
        "`include=`.")
  axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
  axis = tuple(a % x.ndim for a in axis)
  moved = jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim)))
  return moved.reshape(moved.shape[:x.ndim - len(axis)] + (-1,))


def _conv_rows(module: nn.Conv, x: jax.Array) -> jax.Array:
  """x (B, *spatial, cin) -> im2col patches (B, *spatial', prod(kernel)·cin)."""
  kernel_size = tuple(module.kernel_size)
  n = len(kernel_size)
  path = "/".join(module.path)
  if module.feature_group_count != 1:
    raise ValueError(f"capture: Conv at {path} has feature_group_count="
                     f"{module.feature_group_count}; only dense convolutions have "
                     "a single matrix view. Exclude it with `include=`.")
  if isinstance(module.padding, str) and module.padding not in ("SAME", "VALID"):
    raise ValueError(f"capture: Conv at {path} uses padding={module.padding!r}; "
                     "supported: 'SAME', 'VALID', ints or (low, high) pairs.")
  unbatched = x.ndim == n + 1
  if unbatched:
    x = x[None]
  batch_shape = x.shape[:-(n + 1)]
  x = x.reshape((-1,) + x.shape[-(n + 1):])
  strides = module.strides if module.strides is not None else 1
  strides = (strides,) * n if isinstance(strides, int) else tuple(strides)

  def dilation(d):
    if d is None:
      return None
    return (d,) * n if isinstance(d, int) else tuple(d)

  spatial = "".join("DHW"[3 - n:]) if n <= 3 else None
  if spatial is None:
    raise ValueError(f"capture: Conv at {path} has {n} spatial dims; at most 3.")
  lhs_spec = "N" + spatial + "C"
  patches = jax.lax.conv_general_dilated_patches(
      x, kernel_size, strides, nn_linear.canonicalize_padding(module.padding, n),
      lhs_dilation=dilation(module.input_dilation),
      rhs_dilation=dilation(module.kernel_dilation),
      dimension_numbers=(lhs_spec, spatial + "IO", lhs_spec),
      precision=jax.lax.Precision.HIGHEST)
  # Patch features come out as (cin, *kernel); the kernel's matrix view is
  # (*kernel, cin): reorder so that X_mat @ W.reshape(-1, cout) is the conv.
  cin = x.shape[-1]
  out_spatial = patches.shape[1:-1]
  patches = patches.reshape((patches.shape[0],) + out_spatial + (cin,) + kernel_size)
  order = (tuple(range(n + 1)) + tuple(range(n + 2, 2 * n + 2)) + (n + 1,))
  patches = patches.transpose(order)
  patches = patches.reshape(batch_shape + out_spatial + (math.prod(kernel_size) * cin,))
  return patches[0] if unbatched else patches


def matmul_rows(module: nn.Module, x: jax.Array) -> jax.Array | None:
  """The input `x` of `module` as the rows of its kernel's matrix view, or None.

  Returns None for modules that are not Dense / DenseGeneral / Conv.
  """
  if isinstance(module, nn.Dense):
    return x
  if isinstance(module, nn.DenseGeneral):
    return _dense_general_rows(module, x)
  if is_matmul(module):  # the remaining matmul kind: Conv
    return _conv_rows(module, x)
  return None


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return out


def collect_matmul_inputs(
    intermediates: Mapping[str, Any],
    call_ndims: Mapping[tuple[str, ...], set[int]] | None = None,
) -> dict[str, Any]:
  """`'intermediates'` collection → tree mirroring params, `kernel` → inputs.

  A layer called several times in one forward pass contributes all its inputs,
  flattened to tokens and concatenated: `(n_calls · tokens, rows)`, or
  `(layers, n_calls · tokens, rows)` when scanned; calls may differ in rank (e.g. a
  head applied to the token map and to the pooled features). `call_ndims` maps a
  module path to the ranks of its inputs as seen inside the layer (recorded at trace
  time); the collected values' extra leading axes are scan (layer) axes, kept as is.
  """
  flat = {}
  call_ndims = call_ndims or {}

  def visit(node, path):
    for name, value in node.items():
      if name == CAPTURE_NAME:
        calls = tuple(value)
        if len(calls) == 1:
          flat[path + ("kernel",)] = calls[0]
        else:
          seen = call_ndims.get(path) or {min(c.ndim for c in calls)}
          lead = min(c.ndim for c in calls) - min(seen)
          flat[path + ("kernel",)] = jnp.concatenate(
              [c.reshape(c.shape[:lead] + (-1, c.shape[-1])) for c in calls],
              axis=lead)
      elif isinstance(value, Mapping):
        visit(value, path + (name,))

  visit(intermediates, ())
  return _nest(flat)


def capture_matmul_inputs(
    apply_fn: Callable[..., Any],
    variables: Mapping[str, Any],
    *args: Any,
    include: Callable[[tuple[str, ...]], bool] | None = None,
    **kwargs: Any,
) -> tuple[Any, dict[str, Any]]:
  """Runs `apply_fn(variables, *args, **kwargs)` and returns (outputs, inputs).

  Args:
    apply_fn: a linen `Module.apply` (or any function with its signature).
    variables: the variables dict, e.g. `{'params': params}`.
    *args: positional inputs of the model.
    include: optional predicate on module paths (tuples of names, e.g.
      `('Transformer', 'encoderblock_0', 'MlpBlock_0', 'Dense_0')`); only those for
      which it returns True are captured.
    **kwargs: keyword inputs of the model (e.g. `train=False`).

  Returns:
    `outputs`: what the model returns; `inputs`: a nested dict mirroring the params
    tree, with each captured layer's `kernel` leaf replaced by its input in matrix
    view rows, shape `(..., rows)` (see the module docstring). Works under `jax.jit`.
  """

  call_ndims: dict[tuple[str, ...], set[int]] = {}  # static, filled while tracing

  def interceptor(next_fun, call_args, call_kwargs, context):
    module = context.module
    if (context.method_name == "__call__" and call_args
        and is_matmul(module)
        and (include is None or include(tuple(module.path)))):
      x_mat = matmul_rows(module, jnp.asarray(call_args[0]))
      if x_mat is not None:
        call_ndims.setdefault(tuple(module.path), set()).add(x_mat.ndim)
        module.sow(_COLLECTION, CAPTURE_NAME, x_mat)
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(interceptor):
    outputs, state = apply_fn(variables, *args, mutable=[_COLLECTION], **kwargs)
  return outputs, collect_matmul_inputs(state.get(_COLLECTION, {}), call_ndims)
