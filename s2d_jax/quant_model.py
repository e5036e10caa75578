"""Fake-quantize any Flax linen model from the outside (no model changes).

Mechanism: a ``flax.linen.intercept_methods`` interceptor catches every
``__call__`` of an ``nn.Dense``, ``nn.DenseGeneral`` or ``nn.Conv`` (shared
weights) and calls a *clone of the module bound to the same scope* whose
``dot_general`` / ``conv_general_dilated`` is replaced by a quantizing wrapper
around the module's own one. The wrapper sees both operands and the dimension
numbers, so granularities follow from the contraction itself:

* weight (rhs): ``x̂ = Q_w(W)`` with one scale per non-contracted rhs axis
  (``'channel'``: per output channel — Dense ``(in, out)`` per ``out``;
  attention q/k/v ``(in, h, hd)`` per ``(h, hd)``; out ``(h, hd, out)`` per
  ``out``; conv ``(kh, kw, cin, cout)`` per ``cout``) or one per tensor;
* activation (lhs): one scale per non-contracted lhs index (``'token'``: per
  token; for convolutions, per example), per tensor (dynamic), or a static
  calibrated per-tensor range.

With ``setting.attention`` an ``nn.MultiHeadDotProductAttention`` is cloned
the same way with its ``attention_fn`` replaced by :func:`_QuantAttention`:
q, k, v are quantized per (token, head) and the softmax probabilities per query
row on an asymmetric grid ``[0, max]``; the attention math is that of
``nn.dot_product_attention`` (a custom ``attention_fn`` of the model is
replaced, which is only right if it computes standard dot-product attention).

Static activation ranges are per-tensor ``[lo, hi]`` arrays of shape ``(2,)``
stored as variables named ``quant_calib_<point>`` (``point`` ∈ input, q, k,
probs, v) in the ``'intermediates'`` collection at the module's scope: models
with the scan layout put that collection in ``nn.scan``'s ``variable_axes``, so
each scanned layer gets its own range (stacked ``(depth, 2)``), exactly like
its kernel. :func:`calibration_apply` records them in a float forward pass;
:func:`merge_calibration` combines batches (and ``reduce_calibration``
devices): minmax ranges by ``min``/``max`` (exact), percentile and MSE ranges
by the mean over batches. :func:`quantized_apply` runs the fake-quantized model.
A module called several times in one pass keeps the union (minmax) or the
widest (other calibrators) of its per-call ranges.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from s2d_jax import quant as q

COLLECTION = "intermediates"
CALIB_PREFIX = "quant_calib_"
_MATMUL = (nn.Dense, nn.DenseGeneral, nn.Conv)


def _path(module: nn.Module) -> str:
  return "/".join(module.path)


def _is_matmul(module) -> bool:
  if isinstance(module, nn.ConvTranspose):
    return False
  if isinstance(module, nn.Conv):
    return bool(module.shared_weights)
  return isinstance(module, (nn.Dense, nn.DenseGeneral))


class _Ctx:
  """What one quantization point needs: bits, setting, mode, static range."""

  def __init__(self, setting: q.QuantSetting, mode: str, ste: bool,
               module: nn.Module, collection: str):
    self.setting, self.mode, self.ste = setting, mode, ste
    self.module, self.collection = module, collection
    self.path = _path(module)

  def static_range(self, point: str):
    name = CALIB_PREFIX + point
    if not self.module.has_variable(self.collection, name):
      raise KeyError(
          f"quant setting {self.setting.name!r} uses static activation ranges but "
          f"module '{self.path}' has no calibrated range {name!r} in collection "
          f"{self.collection!r}; run calibration_apply/calibrate first and pass "
          "its result as `calibration=`.")
    r = self.module.get_variable(self.collection, name)
    if r.shape != (2,):
      raise ValueError(f"calibrated range {name!r} of '{self.path}' has shape "
                       f"{r.shape}, expected (2,) = (lo, hi)")
    return r[0], r[1]

  def record(self, point: str, x):
    """Calibration mode: store this call's per-tensor range (merging repeats)."""
    s = self.setting
    lo, hi = q.calibrate(x, s.a_bits, s.calibrator, axis=None,
                         symmetric=s.a_symmetric if point != "probs" else False,
                         percentile=s.percentile, grid=s.mse_grid)
    r = jnp.stack([lo.reshape(()), hi.reshape(())])
    name = CALIB_PREFIX + point
    if self.module.has_variable(self.collection, name):
      old = self.module.get_variable(self.collection, name)
      r = jnp.stack([jnp.minimum(old[0], r[0]), jnp.maximum(old[1], r[1])])
    self.module.put_variable(self.collection, name, r)

  def activation(self, x, keep_axes, bits, point="input", symmetric=None):
    """Quantize (or, in calibration mode, record) one activation operand."""
    s = self.setting
    if symmetric is None:
      symmetric = s.a_symmetric
    if self.mode == "calib":
      self.record(point, x)
      return x
    if s.a_mode == "static":
      return q.fake_quant(x, bits, axis=None, symmetric=symmetric,
                          qrange=self.static_range(point), ste=self.ste)
    axis = keep_axes if s.a_granularity == "token" else None
    return q.fake_quant(x, bits, axis=axis, symmetric=symmetric, ste=self.ste)

  def weight(self, w, keep_axes, bits):
    if self.mode == "calib":
      return w
    axis = keep_axes if self.setting.w_granularity == "channel" else None
    return q.fake_quant(w, bits, axis=axis, symmetric=self.setting.w_symmetric,
                        ste=self.ste)


class _QuantDotGeneral:
  """``lax.dot_general``-compatible wrapper quantizing both operands."""

  def __init__(self, inner, ctx: _Ctx, bits: tuple[int, int]):
    self.inner, self.ctx, (self.w_bits, self.a_bits) = inner, ctx, bits

  def __call__(self, lhs, rhs, dimension_numbers, precision=None,
               preferred_element_type=None, **kwargs):
    (lc, rc), (lb, rb) = dimension_numbers
    keep_l = tuple(i for i in range(lhs.ndim) if i not in lc)
    keep_r = tuple(i for i in range(rhs.ndim) if i not in rc)
    lhs = self.ctx.activation(lhs, keep_l, self.a_bits)
    rhs = self.ctx.weight(rhs, keep_r, self.w_bits)
    if preferred_element_type is not None:
      kwargs["preferred_element_type"] = preferred_element_type
    return self.inner(lhs, rhs, dimension_numbers, precision=precision, **kwargs)


class _QuantConv:
  """``lax.conv_general_dilated``-compatible wrapper quantizing both operands."""

  def __init__(self, inner, ctx: _Ctx, bits: tuple[int, int]):
    self.inner, self.ctx, (self.w_bits, self.a_bits) = inner, ctx, bits

  def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None,
               rhs_dilation=None, dimension_numbers=None, **kwargs):
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    lhs = self.ctx.activation(lhs, (dn.lhs_spec[0],), self.a_bits)  # per example
    rhs = self.ctx.weight(rhs, (dn.rhs_spec[0],), self.w_bits)       # per cout
    return self.inner(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                      rhs_dilation=rhs_dilation, dimension_numbers=dn, **kwargs)


class _QuantAttention:
  """Dot-product attention with q, k, softmax probabilities and v quantized."""

  def __init__(self, ctx: _Ctx, a_bits: int):
    self.ctx, self.a_bits = ctx, a_bits

  def __call__(self, query, key, value, bias=None, mask=None,
               broadcast_dropout=True, dropout_rng=None, dropout_rate=0.0,
               deterministic=False, dtype=None, precision=None, module=None,
               force_fp32_for_softmax=False):
    b, c = self.a_bits, self.ctx
    tok = lambda x: tuple(range(x.ndim - 1))  # all but the contracted last axis
    query = c.activation(query, tok(query), b, "q")
    key = c.activation(key, tok(key), b, "k")
    value = c.activation(value, tok(value), b, "v")
    w = nn.dot_product_attention_weights(
        query, key, bias, mask, broadcast_dropout, dropout_rng, dropout_rate,
        deterministic, dtype, precision, module, force_fp32_for_softmax)
    w = c.activation(w, tok(w), b, "probs", symmetric=False)
    return jnp.einsum("...hqk,...khd->...qhd", w, value, precision=precision)


def make_interceptor(setting: q.QuantSetting, *, mode: str = "quant",
                     ste: bool = False, collection: str = COLLECTION,
                     plan: list | None = None):
  """The ``intercept_methods`` interceptor for ``setting``.

  ``mode='quant'`` fake-quantizes; ``'calib'`` runs in float and records
  static ranges (needs ``collection`` mutable). ``plan``, if a list, receives
  one dict per intercepted call (path, kind, bits) at trace time.
  """
  if mode not in ("quant", "calib"):
    raise ValueError(f"mode must be 'quant' or 'calib', got {mode!r}")

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    is_mm = _is_matmul(mod)
    is_attn = setting.attention and isinstance(mod, nn.MultiHeadDotProductAttention)
    if not (is_mm or is_attn):
      return next_fun(*args, **kwargs)
    # Our own clones come through here again: let them run.
    if is_mm and isinstance(getattr(mod, "dot_general", None), _QuantDotGeneral):
      return next_fun(*args, **kwargs)
    if is_mm and isinstance(getattr(mod, "conv_general_dilated", None), _QuantConv):
      return next_fun(*args, **kwargs)
    if is_attn and isinstance(mod.attention_fn, _QuantAttention):
      return next_fun(*args, **kwargs)
    path = _path(mod)
    bits = setting.bits_for(path)
    if bits is None:
      return next_fun(*args, **kwargs)
    ctx = _Ctx(setting, mode, ste, mod, collection)
    if plan is not None:
      plan.append(dict(path=path, kind=type(mod).__name__,
                       w_bits=None if is_attn else bits[0], a_bits=bits[1]))
    if is_attn:
      clone = mod.clone(parent=mod.scope, attention_fn=_QuantAttention(ctx, bits[1]))
    elif isinstance(mod, nn.Conv):
      inner = (mod.conv_general_dilated_cls() if mod.conv_general_dilated_cls
               else mod.conv_general_dilated or lax.conv_general_dilated)
      clone = mod.clone(parent=mod.scope, conv_general_dilated_cls=None,
                        conv_general_dilated=_QuantConv(inner, ctx, bits))
    else:
      inner = (mod.dot_general_cls() if mod.dot_general_cls
               else mod.dot_general or lax.dot_general)
      clone = mod.clone(parent=mod.scope, dot_general_cls=None,
                        dot_general=_QuantDotGeneral(inner, ctx, bits))
    ctx.module = clone  # variables are read/written through the bound clone
    return clone(*args, **kwargs)

  return interceptor


@contextlib.contextmanager
def quantize(setting: q.QuantSetting | str, *, ste: bool = False,
             collection: str = COLLECTION):
  """Context manager: every linen apply inside runs fake-quantized.

  Usable around code that calls ``model.apply`` itself (e.g. zero-shot class
  embeddings). Static settings need the calibration in ``collection``.
  """
  setting = q.get_setting(setting)
  with nn.intercept_methods(make_interceptor(setting, ste=ste,
                                             collection=collection)):
    yield setting


def quantized_apply(apply_fn: Callable, setting: q.QuantSetting | str, *,
                    calibration: Mapping | None = None, ste: bool = False,
                    collection: str = COLLECTION) -> Callable:
  """``apply_fn`` (e.g. ``model.apply``) with fake quantization.

  Returns ``f(variables, *args, **kwargs)`` with the signature of ``apply_fn``.
  ``calibration`` (from :func:`calibrate`) is required by static settings and
  passed to the model as the ``collection`` variables. ``ste=True`` gives
  straight-through gradients for QAT.
  """
  setting = q.get_setting(setting)
  if setting.needs_calibration and calibration is None:
    raise ValueError(f"quant setting {setting.name!r} has static activation "
                     "ranges: pass calibration= (see calibrate()).")
  interceptor = make_interceptor(setting, ste=ste, collection=collection)

  def f(variables, *args, **kwargs):
    if calibration is not None:
      variables = {**variables, collection: calibration}
    with nn.intercept_methods(interceptor):
      return apply_fn(variables, *args, **kwargs)

  return f


def _only_calib(tree):
  """Keep only the ``quant_calib_*`` leaves of a collection tree (drop empties)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      sub = _only_calib(v)
      if sub:
        out[k] = sub
    elif k.startswith(CALIB_PREFIX):
      out[k] = v
  return out


def calibration_apply(apply_fn: Callable, setting: q.QuantSetting | str, *,
                      collection: str = COLLECTION) -> Callable:
  """``f(variables, *args, **kwargs) -> calibration`` for one batch (float pass).

  The result is a nested dict mirroring module paths with ``quant_calib_*``
  leaves of shape ``(2,)`` (``(depth, 2)`` under ``nn.scan``).
  """
  setting = q.get_setting(setting)
  interceptor = make_interceptor(setting, mode="calib", collection=collection)

  def f(variables, *args, **kwargs):
    variables = {k: v for k, v in variables.items() if k != collection}
    with nn.intercept_methods(interceptor):
      _, state = apply_fn(variables, *args, mutable=[collection], **kwargs)
    return _only_calib(dict(state.get(collection, {})))

  return f


def _mean_like(setting) -> bool:
  return setting.calibrator != "minmax"


def merge_calibration(calibs: Sequence[Mapping], setting: q.QuantSetting | str):
  """Combine per-batch calibrations: minmax exactly (min lo, max hi); else mean."""
  setting = q.get_setting(setting)
  if not calibs:
    raise ValueError("merge_calibration: no calibration batches")
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *calibs)
  if _mean_like(setting):
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), stacked)
  return jax.tree.map(lambda x: jnp.stack(
      [jnp.min(x[..., 0], axis=0), jnp.max(x[..., 1], axis=0)], axis=-1), stacked)


def reduce_calibration(calib: Mapping, setting: q.QuantSetting | str,
                       axis_name: str):
  """Across devices inside ``pmap``: pmin/pmax (minmax) or pmean (others)."""
  setting = q.get_setting(setting)
  if _mean_like(setting):
    return jax.lax.pmean(calib, axis_name)
  return jax.tree.map(lambda x: jnp.stack(
      [lax.pmin(x[..., 0], axis_name), lax.pmax(x[..., 1], axis_name)], axis=-1),
      calib)


def calibrate(apply_fn: Callable, setting: q.QuantSetting | str, variables,
              batches: Sequence[Sequence[Any]], *, collection: str = COLLECTION,
              **kwargs):
  """Static ranges from a few batches (single device, jitted per batch shape).

  ``batches`` is a sequence of positional-argument tuples for ``apply_fn``.
  """
  f = jax.jit(calibration_apply(apply_fn, setting, collection=collection))
  return merge_calibration([f(variables, *b, **kwargs) for b in batches], setting)


def quantization_plan(apply_fn: Callable, setting: q.QuantSetting | str,
                      variables, *args, **kwargs) -> list[dict]:
  """Which module calls get quantized at which bits (traced, not run)."""
  setting = q.get_setting(setting)
  plan: list[dict] = []
  if setting.needs_calibration:  # same modules; no ranges needed to trace
    setting = q.get_setting(setting, a_mode="dynamic")
  interceptor = make_interceptor(setting, plan=plan)

  def f(v, *a):
    with nn.intercept_methods(interceptor):
      return apply_fn(v, *a, **kwargs)

  jax.eval_shape(f, variables, *args)
  return plan
