"""LayerNorm -> Dense discovery and RepQ-ViT's scale reparameterisation.

**Discovery** (:func:`find_groups`): one traced pass (``jax.eval_shape``, nothing runs)
with an interceptor that remembers the output of every ``nn.LayerNorm`` call and, for
every matmul call, whether its input *is* such an output (the same traced value). A
LayerNorm's consumers form a :class:`Group`: in big_vision's ViT, per block
``LayerNorm_0 -> query, key, value`` (one LayerNorm feeds all three projections) and
``LayerNorm_1 -> MlpBlock Dense_0``; in the MAP head ``LayerNorm_0 -> MlpBlock Dense_0``
and ``encoder_norm -> key, value`` of the probe attention (its query is the probe).
A candidate is skipped, with the reason recorded, when folding would not be exact:
the LayerNorm lacks a scale or a bias or normalises over other than the last axis; a
consumer is not a Dense / DenseGeneral contracting only the last axis, has no bias
(a bias cannot be added from outside), or is also called on other inputs.

**Reparameterisation** (RepQ-ViT Sec. 4.2; official ``test_quant.py``). The consumers'
shared input ``y`` (the LayerNorm output, channel ``c``) was calibrated per channel,
``(Δ_c, z_c)``. With

    s̃ = mean_c Δ_c,   z̃ = mean_c z_c      (not rounded, as in the official code)
    r_c = Δ_c / s̃,    b_c = min_c / r_c - miñ,   min_c = -z_c Δ_c,  miñ = -z̃ s̃

the LayerNorm's affine part and every consumer's kernel ``W`` (input channel ``c`` on
its first axis after any layer axis: Dense ``(C, out)``, attention ``(C, H, Dh)``) and
bias ``β`` become (:func:`fold`)

    γ'_c = γ_c / r_c,   β_ln'_c = β_ln_c / r_c - b_c       (so y' = y / r - b)
    W'[c] = r_c W[c],   β' = β + Σ_c b_c W'[c]            (so W'ᵀy' + β' = Wᵀy + β)

which leaves the float function unchanged while the input's per-channel quantizer
becomes the per-tensor ``(s̃, z̃)``. Under ``nn.scan`` the vectors carry the layer axis
(``(depth, C)``) and each layer is folded with its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from s2d_jax import intercept


@dataclasses.dataclass(frozen=True)
class Consumer:
  """A matmul whose input is a LayerNorm output: module path and call index."""
  path: str
  call: int
  module_type: str


@dataclasses.dataclass(frozen=True)
class Group:
  """One LayerNorm and the layers that read its output."""
  layernorm: str
  consumers: tuple[Consumer, ...]

  def to_json(self) -> dict[str, Any]:
    return dict(layernorm=self.layernorm,
                consumers=[c.path + (f"@{c.call}" if c.call else "")
                           for c in self.consumers])


def _last_axis_only(axes, ndim) -> bool:
  axes = axes if isinstance(axes, (tuple, list)) else (axes,)
  return tuple(a % ndim for a in axes) == (ndim - 1,)


def find_groups(apply_fn: Callable[..., Any], variables: Mapping[str, Any],
                *args: Any, **kwargs: Any) -> tuple[list[Group], list[dict[str, Any]]]:
  """LayerNorm -> Dense groups of a model, found from outside (see module docstring).

  Returns ``(groups, skipped)``: ``skipped`` lists ``{'layernorm', 'consumers',
  'reason'}`` for candidates that cannot be folded exactly. Groups are in forward order.
  """
  ln_out: dict[int, tuple[str, Any, str | None]] = {}  # id(output) -> (path, out, problem)
  keep_alive: list[Any] = []
  order: list[str] = []
  ln_problem: dict[str, str | None] = {}
  consumers: dict[str, list[Consumer]] = {}
  problems: dict[str, list[str]] = {}
  calls: dict[str, set[tuple[int, str | None]]] = {}  # path -> {(call, ln or None)}
  counter = intercept.CallCounter()

  def interceptor(next_fun, a, kw, context):
    mod = context.module
    if not intercept.is_call(context):
      return next_fun(*a, **kw)
    if intercept.is_layernorm(mod):
      out = next_fun(*a, **kw)
      path = intercept.module_path(mod)
      x = a[0] if a else None
      problem = None
      if not (mod.use_scale and mod.use_bias):
        problem = "LayerNorm without scale or bias"
      elif x is not None and not (
          _last_axis_only(mod.reduction_axes, x.ndim)
          and _last_axis_only(mod.feature_axes, x.ndim)):
        problem = "LayerNorm not over the last axis"
      ln_out[id(out)] = (path, out, problem)
      keep_alive.append(out)
      if path not in ln_problem:
        order.append(path)
        ln_problem[path] = problem
      return out
    if intercept.is_matmul(mod) and a:
      path = intercept.module_path(mod)
      call = counter.index(mod, path)
      src = ln_out.get(id(a[0]))
      ln = src[0] if src is not None else None
      calls.setdefault(path, set()).add((call, ln))
      if ln is not None:
        c = Consumer(path, call, type(mod).__name__)
        if c not in consumers.setdefault(ln, []):
          consumers[ln].append(c)
        problem = None
        if isinstance(mod, nn.Conv):
          problem = f"{path} is a convolution"
        elif isinstance(mod, nn.DenseGeneral) and (
            mod.batch_dims or not _last_axis_only(mod.axis, a[0].ndim)):
          problem = f"{path} does not contract only the last axis"
        elif not mod.use_bias:
          problem = f"{path} has no bias to fold the shift into"
        if problem and problem not in problems.setdefault(ln, []):
          problems[ln].append(problem)
    return next_fun(*a, **kw)

  def f(v, *a):
    with nn.intercept_methods(interceptor):
      return apply_fn(v, *a, **kwargs)

  jax.eval_shape(f, dict(variables), *args)

  groups, skipped = [], []
  for ln in order:
    cons = consumers.get(ln)
    if not cons:
      continue
    reasons = list(problems.get(ln, []))
    if ln_problem[ln]:
      reasons.insert(0, ln_problem[ln])
    for c in cons:
      others = {x for x in calls[c.path] if x[1] != ln}
      if others:
        reasons.append(f"{c.path} is also called on other inputs")
    g = Group(ln, tuple(cons))
    if reasons:
      skipped.append(dict(g.to_json(), reason="; ".join(reasons)))
    else:
      groups.append(g)
  return groups, skipped


def fold(params: Mapping[str, Any], group: Group, r: jax.Array, b: jax.Array
         ) -> dict[str, Any]:
  """The params with ``r``, ``b`` (shape of the LayerNorm scale: ``(C,)``, or
  ``(depth, C)`` under scan) folded in (see the module docstring). Pure."""
  flat = dict(intercept.flatten(params))

  def key(path, leaf):
    return tuple(p for p in path.split("/") if p) + (leaf,)

  for leaf in ("scale", "bias"):
    if key(group.layernorm, leaf) not in flat:
      raise KeyError(f"reparam: no params at '{group.layernorm}/{leaf}'")
  scale = flat[key(group.layernorm, "scale")]
  if r.shape != scale.shape or b.shape != scale.shape:
    raise ValueError(f"reparam: r {r.shape} / b {b.shape} must have the shape of "
                     f"'{group.layernorm}/scale' {scale.shape}")
  lead = scale.ndim - 1
  flat[key(group.layernorm, "scale")] = (scale / r).astype(scale.dtype)
  ln_b = flat[key(group.layernorm, "bias")]
  flat[key(group.layernorm, "bias")] = (ln_b / r - b).astype(ln_b.dtype)
  for c in {c.path: c for c in group.consumers}:
    kk, bk = key(c, "kernel"), key(c, "bias")
    if kk not in flat or bk not in flat:
      raise KeyError(f"reparam: consumer '{c}' needs a kernel and a bias")
    w = flat[kk]
    n_out = w.ndim - lead - 1
    w_new = w * r.reshape(r.shape + (1,) * n_out)
    wm = w_new.reshape(w.shape[:lead + 1] + (-1,)).astype(jnp.float32)
    shift = jnp.einsum("...c,...co->...o", b.astype(jnp.float32), wm,
                       precision=jax.lax.Precision.HIGHEST)
    bias = flat[bk]
    flat[kk] = w_new.astype(w.dtype)
    flat[bk] = (bias + shift.reshape(bias.shape)).astype(bias.dtype)
  return intercept.nest(flat)


def scale_vectors(delta: jax.Array, zero_point: jax.Array, shape: tuple[int, ...]):
  """RepQ-ViT's ``(r, b, s̃, z̃)`` from per-channel ``(Δ_c, z_c)``.

  ``delta``, ``zero_point``: per-channel parameters (any shape with ``prod(shape)``
  elements, channels last); ``shape``: the LayerNorm scale's shape ``(..., C)``.
  Returns ``r``, ``b`` of ``shape`` and ``s̃``, ``z̃`` of ``shape[:-1] + (1,)``.
  """
  d = delta.reshape(shape).astype(jnp.float32)
  z = zero_point.reshape(shape).astype(jnp.float32)
  s_t = jnp.mean(d, axis=-1, keepdims=True)
  z_t = jnp.mean(z, axis=-1, keepdims=True)
  r = d / s_t
  b = (-z * d) / r - (-z_t * s_t)
  return r, b, s_t, z_t
