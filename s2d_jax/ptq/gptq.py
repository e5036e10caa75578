"""GPTQ weight-only quantization (``"GPTQ/W<w>A16"``), a common baseline.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (ICLR 2023); official code IST-DASLab/gptq
(``gptq.py`` ``fasterquant``, ``opt.py`` ``opt_sequential``, ``quant.py``).
Weights only: activations stay float (``A16``; other activation bits raise).

What is quantized: the kernel of every Dense / DenseGeneral / Conv of the model
(for a big_vision ViT: patch embedding, attention q/k/v/out, MLP fc1/fc2, the
MAP head's layers, the classifier head), each as its matrix view ``W (d, out)``
(attention q/k/v ``(D, H·Dh)``, out ``(H·Dh, D)``, conv im2col rows), with ``b``
bits on the official grid: per output channel, asymmetric, min–max with the
range widened to hold 0 (``quant.py`` ``find_params(perchannel=True,
sym=False, mse=False)``), fixed from the float weight before the updates.
Biases, LayerNorms and embeddings stay float. ``exclude`` (regexes on module
paths) keeps layers in float.

Algorithm per layer (:func:`s2d_jax.ptq.error_reduction.gptq`): ``H = XᵀX`` of
the layer's input rows over the calibration images, dead inputs zeroed,
``H += percdamp·mean(diag H)·I`` (``percdamp = 0.01``), upper Cholesky factor
``U`` of ``H⁻¹``; input rows quantized in order (no act-order), each error
``(w_i − q_i)/U_ii`` propagated to the rows not yet quantized, lazily in blocks
of ``blocksize = 128``. The official defaults throughout.

Sequential, as ``opt_sequential``: the model is processed in forward order by
*stages* (an encoder block, ``encoderblock_<i>`` or layer ``i`` of a scanned
``encoderblock`` stack; every other layer is a stage of its own), and each
stage's Hessians come from a forward pass in which all earlier stages are
already quantized and the stage itself is float (within a block, all layers
see the float block, as the official default without ``--true-sequential``).
``sequential=False`` takes all Hessians from the float model (one pass).

Streaming: each pass computes every layer's ``XᵀX`` inside one jitted forward
per batch (:class:`~s2d_jax.ptq.error_reduction.MomentStream`), never holding
activations; the same compiled pass serves all stages (the PTQ op
interception of :mod:`s2d_jax.ptq.ops`, every point left float). A module called several
times uses its last call (big_vision's head: the pooled features).

Deviations from the official code: the Hessian is ``XᵀX`` instead of
``2/N·XᵀX`` (GPTQ is invariant to that scale: the damping is relative and the
updates use ratios of ``U``); a convolution's input rows are swept in PyTorch's
``(cin, kh, kw)`` order (the official ``W.flatten(1)``), not flax's; the ViT layers outside the encoder blocks
(patch embedding, MAP head, classifier) are quantized as well (the official
OPT script leaves embeddings and ``lm_head`` float; ViT PTQ work, ERQ's
comparison included, quantizes them), each as its own stage.

``qapply`` is ``apply_fn`` itself: the returned ``qvariables`` hold the
weights already on their grid (quantized once, here), so evaluation costs
exactly a float pass. Each layer's update is one jitted call per layer shape
(output channels zero-padded to a multiple of 128, ``bits`` traced), so a
model compiles it once per input width.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from s2d_jax.ptq import error_reduction as er

_BLOCK = re.compile(r"^encoderblock_\d+$")
PAD_COLS = 128   # output channels padded (zero columns) so that layers share compiles


def check_images(calib_images: Any, name: str) -> jax.Array:
  """Calibration images as float32 ``(N, H, W, C)``, N ≥ 1, or a clear error."""
  x = jnp.asarray(calib_images)
  if x.ndim != 4 or x.shape[0] < 1:
    raise ValueError(f"{name}: calib_images must be (N, H, W, C) with N >= 1, got "
                     f"shape {tuple(x.shape)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name}: calib_images must be float, got {x.dtype}")
  return x.astype(jnp.float32)


def stages(layers: Sequence[er.Layer]) -> list[list[tuple[er.Layer, int | None]]]:
  """Layers grouped into sequential stages in forward order (module docstring).

  Each entry is ``(layer, index)`` with ``index`` the layer of a scanned stack
  (None in the loop layout).
  """
  groups: dict[Any, tuple[tuple[int, int], list]] = {}
  for layer in layers:
    parts = layer.path.split("/")
    if layer.view.batch_ndim:
      stack = "/".join(parts[:next(i for i, p in enumerate(parts)
                                   if p in er.spectral.SCAN_AXIS_NAMES) + 1])
      for i in range(layer.depth):
        key = ("scan", stack, i)
        order = groups.get(key, ((layer.order, i), []))[0]
        groups.setdefault(key, (order, []))[1].append((layer, i))
      continue
    block = next((i for i, p in enumerate(parts) if _BLOCK.match(p)), None)
    key = ("block", "/".join(parts[:block + 1])) if block is not None else (
        "layer", layer.path)
    order = groups.get(key, ((layer.order, 0), []))[0]
    groups.setdefault(key, (order, []))[1].append((layer, None))
  return [members for _, members in sorted(groups.values(), key=lambda g: g[0])]


def _gptq_layer(w, aa, bits, blocksize, percdamp):
  """GPTQ grid (min–max of the float weight) + OBS updates of one layer.

  The output channels are zero-padded to a multiple of ``PAD_COLS`` so that
  the jitted update (``bits`` traced) compiles once per input width."""
  n_out = w.shape[1]
  w = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, -(-n_out // PAD_COLS) * PAD_COLS
                                               - n_out)))
  scale, zero = er.minmax_grid(w, bits)
  return _gptq_padded(w, aa, scale, zero, jnp.exp2(bits * 1.0) - 1.0, blocksize,
                      percdamp)[:, :n_out]


@functools.partial(jax.jit, static_argnames=("blocksize",))
def _gptq_padded(w, aa, scale, zero, qmax, blocksize, percdamp):
  """The update on the padded weight (zero columns quantize to 0, error 0)."""
  return er.gptq(w, aa[:-1, :-1], scale, zero, qmax, blocksize=blocksize,
                 percdamp=percdamp)


def quantize(apply_fn: Callable[..., Any], variables: Mapping[str, Any],
             calib_images: Any, w_bits: int, a_bits: int, *,
             output_fn: Callable[[Any], Any] | None = None,
             blocksize: int = 128, percdamp: float = 0.01,
             sequential: bool = True, batch_size: int = 32,
             exclude: Sequence[str] = (),
             apply_kwargs: Mapping[str, Any] | None = None
             ) -> tuple[Callable[..., Any], dict[str, Any]]:
  """GPTQ ``W<w_bits>A16`` (see module docstring; contract of ``s2d_jax.ptq.quantize``).

  Args:
    apply_fn, variables, calib_images: as :func:`s2d_jax.ptq.quantize`.
    w_bits: weight bits (2..8 useful). a_bits: must be 16 (weight-only).
    output_fn: unused (GPTQ's objective is per layer); accepted for the contract.
    blocksize: lazy-batch block of the OBS updates (official 128).
    percdamp: Hessian damping relative to its mean diagonal (official 0.01).
    sequential: Hessians from the partly quantized model, stage by stage
      (official); False: all from the float model in one pass.
    batch_size: calibration images per forward pass.
    exclude: regexes (``re.search`` on module paths) of layers kept float.
    apply_kwargs: extra keyword arguments for ``apply_fn`` during calibration.

  Returns:
    ``(qapply, qvariables)``; ``qapply`` is ``apply_fn`` with ``.info``.
  """
  del output_fn
  t_start = time.perf_counter()
  if a_bits != 16:
    raise ValueError(f"GPTQ is weight-only: activations stay float, so the "
                     f"setting must be 'GPTQ/W{w_bits}A16', got a_bits={a_bits}")
  if not 2 <= w_bits <= 16:
    raise ValueError(f"GPTQ: w_bits {w_bits} not in [2, 16]")
  if blocksize < 1:
    raise ValueError(f"GPTQ: blocksize must be >= 1, got {blocksize}")
  if not percdamp > 0:
    raise ValueError(f"GPTQ: percdamp must be > 0, got {percdamp}")
  if "params" not in variables:
    raise ValueError("GPTQ: variables must hold 'params'")
  images = check_images(calib_images, "GPTQ")
  apply_kwargs = dict(apply_kwargs or {})
  layers = er.discover_layers(apply_fn, variables, images[:1], **apply_kwargs)
  pats = [re.compile(p) for p in exclude]
  layers = [l for l in layers if not any(p.search(l.path) for p in pats)]
  if not layers:
    raise ValueError("GPTQ: the model has no Dense / DenseGeneral / Conv layer to "
                     "quantize (or `exclude` removed them all)")
  stream = er.MomentStream(apply_fn, {l.shares for l in layers}, **apply_kwargs)
  params = variables["params"]
  moments = None
  stage_list = stages(layers)
  for stage in stage_list:
    if sequential or moments is None:
      moments = stream({**variables, "params": params}, images, batch_size)
    for layer, index in stage:
      aa = moments[layer.shares].aa
      if index is not None:
        aa = aa[index]
      w, _ = er.layer_matrix(params, layer, index)
      h = aa
      perm = er.torch_row_order(layer)   # conv: the official column order
      if perm is not None:
        ext = np.concatenate([perm, [len(perm)]])
        w, h = w[perm], aa[ext][:, ext]
      q = _gptq_layer(w, h, w_bits, blocksize, percdamp)
      if perm is not None:
        q = q[np.argsort(perm)]
      params = er.set_layer_matrix(params, layer, q, None, index)
  qvariables = {**variables, "params": params}

  def qapply(qvars, *args, **kwargs):
    return apply_fn(qvars, *args, **kwargs)

  qapply.info = {
      "method": "GPTQ", "name": f"GPTQ/W{w_bits}A16", "w_bits": w_bits,
      "a_bits": 16, "calib_images": int(images.shape[0]),
      "options": {"blocksize": blocksize, "percdamp": percdamp,
                  "sequential": sequential, "batch_size": batch_size,
                  "exclude": list(exclude)},
      # weights only: every other point (inputs, attention) stays float
      "plan": [{"path": l.path, "kind": "weight", "call": 0, "module": l.kind,
                "bits": w_bits, "quantizer": "uniform", "granularity": "channel",
                "calibration": "min-max (asymmetric), GPTQ OBS updates"}
               for l in layers],
      "layers": [{"path": l.path, "rows": l.rows, "cols": l.cols,
                  "depth": l.depth, "stage": i}
                 for i, st in enumerate(stage_list) for l, idx in st
                 if idx in (None, 0)],
      "calibration_s": time.perf_counter() - t_start,
  }
  return qapply, qvariables
