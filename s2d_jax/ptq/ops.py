"""The one op-interception mechanism every PTQ method uses (RepQ-ViT, PTQ4ViT, ERQ, GPTQ).

A PTQ method never edits the model. It supplies a **provider**: a callable that is
shown every *quantization point* of a forward pass and returns what flows on::

    provider(ctx: Context, x: jax.Array) -> jax.Array    # x unchanged = stays float

Points are reached from outside through `flax.linen.intercept_methods`
(:mod:`s2d_jax.intercept`); each has a module path, a kind and its module:

    kind            where                                         x
    weight          kernel of every Dense / DenseGeneral / Conv   kernel as contracted
                    (calibration passes only, see below)          (in..., out...)
    matmul_input    input of every Dense / DenseGeneral / Conv    activation as contracted
                    (post-LN for q/k/v and MLP fc1, post-GELU for
                    fc2, the image for the patch embedding, ...)
    matmul_output   output of the same layers (bias included)     (..., out...)
    q, k, v         inside `nn.MultiHeadDotProductAttention`:     (..., len, heads, head_dim)
                    the operands of q·kᵀ and of probs·v (q unscaled)
    probs           the softmax probabilities of probs·v          (..., heads, q_len, k_len)

(a clone of the attention with a custom `attention_fn`, `intercept.HookedAttention`).
:class:`Point` carries ``keep_axes`` (weight: output-channel axes; activations: token
axes) and ``contract_axes`` (weight: input axes; `matmul_input`: feature axes; q/k/v,
probs: the last axis), so a provider picks per-tensor, per-channel or per-token
granularity from data, and ``call``: 0 for the first call of a module in the pass, 1 for
the second, ... (big_vision's head is applied to the token map and then to the pooled
features; each call gets its own state; weights have one state per module).

**State** (scales, zero points, reparameterisation vectors, captured tensors) lives in
flax variables in the ``'intermediates'`` collection at the point's module scope, one
variable per point named ``'ptq.<kind>'`` (``'ptq.<kind>@<call>'`` for calls > 0) holding
a dict of arrays; :class:`Context` reads and writes it. big_vision's scan layout lists
``intermediates`` in `nn.scan`'s ``variable_axes``, so a scanned layer's state comes out
stacked ``(depth, ...)`` exactly like its kernel, and is sliced per layer when read back.

**Modes.**

* ``'calib'``: the collection is mutable; ``ctx.init(fn)`` stores ``fn()`` if the point
  has no state yet and returns the state, so a provider initialises each quantizer *in
  forward order on the already-quantized network* within one traced pass (state written
  with ``put_variable`` and used at once), which is RepQ-ViT's official flow.
  Quantizers that already have state keep it (pass an existing ``state`` to
  :func:`calibrate` to re-initialise only what was removed, e.g. with :func:`drop`).
  Weight points are shown to the provider (quantize them on the fly, or leave them float).
* ``'apply'``: state is read only (a missing entry is a clear ``KeyError``) and weight
  points are *not* shown: weights were quantized once into ``params``
  (:func:`bake_weights`), so an applied model only quantizes activations.

**Plan.** ``provider.describe(point) -> dict | None`` (optional) says what it does with a
point (bits, quantizer, granularity; None = float); :func:`plan` traces a pass
(``jax.eval_shape``: nothing runs) and lists every point described, for report.json and
tests.

**Captures and gradients.** A provider can store raw tensors in calibration mode
(``ctx.put({'x': x})`` on any point, e.g. a layer's `matmul_input` and `matmul_output`).
For gradients w.r.t. a layer's output (PTQ4ViT's Hessian-guided metric uses
``∂L/∂O``), :func:`output_gradients` adds a zero *perturbation* variable to the
`matmul_output` of the chosen layers (``ctx.perturb``) and differentiates the loss with
respect to it: ``∂L/∂δ = ∂L/∂O`` at ``δ = 0``, per layer (stacked under scan), for the
float or for a quantized network (any provider).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from s2d_jax import intercept

COLLECTION = intercept.COLLECTION
PREFIX = "ptq."
PERTURB = "perturb"
KINDS = ("weight", "matmul_input", "matmul_output", "q", "k", "probs", "v")
ATTENTION_KINDS = intercept.ATTENTION_KINDS
MODES = ("calib", "apply")


@dataclasses.dataclass(frozen=True)
class Point:
  """One quantization point of a forward pass (see the module docstring).

  Attributes:
    path: the module's `/`-joined path (= its params path), e.g.
      ``'Transformer/encoderblock_3/MlpBlock_0/Dense_1'`` (scan: ``encoderblock``).
    kind: one of :data:`KINDS`.
    module_type: ``'Dense'``, ``'DenseGeneral'``, ``'Conv'`` or
      ``'MultiHeadDotProductAttention'`` (the class name).
    call: index of this call of the module in the pass (0 for weights).
    keep_axes: axes of ``x`` that are not contracted (weight: output channels;
      activations: tokens / batch; conv input: batch).
    contract_axes: the contracted axes (weight: input channels; `matmul_input`:
      features; q/k/v/probs: the last axis; `matmul_output`: the output features).
  """
  path: str
  kind: str
  module_type: str
  call: int = 0
  keep_axes: tuple[int, ...] = ()
  contract_axes: tuple[int, ...] = ()

  @property
  def key(self) -> str:
    """Variable name of this point's state at the module scope."""
    return PREFIX + (self.kind if self.call == 0 else f"{self.kind}@{self.call}")


class Provider(Protocol):
  """What a PTQ method supplies (a class or a plain function)."""

  def __call__(self, ctx: "Context", x: jax.Array) -> jax.Array:
    ...

  # Optional: `describe(point) -> dict | None` for the plan; `attention = False` to
  # leave attention modules alone (weight-only methods).


class Context:
  """A point plus access to its state, handed to the provider for one call."""

  def __init__(self, point: Point, module: nn.Module, mode: str, collection: str):
    self.point, self.module, self.mode, self.collection = (
        point, module, mode, collection)

  @property
  def calibrating(self) -> bool:
    return self.mode == "calib"

  def _key(self, name: str | None) -> str:
    return self.point.key if name is None else f"{self.point.key}.{name}"

  def has(self, name: str | None = None) -> bool:
    """Whether the point has state (``name``: a secondary variable, e.g. 'raw')."""
    return self.module.has_variable(self.collection, self._key(name))

  def get(self, name: str | None = None) -> dict[str, jax.Array]:
    key = self._key(name)
    if not self.module.has_variable(self.collection, key):
      raise KeyError(
          f"PTQ: no calibrated state {key!r} for the {self.point.kind} of "
          f"'{self.point.path}' (call {self.point.call}) in collection "
          f"{self.collection!r}: calibrate first, and apply with the qvariables "
          "that calibration returned.")
    return self.module.get_variable(self.collection, key)

  def put(self, value: Mapping[str, Any], name: str | None = None) -> None:
    if not self.calibrating:
      raise RuntimeError(f"PTQ: state of '{self.point.path}' ({self.point.kind}) "
                         "can only be written in calibration mode")
    self.module.put_variable(self.collection, self._key(name), dict(value))

  def init(self, fn: Callable[[], Mapping[str, Any]]) -> dict[str, jax.Array]:
    """The point's state; in calibration mode ``fn()`` is stored first if absent."""
    if self.calibrating and not self.has():
      self.put(fn())
    return self.get()

  def perturb(self, y: jax.Array) -> jax.Array:
    """``y + δ`` with ``δ`` a zero variable of ``y``'s shape (see output_gradients)."""
    key = self._key(PERTURB)
    if not self.module.has_variable(self.collection, key):
      if not self.calibrating:
        return y
      self.module.put_variable(self.collection, key, jnp.zeros(y.shape, y.dtype))
    return y + self.module.get_variable(self.collection, key).astype(y.dtype)


def _module_type(module) -> str:
  return type(module).__name__


def make_interceptor(provider: Provider, mode: str = "apply", *,
                     collection: str = COLLECTION,
                     plan: list | None = None) -> Callable:
  """The `intercept_methods` interceptor of ``provider`` for one forward pass.

  Build one per pass (it numbers repeated calls). ``plan``, if a list, receives one
  dict per point the provider describes (at trace time, deduplicated).
  """
  if mode not in MODES:
    raise ValueError(f"PTQ mode must be one of {MODES}, got {mode!r}")
  counter = intercept.CallCounter()
  describe = getattr(provider, "describe", None)
  do_attention = getattr(provider, "attention", True)
  seen: set[tuple[str, str, int]] = set()

  def show(point: Point, module, x):
    if plan is not None and describe is not None:
      k = (point.path, point.kind, point.call)
      if k not in seen:
        seen.add(k)
        d = describe(point)
        if d is not None:
          plan.append(dict(path=point.path, kind=point.kind, call=point.call,
                           module=point.module_type, **d))
    return provider(Context(point, module, mode, collection), x)

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if not intercept.is_call(context) or intercept.is_wrapped(mod):
      return next_fun(*args, **kwargs)
    is_mm = intercept.is_matmul(mod)
    is_attn = do_attention and intercept.is_attention(mod)
    if not (is_mm or is_attn):
      return next_fun(*args, **kwargs)
    path = intercept.module_path(mod)
    call = counter.index(mod, path)
    mtype = _module_type(mod)
    cell: dict[str, Any] = {}

    if is_attn:
      def attn_hook(kind, x):
        p = Point(path, kind, mtype, call, tuple(range(x.ndim - 1)), (x.ndim - 1,))
        return show(p, cell["clone"], x)
      cell["clone"] = intercept.wrap_attention(mod, attn_hook)
      return cell["clone"](*args, **kwargs)

    def mm_hook(lhs, rhs, lo: intercept.Operand, ro: intercept.Operand):
      clone = cell["clone"]
      cell["n_out"] = len(ro.keep_axes)
      lhs = show(Point(path, "matmul_input", mtype, call, lo.keep_axes,
                       lo.contract_axes), clone, lhs)
      if mode == "calib":
        rhs = show(Point(path, "weight", mtype, 0, ro.keep_axes, ro.contract_axes),
                   clone, rhs)
      return lhs, rhs

    cell["clone"] = intercept.wrap_matmul(mod, mm_hook)
    y = cell["clone"](*args, **kwargs)
    if "n_out" in cell and isinstance(y, jax.Array):
      n = cell["n_out"]
      y = show(Point(path, "matmul_output", mtype, call, tuple(range(y.ndim - n)),
                     tuple(range(y.ndim - n, y.ndim))), cell["clone"], y)
    return y

  return interceptor


def intercepted(apply_fn: Callable[..., Any], provider: Provider, *,
                mode: str = "apply", collection: str = COLLECTION,
                plan: list | None = None) -> Callable[..., Any]:
  """``apply_fn`` with ``provider`` at every point.

  ``mode='apply'``: ``f(variables, *args, **kw)`` returns ``apply_fn``'s output
  (variables hold the state in ``collection``). ``mode='calib'``:
  ``f(variables, *args, **kw) -> (outputs, state)`` with ``state`` the provider's
  variables (existing state in ``variables[collection]`` is kept and extended).
  """
  if mode not in MODES:
    raise ValueError(f"PTQ mode must be one of {MODES}, got {mode!r}")

  def f(variables, *args, **kwargs):
    interceptor = make_interceptor(provider, mode, collection=collection, plan=plan)
    if mode == "apply":
      with nn.intercept_methods(interceptor):
        return apply_fn(variables, *args, **kwargs)
    outputs, tree = intercept.run(apply_fn, variables, interceptor, *args,
                                  collection=collection, drop_existing=False,
                                  **kwargs)
    return outputs, intercept.collect(tree, PREFIX, strip=False)

  return f


def calibrate(apply_fn: Callable[..., Any], provider: Provider,
              variables: Mapping[str, Any], *args: Any,
              state: Mapping[str, Any] | None = None, jit: bool = True,
              collection: str = COLLECTION, plan: list | None = None,
              **kwargs: Any) -> tuple[Any, dict[str, Any]]:
  """One calibration pass: ``(outputs, state)``.

  Quantizers without state in ``state`` are initialised in forward order (see the
  module docstring); the others are used as they are. ``jit=True`` compiles the whole
  pass (``kwargs`` are static); ``jit=False`` runs it op by op, like the official
  PyTorch code, which with jitted quantizer searches (:mod:`s2d_jax.ptq.quantizers`)
  compiles one search per distinct layer shape instead of one per layer (much less
  compile time for a single pass; `nn.scan` bodies are compiled either way).
  ``plan``, if a list, receives the provider's description of every point.
  """
  variables = {k: v for k, v in variables.items() if k != collection}
  if state:
    variables[collection] = state
  f = intercepted(apply_fn, provider, mode="calib", collection=collection,
                  plan=plan)
  g = lambda v, *a: f(v, *a, **kwargs)
  return (jax.jit(g) if jit else g)(variables, *args)


def plan(apply_fn: Callable[..., Any], provider: Provider,
         variables: Mapping[str, Any], *args: Any, mode: str = "calib",
         collection: str = COLLECTION, **kwargs: Any) -> list[dict[str, Any]]:
  """The points ``provider`` describes, in forward order (traced, not run).

  ``mode='calib'`` (default) includes weight points; ``'apply'`` needs ``variables``
  to hold the calibrated state.
  """
  entries: list[dict[str, Any]] = []
  f = intercepted(apply_fn, provider, mode=mode, collection=collection, plan=entries)
  jax.eval_shape(lambda v, *a: f(v, *a, **kwargs), dict(variables), *args)
  return entries


# ------------------------------------------------------------- state trees --


def entries(state: Mapping[str, Any]) -> dict[tuple[str, str], Any]:
  """``{(module_path, variable_name): value}`` for every ``ptq.*`` variable."""
  out = {}
  for path, value in intercept.flatten_until(state, PREFIX).items():
    out["/".join(path[:-1]), path[-1]] = value
  return out


def from_entries(flat: Mapping[tuple[str, str], Any]) -> dict[str, Any]:
  """Inverse of :func:`entries`."""
  return intercept.nest({tuple(p for p in path.split("/") if p) + (name,): v
                         for (path, name), v in flat.items()})


def drop(state: Mapping[str, Any], predicate: Callable[[str, str], bool]
         ) -> dict[str, Any]:
  """``state`` without the entries for which ``predicate(path, name)`` is true."""
  return from_entries({k: v for k, v in entries(state).items()
                       if not predicate(*k)})


def bake_weights(params: Mapping[str, Any], state: Mapping[str, Any],
                 fn: Callable[[str, jax.Array, Mapping[str, jax.Array]], jax.Array]
                 ) -> dict[str, Any]:
  """Weights quantized once: every kernel whose module has ``'ptq.weight'`` state.

  ``fn(path, kernel, weight_state) -> kernel`` (a pure jnp function, e.g. the
  method's weight quantizer with the calibrated, ``keepdims``-shaped scales, which
  broadcast against stacked scan kernels too). Returns a new params tree (the input is
  not modified); jit-able.
  """
  flat = dict(intercept.flatten(params))
  for (path, name), ws in entries(state).items():
    if name != PREFIX + "weight":
      continue
    key = tuple(p for p in path.split("/") if p) + ("kernel",)
    if key not in flat:
      raise KeyError(f"bake_weights: state for '{path}' but no params at "
                     f"'{path}/kernel'")
    flat[key] = fn(path, flat[key], ws).astype(flat[key].dtype)
  return intercept.nest(flat)


def output_gradients(apply_fn: Callable[..., Any], variables: Mapping[str, Any],
                     loss_fn: Callable[[Any], jax.Array], *args: Any,
                     include: Callable[[str], bool] | None = None,
                     provider: Provider | None = None,
                     state: Mapping[str, Any] | None = None,
                     collection: str = COLLECTION, **kwargs: Any) -> dict[str, Any]:
  """``∂ loss_fn(apply_fn(variables, *args)) / ∂O`` for the output ``O`` of every
  matmul layer whose path ``include`` accepts (default: all).

  Runs the float network, or the one ``provider`` quantizes with its calibrated
  ``state``. Returns ``{path: dL/dO}`` with ``O``'s shape (stacked ``(depth, ...)``
  under scan; a second call of a module is keyed ``'path@1'``).
  """
  def perturbing(ctx: Context, x):
    if ctx.point.kind == "matmul_output" and (include is None or include(ctx.point.path)):
      x = ctx.perturb(x)
    if provider is not None and ctx.point.kind != "matmul_output":
      return provider(ctx, x)
    return x

  perturbing.attention = getattr(provider, "attention", True) if provider else False
  base = {k: v for k, v in variables.items() if k != collection}
  # 1. zero perturbations (shapes from one traced calibration pass)
  zeros_tree = jax.eval_shape(
      lambda v, *a: intercepted(apply_fn, perturbing, mode="calib",
                                collection=collection)(
                                    {**v, **({collection: state} if state else {})},
                                    *a, **kwargs)[1], base, *args)
  pert = {k: jnp.zeros(v.shape, v.dtype) for k, v in entries(zeros_tree).items()
          if k[1].endswith("." + PERTURB)}
  fixed = dict(state) if state else {}

  def loss(pert_flat):
    tree = _merge(fixed, from_entries(pert_flat))
    out = intercepted(apply_fn, perturbing, mode="apply", collection=collection)(
        {**base, collection: tree}, *args, **kwargs)
    return loss_fn(out)

  grads = jax.grad(loss)(pert)
  out = {}
  for (path, name), g in grads.items():
    tag = name[len(PREFIX + "matmul_output"):-len("." + PERTURB)]
    out[path + tag] = g
  return out


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
  out = dict(a)
  for k, v in b.items():
    if k in out and isinstance(out[k], Mapping) and isinstance(v, Mapping):
      out[k] = _merge(out[k], v)
    else:
      out[k] = v
  return out
