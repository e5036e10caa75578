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
The interception itself (what a matmul is, its matrix view, running with a mutable
collection) is `s2d_jax.intercept`, shared with outliers, quant_model and ptq.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from s2d_jax import intercept

CAPTURE_NAME = "matmul_input"
_COLLECTION = intercept.COLLECTION

# What is a matmul and how its input maps to the kernel's matrix view: one
# definition for capture, outliers, quant_model and ptq (s2d_jax.intercept).
is_matmul = intercept.is_matmul
matmul_rows = intercept.matmul_rows
_nest = intercept.nest


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
    if (intercept.is_call(context) and call_args and is_matmul(module)
        and (include is None or include(tuple(module.path)))):
      x_mat = matmul_rows(module, jnp.asarray(call_args[0]))
      call_ndims.setdefault(tuple(module.path), set()).add(x_mat.ndim)
      module.sow(_COLLECTION, CAPTURE_NAME, x_mat)
    return next_fun(*call_args, **call_kwargs)

  outputs, tree = intercept.run(apply_fn, variables, interceptor, *args,
                                collection=_COLLECTION, drop_existing=False,
                                **kwargs)
  return outputs, collect_matmul_inputs(tree, call_ndims)
