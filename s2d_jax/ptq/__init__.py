"""The paper's post-training quantization protocols: RepQ-ViT, PTQ4ViT, ERQ.

    qapply, qvariables = s2d_jax.ptq.quantize(model.apply, {'params': params},
                                               calib_images, "RepQ-ViT/W4A4")
    logits, _ = qapply(qvariables, images)

A setting name is ``"METHOD/W<w>A<a>"`` with METHOD in :data:`METHODS`. Each method
lives in its own module (``repq.py``, ``ptq4vit.py``, ``erq.py``, ``gptq.py``) exposing

    quantize(apply_fn, variables, calib_images, w_bits, a_bits, *,
             output_fn=None, **options) -> (qapply, qvariables)

with the contract of :func:`quantize` below. Methods are ports of the official
implementations (zkkli/RepQ-ViT, hahnyuan/PTQ4ViT, zysxmu/ERQ): same quantized ops,
quantizers, calibration flow and defaults; each module's docstring says exactly what
it quantizes and where it departs from the original.

Shared building blocks (every method uses them; none edits the model):

* :mod:`s2d_jax.ptq.ops` -- the one op-interception mechanism: a method supplies a
  *provider* that sees every quantization point (Dense / DenseGeneral / Conv weight,
  input and output; attention q, k, softmax probabilities, v) with its module path;
  calibration mode (state initialised in forward order on the quantized network,
  within one pass), apply mode (state read only, weights already quantized), the
  plan, baking weights, gradients w.r.t. layer outputs. Provider state lives in the
  ``'intermediates'`` collection at each module's scope (``'ptq.<kind>'``), stacked
  per layer under big_vision's ``nn.scan``.
* :mod:`s2d_jax.ptq.quantizers` -- RepQ-ViT's uniform and log√2 quantizers and the
  quantile search (pure jnp).
* :mod:`s2d_jax.ptq.reparam` -- LayerNorm -> Dense discovery and scale
  reparameterisation (RepQ-ViT; ERQ reuses it).

``qapply.info`` (JSON-able, for report.json) holds at least ``method``, ``name``,
``w_bits``, ``a_bits``, ``calib_images`` (number used), ``options`` and ``plan`` (one
entry per quantized point: ``path``, ``kind``, ``call``, ``module``, ``bits``,
``quantizer``, ``granularity``, ...); methods add their own per-layer choices.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

# METHOD name -> module under s2d_jax.ptq implementing it.
METHODS: dict[str, str] = {
    "RepQ-ViT": "repq",
    "PTQ4ViT": "ptq4vit",
    "ERQ": "erq",
    "GPTQ": "gptq",   # weight-only baseline (e.g. "GPTQ/W4A16"), ERQ's Wqer machinery
}

# Methods that quantize weights only: their settings are "METHOD/W<w>A16".
WEIGHT_ONLY: frozenset[str] = frozenset({"GPTQ"})


def setting_name(method: str, bits: str) -> str:
  """``"METHOD/WxAy"`` for ``bits`` ``"WxAy"``; weight-only methods get ``A16``
  (``setting_name("GPTQ", "W4A4") == "GPTQ/W4A16"``)."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; known: {sorted(METHODS)}")
  m = _BITS_RE.match(bits)
  if not m:
    raise ValueError(f"bits must look like 'W4A4', got {bits!r}")
  return f"{method}/W{m.group(1)}A16" if method in WEIGHT_ONLY else f"{method}/{bits}"


_BITS_RE = re.compile(r"^W(\d+)A(\d+)$")


@dataclasses.dataclass(frozen=True)
class PTQSetting:
  """A parsed ``"METHOD/W<w>A<a>"`` name."""
  method: str
  w_bits: int
  a_bits: int

  @property
  def name(self) -> str:
    return f"{self.method}/W{self.w_bits}A{self.a_bits}"


def is_ptq_name(name: Any) -> bool:
  """True for names of the form ``"METHOD/..."`` (PTQ methods, not uniform settings)."""
  return isinstance(name, str) and "/" in name


def parse_name(name: str) -> PTQSetting:
  """``"RepQ-ViT/W4A4"`` -> ``PTQSetting('RepQ-ViT', 4, 4)``.

  Raises:
    ValueError: naming the unknown method (with the known ones) or the malformed
      bit widths.
  """
  if not is_ptq_name(name):
    raise ValueError(f"PTQ setting {name!r}: expected 'METHOD/W<bits>A<bits>', "
                     f"METHOD one of {sorted(METHODS)}")
  method, bits = name.split("/", 1)
  if method not in METHODS:
    raise ValueError(f"PTQ setting {name!r}: unknown method {method!r}; known: "
                     f"{sorted(METHODS)}")
  m = _BITS_RE.match(bits)
  if m is None:
    raise ValueError(f"PTQ setting {name!r}: bits {bits!r} are not of the form "
                     "'W<bits>A<bits>' (e.g. 'W4A4')")
  w, a = int(m.group(1)), int(m.group(2))
  for what, b in (("weight", w), ("activation", a)):
    if not 2 <= b <= 16:
      raise ValueError(f"PTQ setting {name!r}: {what} bits {b} not in [2, 16]")
  return PTQSetting(method, w, a)


def method_module(method: str):
  """The module implementing ``method`` (imported on first use)."""
  if method not in METHODS:
    raise ValueError(f"unknown PTQ method {method!r}; known: {sorted(METHODS)}")
  return importlib.import_module(f"{__name__}.{METHODS[method]}")


def quantize(apply_fn: Callable[..., Any], variables: Mapping[str, Any],
             calib_images: Any, name: str, **options: Any
             ) -> tuple[Callable[..., Any], dict[str, Any]]:
  """Calibrates ``name`` (e.g. ``"RepQ-ViT/W4A4"``) on ``calib_images``.

  Args:
    apply_fn: a linen ``Module.apply`` (or a function with its signature,
      accepting ``mutable=``), ``apply_fn(variables, images, **kw) -> output``;
      any big_vision ViT / SigLIP image tower, used from the outside.
    variables: ``{'params': ...}``.
    calib_images: float32 ``(N, H, W, C)`` calibration images (the paper: 32).
    name: ``"METHOD/W<w>A<a>"``.
    **options: method options (see the method's module), e.g.
      ``output_fn`` (model output -> logits, default ``out[0]`` for tuples).

  Returns:
    ``(qapply, qvariables)``: ``qapply(qvariables, images, **kw)`` has
    ``apply_fn``'s signature and output and runs the fake-quantized model; it is
    a pure function of arrays (jit / pmap / sharding friendly), with weights
    quantized once here, not in every forward pass. ``qvariables`` is a pytree of
    arrays: the rewritten ``'params'`` plus the calibrated quantizer state.
    ``qapply.info`` is a JSON-able dict for report.json: method, bits,
    number of calibration images, options, and the per-layer choices (which ops
    are quantized at which bits, chosen ranges / scales).
  """
  setting = parse_name(name)
  mod = method_module(setting.method)
  params = inspect.signature(mod.quantize).parameters
  if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    known = [k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(known))
    if unknown:
      raise ValueError(f"PTQ setting {name!r}: unknown option(s) {unknown}; "
                       f"{setting.method} accepts {known}")
  return mod.quantize(apply_fn, variables, calib_images, setting.w_bits,
                      setting.a_bits, **options)
