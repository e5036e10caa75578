"""One interception helper for everything that reaches into a Flax model from outside.

`capture` (PCDR inputs), `outliers` (activation statistics), `quant_model` (uniform fake
quantization) and `ptq` (RepQ-ViT, PTQ4ViT, ERQ) all work the same way: a
`flax.linen.intercept_methods` interceptor catches module calls and either records
something into a variable collection at the module's scope or replaces the module by a
clone (bound to the same scope, so the same parameters) whose matmul or attention
function is wrapped. This module is the single place that says

* **what is a matmul**: :func:`is_matmul` (`nn.Dense`, `nn.DenseGeneral`, `nn.Conv`
  with shared weights; not `ConvTranspose` / `ConvLocal`) and what is an attention
  (:func:`is_attention`: `nn.MultiHeadDotProductAttention`);
* **how a module path is spelled**: :func:`module_path`, the `/`-joined scope path
  (`'Transformer/encoderblock_0/MlpBlock_0/Dense_1'`), which is also the path of the
  module's parameters; under `nn.scan` it names the stacked module
  (`'Transformer/encoderblock/...'`) and the values it records carry the layer axis;
* **how a layer's input maps to its kernel's matrix view**: :func:`matmul_rows`;
* **how operands are intercepted**: :func:`wrap_matmul` (the clone's `dot_general` /
  `conv_general_dilated` call a hook on `(input, kernel)` with their
  :class:`Operand` axes) and :func:`wrap_attention` (the clone's `attention_fn`
  calls a hook on q, k, the softmax probabilities and v);
* **how values are recorded and come back**: :func:`record` (a variable at the
  module's scope, merged over repeated calls), :func:`run` (apply with the
  interceptor and the collection mutable) and :func:`collect` (the collection tree
  reduced to the leaves a tool wrote, by name prefix);
* **which call of a module this is**: :class:`CallCounter` (a module may be called
  several times in one forward pass, e.g. big_vision's head on the token map and on the
  pooled features; `nn.scan` traces its body more than once, which this counter does not
  mistake for repeated calls).

Records go to a collection listed in the model's `nn.scan(variable_axes=...)` (the
default `'intermediates'`; big_vision's ViT lists `params` and `intermediates`), so that
each scanned layer gets its own value, stacked along the layer axis exactly like its
kernel. A collection not listed there is not stacked.

Switching a tool over is mechanical, e.g. an outlier-statistics interceptor::

    def interceptor(next_fun, args, kwargs, context):
      mod = context.module
      if context.method_name == '__call__' and intercept.is_matmul(mod) and args:
        intercept.record(mod, COLLECTION, 'stats_input', act_stats(args[0]), merge=_merge)
      return next_fun(*args, **kwargs)

    outputs, tree = intercept.run(apply_fn, variables, interceptor, images,
                                  collection=COLLECTION)
    stats = intercept.collect(tree, 'stats_')   # {'Transformer': {...: {'input': ...}}}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
from flax.core import tracers as flax_tracers
from flax.linen import linear as nn_linear
import jax
import jax.numpy as jnp
from jax import lax

COLLECTION = "intermediates"

# ------------------------------------------------------------ what is what --


def is_matmul(module: Any) -> bool:
  """Dense, DenseGeneral or a shared-weight Conv: a layer with a matrix view."""
  if isinstance(module, nn.Conv):
    return bool(module.shared_weights)
  return isinstance(module, (nn.Dense, nn.DenseGeneral))


def is_attention(module: Any) -> bool:
  """`nn.MultiHeadDotProductAttention` (and subclasses such as `SelfAttention`)."""
  return isinstance(module, nn.MultiHeadDotProductAttention)


def is_layernorm(module: Any) -> bool:
  return isinstance(module, nn.LayerNorm)


def module_path(module: nn.Module) -> str:
  """The `/`-joined scope path of a bound module (= the path of its params)."""
  return "/".join(module.path)


def is_call(context) -> bool:
  """True for `__call__` interceptions (not `setup`, helper methods, ...)."""
  return context.method_name == "__call__"


# ------------------------------------------------------- matrix-view rows --


def _dense_general_rows(module: nn.DenseGeneral, x: jax.Array) -> jax.Array:
  """x (..., a_1..a_p ...) -> (..., a_1···a_p), contracting axes moved last."""
  if module.batch_dims:
    raise ValueError(
        f"DenseGeneral at {module_path(module)} uses batch_dims="
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
  path = module_path(module)
  if module.feature_group_count != 1:
    raise ValueError(f"Conv at {path} has feature_group_count="
                     f"{module.feature_group_count}; only dense convolutions have "
                     "a single matrix view. Exclude it with `include=`.")
  if isinstance(module.padding, str) and module.padding not in ("SAME", "VALID"):
    raise ValueError(f"Conv at {path} uses padding={module.padding!r}; "
                     "supported: 'SAME', 'VALID', ints or (low, high) pairs.")
  if n > 3:
    raise ValueError(f"Conv at {path} has {n} spatial dims; at most 3.")
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

  spatial = "DHW"[3 - n:]
  lhs_spec = "N" + spatial + "C"
  patches = lax.conv_general_dilated_patches(
      x, kernel_size, strides, nn_linear.canonicalize_padding(module.padding, n),
      lhs_dilation=dilation(module.input_dilation),
      rhs_dilation=dilation(module.kernel_dilation),
      dimension_numbers=(lhs_spec, spatial + "IO", lhs_spec),
      precision=lax.Precision.HIGHEST)
  # Patch features come out as (cin, *kernel); the kernel's matrix view is
  # (*kernel, cin): reorder so that X_mat @ W.reshape(-1, cout) is the conv.
  cin = x.shape[-1]
  out_spatial = patches.shape[1:-1]
  patches = patches.reshape((patches.shape[0],) + out_spatial + (cin,) + kernel_size)
  order = tuple(range(n + 1)) + tuple(range(n + 2, 2 * n + 2)) + (n + 1,)
  patches = patches.transpose(order)
  patches = patches.reshape(batch_shape + out_spatial + (math.prod(kernel_size) * cin,))
  return patches[0] if unbatched else patches


def matmul_rows(module: nn.Module, x: jax.Array) -> jax.Array | None:
  """The input `x` of `module` as the rows of its kernel's matrix view, or None.

      Dense         x (..., in)           W (in, out)             rows = in
      DenseGeneral  x (..., a_1..a_p)     W (a_1..a_p, f_1..f_q)  rows = a_1···a_p
      Conv          x (B, H, W, cin)      W (kh, kw, cin, cout)   rows = kh·kw·cin
                    (im2col patches in (kh, kw, cin) order)

  so that `matmul_rows(m, x) @ W.reshape(rows, -1)` is the layer's output before the
  bias. Returns None for modules that are not matmuls (:func:`is_matmul`).
  """
  if isinstance(module, nn.Dense):
    return x
  if isinstance(module, nn.DenseGeneral):
    return _dense_general_rows(module, x)
  if is_matmul(module):
    return _conv_rows(module, x)
  return None


# ------------------------------------------------------ operand wrapping --


@dataclasses.dataclass(frozen=True)
class Operand:
  """Axes of one matmul operand, as the contraction sees them.

  Attributes:
    role: `'input'` (the activation, lhs) or `'weight'` (the kernel, rhs).
    keep_axes: the axes that are not contracted: for the input the token / batch axes
      (for a convolution only the batch axis), for the weight its output-channel axes
      (Dense `(in, out)`: `(1,)`; attention q/k/v `(in, h, hd)`: `(1, 2)`; attention
      out `(h, hd, out)`: `(2,)`; conv `(kh, kw, cin, cout)`: `(3,)`).
    contract_axes: the others: the input's feature axes (for a convolution its
      spatial and channel axes), the weight's input axes.
  """
  role: str
  keep_axes: tuple[int, ...]
  contract_axes: tuple[int, ...]


# hook(lhs, rhs, lhs_operand, rhs_operand) -> (lhs, rhs)
MatmulHook = Callable[[jax.Array, jax.Array, Operand, Operand],
                      tuple[jax.Array, jax.Array]]
# hook(kind, x) -> x, kind in ATTENTION_KINDS
AttentionHook = Callable[[str, jax.Array], jax.Array]
ATTENTION_KINDS = ("q", "k", "probs", "v")


class HookedDotGeneral:
  """`lax.dot_general`-compatible wrapper calling `hook` on both operands first."""

  def __init__(self, inner: Callable, hook: MatmulHook):
    self.inner, self.hook = inner, hook

  def __call__(self, lhs, rhs, dimension_numbers, precision=None,
               preferred_element_type=None, **kwargs):
    (lc, rc), (lb, rb) = dimension_numbers
    if lb or rb:
      raise ValueError("intercept: dot_general with batch dimensions "
                       f"{(lb, rb)} is not a layer matmul")
    lo = Operand("input", tuple(i for i in range(lhs.ndim) if i not in lc), tuple(lc))
    ro = Operand("weight", tuple(i for i in range(rhs.ndim) if i not in rc),
                 tuple(rc))
    lhs, rhs = self.hook(lhs, rhs, lo, ro)
    if preferred_element_type is not None:
      kwargs["preferred_element_type"] = preferred_element_type
    return self.inner(lhs, rhs, dimension_numbers, precision=precision, **kwargs)


class HookedConv:
  """`lax.conv_general_dilated`-compatible wrapper calling `hook` on both operands."""

  def __init__(self, inner: Callable, hook: MatmulHook):
    self.inner, self.hook = inner, hook

  def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None,
               rhs_dilation=None, dimension_numbers=None, **kwargs):
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    lb, ro = dn.lhs_spec[0], dn.rhs_spec[0]
    lo = Operand("input", (lb,), tuple(i for i in range(lhs.ndim) if i != lb))
    wo = Operand("weight", (ro,), tuple(i for i in range(rhs.ndim) if i != ro))
    lhs, rhs = self.hook(lhs, rhs, lo, wo)
    return self.inner(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                      rhs_dilation=rhs_dilation, dimension_numbers=dn, **kwargs)


class HookedAttention:
  """Dot-product attention with a hook on q, k, the softmax probabilities and v.

  The math is that of `nn.dot_product_attention` (`probs = softmax(q·kᵀ/√d + bias,
  mask)`, `out = probs·v`), with `hook('q', q)`, `hook('k', k)`, `hook('v', v)` applied
  to the projected (unscaled) q, k, v of shape `(..., len, heads, head_dim)` and
  `hook('probs', p)` to the probabilities `(..., heads, q_len, k_len)`. A model's own
  custom `attention_fn` is replaced, which is only right if it computes standard
  dot-product attention.
  """

  def __init__(self, hook: AttentionHook):
    self.hook = hook

  def __call__(self, query, key, value, bias=None, mask=None,
               broadcast_dropout=True, dropout_rng=None, dropout_rate=0.0,
               deterministic=False, dtype=None, precision=None, module=None,
               force_fp32_for_softmax=False):
    query = self.hook("q", query)
    key = self.hook("k", key)
    value = self.hook("v", value)
    w = nn.dot_product_attention_weights(
        query, key, bias, mask, broadcast_dropout, dropout_rng, dropout_rate,
        deterministic, dtype, precision, module, force_fp32_for_softmax)
    w = self.hook("probs", w)
    return jnp.einsum("...hqk,...khd->...qhd", w, value, precision=precision)


def wrap_matmul(module: nn.Module, hook: MatmulHook) -> nn.Module:
  """A clone of matmul `module`, bound to the same scope, whose operands go through
  `hook(lhs, rhs, lhs_operand, rhs_operand)` before the module's own
  `dot_general` / `conv_general_dilated`.

  `lhs` is the input as the contraction sees it (after the module's dtype promotion,
  so e.g. bfloat16 under `dtype=bfloat16`), `rhs` the kernel in its stored shape (also
  dtype-promoted). Variables read or written through the clone live at the module's
  scope (`clone.put_variable(...)` writes next to its params).
  """
  if isinstance(module, nn.Conv):
    inner = (module.conv_general_dilated_cls() if module.conv_general_dilated_cls
             else module.conv_general_dilated or lax.conv_general_dilated)
    return module.clone(parent=module.scope, conv_general_dilated_cls=None,
                        conv_general_dilated=HookedConv(inner, hook))
  inner = (module.dot_general_cls() if module.dot_general_cls
           else module.dot_general or lax.dot_general)
  return module.clone(parent=module.scope, dot_general_cls=None,
                      dot_general=HookedDotGeneral(inner, hook))


def wrap_attention(module: nn.Module, hook: AttentionHook) -> nn.Module:
  """A clone of attention `module` (same scope) with :class:`HookedAttention`."""
  return module.clone(parent=module.scope, attention_fn=HookedAttention(hook))


def is_wrapped(module: Any) -> bool:
  """True for the clones made here (an interceptor sees them again: let them run)."""
  if isinstance(module, nn.Conv):
    return isinstance(getattr(module, "conv_general_dilated", None), HookedConv)
  if isinstance(module, (nn.Dense, nn.DenseGeneral)):
    return isinstance(getattr(module, "dot_general", None), HookedDotGeneral)
  if is_attention(module):
    return isinstance(module.attention_fn, HookedAttention)
  return False


# ------------------------------------------------------------ call counts --


class CallCounter:
  """Index of each call of a module within one forward pass.

  `index(module)` returns 0 for the first call of a module path in the current trace,
  1 for the second, ... Calls are told apart per JAX trace, because `nn.scan` traces
  its body twice (each trace then starts at 0). Create one counter per `apply`.
  """

  def __init__(self):
    self._seen: dict[str, list[list[Any]]] = {}

  def index(self, module: nn.Module, path: str | None = None) -> int:
    path = module_path(module) if path is None else path
    trace = flax_tracers.current_trace()
    entries = self._seen.setdefault(path, [])
    for entry in entries:
      if entry[0] == trace:
        entry[1] += 1
        return entry[1]
    entries.append([trace, 0])
    return 0


# ---------------------------------------------------- records and results --


def record(module: nn.Module, collection: str, name: str, value: Any,
           merge: Callable[[Any, Any], Any] | None = None) -> Any:
  """Writes `value` as variable `name` of `collection` at `module`'s scope.

  If the variable exists already (the module was called before in this pass) and
  `merge` is given, stores `merge(old, value)` instead; without `merge` the new value
  replaces the old. Returns what was stored. Needs `collection` mutable.
  """
  if merge is not None and module.has_variable(collection, name):
    value = merge(module.get_variable(collection, name), value)
  module.put_variable(collection, name, value)
  return value


def run(apply_fn: Callable[..., Any], variables: Mapping[str, Any],
        interceptor: Callable, *args: Any, collection: str | None = COLLECTION,
        drop_existing: bool = True, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
  """`apply_fn(variables, *args, **kwargs)` under `interceptor`, `collection` mutable.

  Returns `(outputs, tree)` with `tree` the collection after the pass (`{}` if nothing
  was written). `drop_existing` removes `collection` from `variables` first (a fresh
  record); pass False to let the interceptor read and extend an existing one.
  `collection=None` runs without a mutable collection and returns `(outputs, {})`.
  """
  variables = dict(variables)
  if collection is None:
    with nn.intercept_methods(interceptor):
      return apply_fn(variables, *args, **kwargs), {}
  if drop_existing:
    variables.pop(collection, None)
  with nn.intercept_methods(interceptor):
    outputs, state = apply_fn(variables, *args, mutable=[collection], **kwargs)
  return outputs, dict(state.get(collection, {}))


def collect(tree: Mapping[str, Any], prefix: str, *, strip: bool = True,
            convert: Callable[[Any], Any] | None = None) -> dict[str, Any]:
  """The leaves of a collection tree whose variable name starts with `prefix`.

  Returns a nested dict mirroring module paths (modules without such variables are
  dropped), variable names with `prefix` removed (`strip=True`), values passed through
  `convert` if given.
  """
  out: dict[str, Any] = {}
  for k, v in tree.items():
    if isinstance(k, str) and k.startswith(prefix):
      key = k[len(prefix):] if strip else k
      out[key] = convert(v) if convert is not None else v
    elif isinstance(v, Mapping):
      sub = collect(v, prefix, strip=strip, convert=convert)
      if sub:
        out[k] = sub
  return out


def nest(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  """`{('a', 'b', 'c'): v}` -> `{'a': {'b': {'c': v}}}`."""
  out: dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return out


def flatten(tree: Mapping[str, Any], _prefix: tuple[str, ...] = ()
            ) -> dict[tuple[str, ...], Any]:
  """Inverse of :func:`nest` (leaves are whatever is not a Mapping)."""
  out: dict[tuple[str, ...], Any] = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, _prefix + (k,)))
    else:
      out[_prefix + (k,)] = v
  return out


def subtree(tree: Mapping[str, Any], path: str | tuple[str, ...]) -> Any:
  """`tree['a']['b']` for path `'a/b'` (or `('a', 'b')`); None if absent."""
  parts = tuple(p for p in path.split("/") if p) if isinstance(path, str) else path
  node: Any = tree
  for p in parts:
    if not isinstance(node, Mapping) or p not in node:
      return None
    node = node[p]
  return node


def flatten_until(tree: Mapping[str, Any], prefix: str,
                  _path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """Like :func:`flatten`, but a key starting with `prefix` is a leaf whatever its
  value (records that are dicts themselves, e.g. `{'delta': ..., 'zero_point': ...}`)."""
  out: dict[tuple[str, ...], Any] = {}
  for k, v in tree.items():
    if isinstance(k, str) and k.startswith(prefix):
      out[_path + (k,)] = v
    elif isinstance(v, Mapping):
      out.update(flatten_until(v, prefix, _path + (k,)))
  return out
