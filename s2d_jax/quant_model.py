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
the same way with its ``attention_fn`` replaced by ``intercept.HookedAttention``:
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

Weights quantized once: :func:`prequantize` returns the variables with every
quantized kernel replaced by its fake-quantized value (same grid, same dtype
handling as the in-pass quantization, so outputs are identical) and
``quantized_apply(..., prequantized=True)`` then only quantizes activations.
That is what evaluation should run (weights are constant); QAT keeps
``quantized_apply(..., ste=True)``, which quantizes weights inside every step
with straight-through gradients. The interception (what a matmul is, the
operand hooks, the attention clone) is :mod:`s2d_jax.intercept`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from s2d_jax import intercept
from s2d_jax import quant as q

COLLECTION = intercept.COLLECTION
CALIB_PREFIX = "quant_calib_"
_path = intercept.module_path


class _Ctx:
  """What one quantization point needs: bits, setting, mode, static range."""

  def __init__(self, setting: q.QuantSetting, mode: str, ste: bool,
               module: nn.Module, collection: str, prequantized: bool = False):
    self.setting, self.mode, self.ste = setting, mode, ste
    self.module, self.collection = module, collection
    self.prequantized = prequantized
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

  def record(self, point: str, x, bits: int, symmetric: bool):
    """Calibration mode: store this call's per-tensor range (merging repeats).

    The range is chosen for the bits this operand is quantized at (``bits``: an
    8-bit end such as the patch-embedding input gets its 8-bit MSE / percentile
    range, not the setting's ``a_bits`` one).
    """
    s = self.setting
    lo, hi = q.calibrate(x, bits, s.calibrator, axis=None, symmetric=symmetric,
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
      self.record(point, x, bits, symmetric)
      return x
    if s.a_mode == "static":
      return q.fake_quant(x, bits, axis=None, symmetric=symmetric,
                          qrange=self.static_range(point), ste=self.ste)
    axis = keep_axes if s.a_granularity == "token" else None
    return q.fake_quant(x, bits, axis=axis, symmetric=symmetric, ste=self.ste)

  def weight(self, w, keep_axes, bits):
    if self.mode == "calib" or self.prequantized:
      return w
    return quantize_weight(w, keep_axes, bits, self.setting, ste=self.ste)


def quantize_weight(w, keep_axes, bits: int, setting: q.QuantSetting, *,
                    ste: bool = False):
  """The setting's weight quantizer: per output channel (``keep_axes``) or tensor."""
  axis = keep_axes if setting.w_granularity == "channel" else None
  return q.fake_quant(w, bits, axis=axis, symmetric=setting.w_symmetric, ste=ste)


def _matmul_hook(ctx: _Ctx, bits: tuple[int, int], plan_entry: dict | None):
  """Operand hook: activation at ``a_bits`` (per token / example), weight at ``w_bits``."""
  w_bits, a_bits = bits

  def hook(lhs, rhs, lo: intercept.Operand, ro: intercept.Operand):
    if plan_entry is not None and "w_keep_axes" not in plan_entry:
      plan_entry.update(w_keep_axes=ro.keep_axes, w_ndim=rhs.ndim,
                        w_dtype=str(rhs.dtype))
    return (ctx.activation(lhs, lo.keep_axes, a_bits),
            ctx.weight(rhs, ro.keep_axes, w_bits))

  return hook


def _attention_hook(ctx: _Ctx, a_bits: int):
  """q, k, v per (token, head); softmax probabilities per query row on [0, max]."""

  def hook(kind, x):
    keep = tuple(range(x.ndim - 1))  # all but the contracted last axis
    return ctx.activation(x, keep, a_bits, kind,
                          symmetric=False if kind == "probs" else None)

  return hook


def make_interceptor(setting: q.QuantSetting, *, mode: str = "quant",
                     ste: bool = False, collection: str = COLLECTION,
                     plan: list | None = None, prequantized: bool = False):
  """The ``intercept_methods`` interceptor for ``setting``.

  ``mode='quant'`` fake-quantizes; ``'calib'`` runs in float and records
  static ranges (needs ``collection`` mutable). ``prequantized=True`` leaves
  kernels as they come (see :func:`prequantize`). ``plan``, if a list, receives
  one dict per intercepted call (path, kind, bits; for matmuls also the
  kernel's output-channel axes ``w_keep_axes``, rank and dtype as the
  contraction sees them) at trace time.
  """
  if mode not in ("quant", "calib"):
    raise ValueError(f"mode must be 'quant' or 'calib', got {mode!r}")

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if not intercept.is_call(context) or intercept.is_wrapped(mod):
      return next_fun(*args, **kwargs)
    is_mm = intercept.is_matmul(mod)
    is_attn = setting.attention and intercept.is_attention(mod)
    if not (is_mm or is_attn):
      return next_fun(*args, **kwargs)
    path = _path(mod)
    bits = setting.bits_for(path)
    if bits is None:
      return next_fun(*args, **kwargs)
    ctx = _Ctx(setting, mode, ste, mod, collection, prequantized)
    entry = None
    if plan is not None:
      entry = dict(path=path, kind=type(mod).__name__,
                   w_bits=None if is_attn else bits[0], a_bits=bits[1])
      plan.append(entry)
    if is_attn:
      clone = intercept.wrap_attention(mod, _attention_hook(ctx, bits[1]))
    else:
      clone = intercept.wrap_matmul(mod, _matmul_hook(ctx, bits, entry))
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
                    collection: str = COLLECTION,
                    prequantized: bool = False) -> Callable:
  """``apply_fn`` (e.g. ``model.apply``) with fake quantization.

  Returns ``f(variables, *args, **kwargs)`` with the signature of ``apply_fn``.
  ``calibration`` (from :func:`calibrate`) is required by static settings and
  passed to the model as the ``collection`` variables. ``ste=True`` gives
  straight-through gradients for QAT. ``prequantized=True``: the variables
  come from :func:`prequantize` (weights already on the grid), so only
  activations are quantized in the pass (the evaluation path).
  """
  setting = q.get_setting(setting)
  if setting.needs_calibration and calibration is None:
    raise ValueError(f"quant setting {setting.name!r} has static activation "
                     "ranges: pass calibration= (see calibrate()).")
  if ste and prequantized:
    raise ValueError("quantized_apply: ste=True (QAT) quantizes weights inside the "
                     "step for their gradients; it cannot use prequantized=True")
  interceptor = make_interceptor(setting, ste=ste, collection=collection,
                                 prequantized=prequantized)

  def f(variables, *args, **kwargs):
    if calibration is not None:
      variables = {**variables, collection: calibration}
    with nn.intercept_methods(interceptor):
      return apply_fn(variables, *args, **kwargs)

  return f


def calibration_apply(apply_fn: Callable, setting: q.QuantSetting | str, *,
                      collection: str = COLLECTION) -> Callable:
  """``f(variables, *args, **kwargs) -> calibration`` for one batch (float pass).

  The result is a nested dict mirroring module paths with ``quant_calib_*``
  leaves of shape ``(2,)`` (``(depth, 2)`` under ``nn.scan``).
  """
  setting = q.get_setting(setting)
  interceptor = make_interceptor(setting, mode="calib", collection=collection)

  def f(variables, *args, **kwargs):
    _, tree = intercept.run(apply_fn, variables, interceptor, *args,
                            collection=collection, **kwargs)
    return intercept.collect(tree, CALIB_PREFIX, strip=False)

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

  ``batches`` is a sequence of positional-argument tuples for ``apply_fn``;
  ``kwargs`` (e.g. ``train=False``) are bound before jit, so they stay Python
  values (static for the trace: ``if not train`` works) instead of becoming
  traced arguments. They are the same for every batch.
  """
  f = jax.jit(functools.partial(
      calibration_apply(apply_fn, setting, collection=collection), **kwargs))
  return merge_calibration([f(variables, *b) for b in batches], setting)


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


def prequantize(apply_fn: Callable, setting: q.QuantSetting | str, variables,
                *args, **kwargs):
  """``variables`` with every kernel ``setting`` quantizes replaced by ``Q_w(W)``.

  The quantized layers, their bits and each kernel's output-channel axes come
  from a trace of ``apply_fn(variables, *args, **kwargs)`` (``jax.eval_shape``:
  nothing runs; one example suffices); the kernels are then quantized in one
  jitted function. Under ``nn.scan`` a stacked kernel ``(layers, ...)`` keeps
  one scale set per layer. The kernel is quantized in the dtype the layer's
  contraction uses (``dtype_mm``) and stored back in its own dtype, so
  ``quantized_apply(apply_fn, setting, prequantized=True)(prequantize(...), x)``
  equals ``quantized_apply(apply_fn, setting)(variables, x)``.
  """
  setting = q.get_setting(setting)
  plan = quantization_plan(apply_fn, setting, variables, *args, **kwargs)
  if "params" not in variables:
    raise KeyError("prequantize: variables have no 'params' collection")
  todo = {}
  for p in plan:
    if p["w_bits"] is None or p["path"] in todo:
      continue
    kernel = intercept.subtree(variables["params"], p["path"] + "/kernel")
    if kernel is None:
      raise KeyError(f"prequantize: no params at '{p['path']}/kernel' for the "
                     "quantized layer of that path")
    if "w_keep_axes" not in p:
      raise ValueError(f"prequantize: layer '{p['path']}' was intercepted but its "
                       "contraction never ran")
    lead = kernel.ndim - p["w_ndim"]
    if lead < 0:
      raise ValueError(f"prequantize: kernel '{p['path']}/kernel' has shape "
                       f"{kernel.shape}, the layer contracts a rank-{p['w_ndim']} "
                       "kernel")
    # leading (scan) layer axes always keep their own scales
    keep = tuple(range(lead))
    if setting.w_granularity == "channel":
      keep += tuple(a + lead for a in p["w_keep_axes"])
    todo[p["path"]] = (p["w_bits"], keep or None, p["w_dtype"])

  def quantize_all(params):
    flat = dict(intercept.flatten(params))
    for path, (bits, keep, dtype) in todo.items():
      key = tuple(path.split("/")) + ("kernel",)
      w = flat[key]
      wq = q.fake_quant(w.astype(dtype), bits, axis=keep,
                        symmetric=setting.w_symmetric)
      flat[key] = wq.astype(w.dtype)
    return intercept.nest(flat)

  return {**variables, "params": jax.jit(quantize_all)(variables["params"])}
