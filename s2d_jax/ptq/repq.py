"""RepQ-ViT (Li et al., ICCV 2023), ported from the official code (zkkli/RepQ-ViT,
``classification/quant/*.py``, ``classification/test_quant.py``).

    qapply, qvariables = s2d_jax.ptq.quantize(model.apply, {'params': params},
                                               calib_images, "RepQ-ViT/W4A4")

**What is quantized** (``W``/``A`` = the setting's bits; everything else -- LayerNorm,
softmax, GELU, residual adds, pooling, biases -- stays float)::

    op                                   weight        activation (its input)
    every Dense / DenseGeneral           W, per out    A, per tensor
    (q, k, v, out, MLP fc1/fc2, MAP-head  channel
    MLP and probe attention, head, ...)
    post-LayerNorm inputs (q/k/v, fc1,   W, per out    A, per channel at calibration,
    MAP fc1, MAP key/value)              channel       reparameterised to per tensor
    patch-embedding Conv                 W, per cout   8 bits, per tensor
    q·kᵀ: q and k                        --            A, uniform, per tensor
    probs·v: softmax probabilities       --            A, log√2, per tensor
    probs·v: v                           --            A, uniform, per tensor

All quantizers are static, asymmetric uniform on ``[0, 2^b - 1]`` (log√2 for the
probabilities), with ranges from RepQ-ViT's quantile search (0.999 / 0.9999 / 0.99999,
least L2; weights: the same search per output channel); see
:mod:`s2d_jax.ptq.quantizers`.

**Calibration** (official flow, all calibration images in one batch, default 32):

1. one pass with weight *and* activation quantization on, each quantizer initialised
   in forward order on the already-quantized network (:func:`s2d_jax.ptq.ops.calibrate`);
   post-LayerNorm inputs calibrated per channel;
2. scale reparameterisation (:mod:`s2d_jax.ptq.reparam`): per-channel ``(Δ_c, z_c)`` ->
   per-tensor ``(s̃, z̃) = (mean Δ_c, mean z_c)`` (unrounded) with ``r_c``, ``b_c``
   folded into the LayerNorm and into every consumer's kernel and bias (q, k, v share
   one LayerNorm: folded into all three);
3. the weight quantizers of the reparameterised layers are recalibrated (the official
   code re-runs the calibration batch with those quantizers reset and the others
   kept; only weight quantizers initialise there, which do not depend on the data, so
   we run the same searches directly on the folded kernels: same result, no second
   pass);
4. weights are quantized once into ``qvariables['params']``; ``qapply`` quantizes
   activations only.

**SigLIP's MAP head** is not in the official code (timm ViT / DeiT / Swin): we treat it
the same way. Its Dense layers (probe attention q/k/v/out, MLP) are quantized like the
encoder's; its LayerNorm -> MLP fc1 and ``encoder_norm`` -> probe key/value are
reparameterised (the probe query is not a LayerNorm output: per tensor). Folding into
``encoder_norm`` changes the values of intermediates read straight off it in big_vision's
ViT (``out['encoded']`` and, through the token map, ``pre_logits_2d`` / ``logits_2d``);
the model's pooled output and logits are unchanged (verified in float after folding).

**Deviations from the official code.**

* Which inputs get per-channel calibration + reparameterisation is found from the
  outside (LayerNorm -> Dense pairs, :func:`s2d_jax.ptq.reparam.find_groups`) instead of
  by module name (``qkv``, ``fc1``, ``reduction``); on a timm ViT these coincide, on
  SigLIP it adds the MAP head's pairs. A pair that cannot be folded exactly (e.g. a
  consumer without bias: the official code adds one, which cannot be done from outside)
  is skipped with a warning and its input is quantized per tensor.
* A model without any LayerNorm -> Dense pair gets a warning and no reparameterisation.
* No second forward pass (step 3 above): same result.
* The calibration pass is compiled as a whole (``jit_calibration=True``, default);
  ``False`` runs it op by op like the official eager PyTorch (same numbers; each
  quantizer search is then compiled once per layer shape).
* Zero-width ranges get ``Δ = 1e-8`` instead of NaN (:mod:`s2d_jax.ptq.quantizers`).
* big_vision's head is called twice (token map, pooled features); each call has its own
  input quantizer. With ``dtype_mm=bfloat16`` quantized inputs are rounded to bfloat16.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from s2d_jax import intercept
from s2d_jax.ptq import ops
from s2d_jax.ptq import quantizers as Q
from s2d_jax.ptq import reparam

METHOD = "RepQ-ViT"
CALIB_IMAGES = 32
CONV_INPUT_BITS = 8


class RepQProvider:
  """RepQ-ViT's rules as data: which quantizer each point gets (see module table)."""

  attention = True

  def __init__(self, w_bits: int, a_bits: int, *,
               per_channel: Sequence[tuple[str, int]] = (),
               percentiles: Sequence[float] = Q.PERCENTILES,
               conv_input_bits: int = CONV_INPUT_BITS):
    self.w_bits, self.a_bits = w_bits, a_bits
    self.per_channel = set(per_channel)   # (path, call) calibrated per channel
    self.reparameterised: set[tuple[str, int]] = set()
    self.percentiles = tuple(percentiles)
    self.conv_input_bits = conv_input_bits

  def _rule(self, p: ops.Point) -> dict[str, Any] | None:
    search = "quantile search (" + "/".join(map(str, self.percentiles)) + "), least L2"
    if p.kind == "matmul_output":
      return None
    if p.kind == "weight":
      return dict(bits=self.w_bits, quantizer="uniform", granularity="channel",
                  calibration=search)
    if p.kind == "probs":
      return dict(bits=self.a_bits, quantizer="log2", granularity="tensor",
                  calibration=search)
    if p.kind in ("q", "k", "v"):
      return dict(bits=self.a_bits, quantizer="uniform", granularity="tensor",
                  calibration=search)
    # matmul_input
    bits = self.conv_input_bits if p.module_type == "Conv" else self.a_bits
    key = (p.path, p.call)
    if key in self.reparameterised:
      gran = "tensor (per-channel reparameterised)"
    elif key in self.per_channel:
      gran = "channel"
    else:
      gran = "tensor"
    return dict(bits=bits, quantizer="uniform", granularity=gran,
                calibration=search)

  def describe(self, point: ops.Point) -> dict[str, Any] | None:
    return self._rule(point)

  def __call__(self, ctx: ops.Context, x: jax.Array) -> jax.Array:
    p = ctx.point
    rule = self._rule(p)
    if rule is None:
      return x
    bits = rule["bits"]
    if rule["quantizer"] == "log2":
      s = ctx.init(lambda: {"delta": Q.log_sqrt2_search(
          x, bits, self.percentiles).reshape((1,) * x.ndim)})
      return Q.log_sqrt2_quantize(x, s["delta"], bits)
    if p.kind == "weight":
      keep = p.keep_axes
    elif rule["granularity"] == "channel":
      keep = p.contract_axes
    else:
      keep = None
    s = ctx.init(lambda: dict(zip(("delta", "zero_point"), Q.uniform_search(
        x, bits, keep, self.percentiles))))
    return Q.uniform_quantize(x, s["delta"], s["zero_point"], bits)


def _check_images(calib_images) -> jax.Array:
  shape = np.shape(calib_images)
  if len(shape) != 4 or shape[0] < 1:
    raise ValueError(f"{METHOD}: calib_images must be float images (N, H, W, C) with "
                     f"N >= 1, got shape {shape}")
  x = jnp.asarray(calib_images)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{METHOD}: calib_images must be floating point, got {x.dtype}")
  return x


def reparameterize(params: Mapping[str, Any], state: Mapping[str, Any],
                   groups: Sequence[reparam.Group]
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Step 2 of the flow: fold every group; per-tensor input state for its consumers.
  Returns ``(params, state)`` (the consumers' weight state is stale until
  :func:`recalibrate_weights`)."""
  flat = ops.entries(state)
  params = dict(params)
  for g in groups:
    c0 = g.consumers[0]
    key0 = ops.Point(c0.path, "matmul_input", c0.module_type, c0.call).key
    if (c0.path, key0) not in flat:
      raise KeyError(f"{METHOD}: no per-channel input state for '{c0.path}'")
    st = flat[(c0.path, key0)]
    scale = _leaf(params, g.layernorm + "/scale")
    r, b, s_t, z_t = reparam.scale_vectors(st["delta"], st["zero_point"], scale.shape)
    params = reparam.fold(params, g, r, b)
    for c in g.consumers:
      k = ops.Point(c.path, "matmul_input", c.module_type, c.call).key
      old = flat[(c.path, k)]["delta"]
      tshape = s_t.shape[:-1] + (1,) * (old.ndim - s_t.ndim + 1)
      flat[(c.path, k)] = {"delta": s_t.reshape(tshape), "zero_point": z_t.reshape(tshape)}
  return params, ops.from_entries(flat)


def _leaf(tree, path):
  v = intercept.subtree(tree, path)
  if v is None:
    raise KeyError(f"{METHOD}: no params at '{path}'")
  return v


def recalibrate_weights(params: Mapping[str, Any], state: Mapping[str, Any],
                        paths: Sequence[str], bits: int,
                        percentiles: Sequence[float] = Q.PERCENTILES
                        ) -> dict[str, Any]:
  """Step 3: a fresh per-output-channel weight search for the kernels at ``paths``.

  The scale groups are those of the pass that calibrated them first (read off the
  stored ``keepdims`` shape, layer axis included under scan).
  """
  flat = ops.entries(state)
  for path in dict.fromkeys(paths):
    key = (path, ops.PREFIX + "weight")
    if key not in flat:
      raise KeyError(f"{METHOD}: no weight state for '{path}'")
    old = flat[key]["delta"]
    w = _leaf(params, path + "/kernel")
    if old.ndim != w.ndim:
      raise ValueError(f"{METHOD}: weight state of '{path}' has shape {old.shape}, "
                       f"kernel {w.shape}")
    keep = tuple(i for i, n in enumerate(old.shape) if n != 1)
    d, z = Q.uniform_search(w, bits, keep, percentiles)
    flat[key] = {"delta": d, "zero_point": z}
  return ops.from_entries(flat)


def _weight_fn(bits):
  return lambda path, w, s: Q.uniform_quantize(w, s["delta"], s["zero_point"], bits)


def _scales_report(state) -> dict[str, Any]:
  """Per-tensor activation ranges ``(Δ, z)`` per point, JSON-able (lists under scan;
  per-channel inputs that were not reparameterised are left out)."""
  out = {}
  for (path, name), s in ops.entries(state).items():
    if name == ops.PREFIX + "weight":
      continue
    d = np.asarray(s["delta"])
    if d.ndim and d.shape[-1] != 1:
      continue
    entry = {"delta": np.squeeze(d).tolist()}
    if "zero_point" in s:
      entry["zero_point"] = np.squeeze(np.asarray(s["zero_point"])).tolist()
    out[f"{path}:{name[len(ops.PREFIX):]}"] = entry
  return out


def quantize(apply_fn: Callable[..., Any], variables: Mapping[str, Any],
             calib_images: Any, w_bits: int, a_bits: int, *,
             output_fn: Callable[[Any], Any] | None = None,
             num_calib: int | None = CALIB_IMAGES, reparameterise: bool = True,
             percentiles: Sequence[float] = Q.PERCENTILES,
             conv_input_bits: int = CONV_INPUT_BITS, verify: bool = True,
             jit_calibration: bool = True,
             apply_kwargs: Mapping[str, Any] | None = None
             ) -> tuple[Callable[..., Any], dict[str, Any]]:
  """RepQ-ViT W``w_bits``A``a_bits`` (contract: :func:`s2d_jax.ptq.quantize`).

  Args:
    apply_fn, variables: the model (``variables['params']``).
    calib_images: ``(N, H, W, C)`` float images; the first ``num_calib`` (default 32,
      None = all) are used, in order (deterministic).
    w_bits, a_bits: bit widths.
    output_fn: model output -> logits (default ``out[0]`` for tuples), used by the
      float check of the reparameterisation.
    reparameterise: False skips step 2 (post-LayerNorm inputs then per tensor).
    percentiles: the quantile-search candidates.
    conv_input_bits: bits of the patch-embedding input (official: 8).
    verify: compare the reparameterised float model with the original on up to 8
      calibration images; warn if the outputs differ by more than 1e-3 (relative).
    jit_calibration: compile the whole calibration pass (default) or run it op by
      op (see :func:`s2d_jax.ptq.ops.calibrate`).
    apply_kwargs: extra keyword arguments for ``apply_fn`` (e.g. ``train=False``).
  """
  t_start = time.perf_counter()
  x = _check_images(calib_images)
  if num_calib is not None:
    x = x[:num_calib]
  kw = dict(apply_kwargs or {})
  if "params" not in variables:
    raise KeyError(f"{METHOD}: variables need a 'params' collection")
  if output_fn is None:
    output_fn = lambda out: out[0] if isinstance(out, (tuple, list)) else out
  params = variables["params"]
  base = {k: v for k, v in variables.items() if k != ops.COLLECTION}

  groups, skipped = reparam.find_groups(apply_fn, base, x[:1], **kw)
  if not reparameterise:
    skipped = [dict(g.to_json(), reason="reparameterise=False") for g in groups] + skipped
    groups = []
  if not groups:
    warnings.warn(f"{METHOD}: no LayerNorm -> Dense pair can be reparameterised in "
                  "this model; scale reparameterisation skipped (all inputs per "
                  "tensor).", stacklevel=2)
  for s in skipped:
    warnings.warn(f"{METHOD}: not reparameterising {s['layernorm']} -> "
                  f"{s['consumers']}: {s['reason']}; those inputs are per tensor.",
                  stacklevel=2)
  provider = RepQProvider(
      w_bits, a_bits, percentiles=percentiles, conv_input_bits=conv_input_bits,
      per_channel=[(c.path, c.call) for g in groups for c in g.consumers])

  # 1. forward-order calibration on the quantized network
  plan: list[dict[str, Any]] = []
  _, state = ops.calibrate(apply_fn, provider, base, x, jit=jit_calibration,
                           plan=plan, **kw)
  # 2. scale reparameterisation
  params2, state = reparameterize(params, state, groups)
  provider.reparameterised = set(provider.per_channel)
  # 3. recalibrate the weight quantizers of the reparameterised layers
  state = recalibrate_weights(params2, state,
                              [c.path for g in groups for c in g.consumers],
                              w_bits, percentiles)
  # 4. weights quantized once
  qparams = jax.jit(lambda p, s: ops.bake_weights(p, s, _weight_fn(w_bits)))(
      params2, state)
  qvariables = {**base, "params": qparams, ops.COLLECTION: state}

  rel_err = None
  if verify and groups:
    f = jax.jit(lambda v, im: output_fn(apply_fn(v, im, **kw)))
    xv = x[:8]
    y0 = np.asarray(f(base, xv), np.float64)
    y1 = np.asarray(f({**base, "params": params2}, xv), np.float64)
    rel_err = float(np.max(np.abs(y1 - y0)) / max(np.max(np.abs(y0)), 1e-12))
    if rel_err > 1e-3:
      warnings.warn(f"{METHOD}: the reparameterised float model differs from the "
                    f"original by {rel_err:.2e} (relative): a LayerNorm output is "
                    "also used by something other than its Dense consumers.",
                    stacklevel=2)

  qapply_inner = ops.intercepted(apply_fn, provider, mode="apply")

  def qapply(qvars, *args, **kwargs):
    return qapply_inner(qvars, *args, **kwargs)

  for e in plan:  # the plan as applied (reparameterised inputs are per tensor)
    if e["kind"] != "weight":
      e.update(provider.describe(ops.Point(e["path"], e["kind"], e["module"],
                                           e["call"])))
  qapply.provider = provider
  qapply.info = dict(
      method=METHOD, name=f"{METHOD}/W{w_bits}A{a_bits}", w_bits=w_bits,
      a_bits=a_bits, calib_images=int(x.shape[0]),
      options=dict(num_calib=num_calib, reparameterise=reparameterise,
                   percentiles=list(percentiles), conv_input_bits=conv_input_bits,
                   verify=verify, jit_calibration=jit_calibration),
      reparameterised=[g.to_json() for g in groups], skipped=skipped,
      reparam_float_rel_err=rel_err, plan=plan, act_ranges=_scales_report(state),
      calibration_s=time.perf_counter() - t_start)
  return qapply, qvariables
