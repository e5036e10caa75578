"""ERQ: Error Reduction for post-training Quantization of ViTs (``"ERQ/W<w>A<a>"``).

Zhong et al., "ERQ: Error Reduction for Post-Training Quantization of Vision
Transformers" (ICML 2024) and its extended version "Towards Accurate
Post-Training Quantization of Vision Transformers via Error Reduction"
(arXiv 2407.06794), ported from the official code (zysxmu/ERQ:
``test_quant_expand.py``, ``quant/quant_model.py``, ``quant/quant_modules.py``,
``quant/quantizer.py``; README: ``--coe 10000``, 32 calibration images).
The linear algebra (Aqer, Wqer, streamed moments) is
:mod:`s2d_jax.ptq.error_reduction`; the quantizers, op interception and the
scale reparameterisation are RepQ-ViT's (:mod:`s2d_jax.ptq.repq`), on which the
official code is built.

**What is quantized** (``W``/``A`` = the setting's bits; LayerNorm, softmax,
GELU, residual adds, pooling and biases stay float)::

    op                                   weight                      input
    every Dense / DenseGeneral           W, per out channel, on the  A, per tensor
    (q, k, v, out, fc1, fc2, MAP head,   grid Wqer leaves them on
    head)
    post-LayerNorm inputs (q/k/v, fc1,   W, *dual-uniform* per out   A, per channel at
    MAP fc1, MAP key/value)              channel (below)             calibration, then
                                                                     reparameterised to
                                                                     per tensor
    patch-embedding Conv                 W, per cout (Wqer, no       float (the official
                                         rounding refinement)        QuantConv2d has no
                                                                     input quantizer)
    q·kᵀ: q and k                        --                          A, uniform, per tensor
    probs·v: probabilities, v            --                          A, log√2 / uniform

i.e. RepQ-ViT's ops, except the patch-embedding input (float).

**Quantizers.** Activations: RepQ-ViT's (asymmetric uniform, quantile search
0.999 / 0.9999 / 0.99999 least L2; log√2 for the softmax). Weights: asymmetric
uniform per output channel, range by the least-L2 search over the 10 quantiles
:data:`WEIGHT_QUANTILES` (the official weight candidates, wider than RepQ-ViT's
three), and for the layers whose input is a LayerNorm output (official:
``qkv`` and ``fc1``, built with ``two_part=True``) the *dual-uniform* grid of
the extended paper: the ``out_channels // 20`` input rows that most channels
flag as outliers (beyond the 99th percentile of the channel's positive weights
or the 1st of its negative ones) get their own per-channel grid
(:func:`dual_weight_grid`).

**Pipeline** (``main()`` of the official ``test_quant_expand.py``):

1. activation quantizers calibrated in forward order on the network with
   activations quantized and **weights float** (official
   ``set_quant_state(input_quant=True, weight_quant=False)``), post-LayerNorm
   inputs per channel;
2. RepQ-ViT's scale reparameterisation (:func:`s2d_jax.ptq.repq.reparameterize`);
3. one float pass over the calibration images (the reparameterised model, no
   quantization: every layer's float input ``x``), in which each layer's
   moments ``ĀᵀĀ`` and ``ĀᵀF`` (``Ā = [x̄, 1]``, ``x̄`` = the layer's own
   activation quantizer applied to ``x``, ``F = [x, 1]``) are streamed
   (:class:`~s2d_jax.ptq.error_reduction.MomentStream`); every later step uses
   these float inputs/outputs (layers are treated independently, as the
   official code does with its stored ``fp_output``);
4. **Aqer** for every Dense (not the patch embedding):
   ``[W; b] += (ĀᵀĀ + λ₁I)⁻¹ Āᵀ(y_float − Ā[W; b])`` with
   ``λ₁ = 0.1·coe`` (``coe = 10000``: ``λ₁ = 1000``), ``λ₁ = 0.1`` for a 2-D
   input ``(B, D)`` (the classifier head on the pooled features; option
   ``lambda_2d``: with 32 calibration images the head's regression has 32
   rows for ``D + 1`` unknowns per class and can overfit);
5. weight quantizers calibrated on the Aqer-updated weights;
6. **Wqer** for every layer, output channels independent (the official groups
   of 500 channels only bound memory): input rows quantized in successive
   halves, each block's rounding refined on the proxy ``Δᵀ(μμᵀ + Σ)Δ`` (at most
   100 moves), the rows still float compensated by ridge regression with
   ``λ₂ = 0.1·coe`` (Dense) or ``coe`` (patch embedding, which gets no
   rounding refinement and whose input is the float image); the bias absorbs
   the last compensation and stays float. The result lies on the weight grid
   (:func:`s2d_jax.ptq.error_reduction.wqer`);
7. weights stored once, on their grid, in ``qvariables['params']``; ``qapply``
   quantizes activations only (RepQ-ViT's interception, weights not touched).

Attention q/k/v called on one input (and the MAP head's key/value) are one
layer for steps 3–6, as timm's fused ``qkv`` Linear is in the official code:
one set of moments, one Aqer/Wqer over the concatenated ``(D, 3·H·Dh)``
matrix, one dual-uniform split (``3·H·Dh // 20`` rows). The SigLIP MAP head is
not in the official code (timm ViT/DeiT/Swin): it is treated like the encoder
(its probe query, whose input is not a LayerNorm output, gets a single grid).
A convolution's rows are processed in PyTorch's ``(cin, kh, kw)`` order (the
official flattening), not flax's ``(kh, kw, cin)``: the successive halves
depend on it. Layers are processed one by one (scan layout: layer by layer of the stack),
each step jitted per layer shape, with the output channels padded to a
multiple of 128 (zero columns, dropped again) so that layers of one input width
share a compilation; ``bits`` are traced (one compilation for all settings).

**Deviations from the official code** (deliberate):

* The moments are streamed over batches (``batch_size``) instead of holding all
  activations; the same sums.
* Wqer's refinement takes the proxy change of a move in closed form
  (``t·g_j + t²·C_jj``) and updates ``g = 2Cδ`` incrementally instead of
  recomputing two quadratic forms per step (same decisions up to float
  rounding in exact ties), and a channel whose move is rejected stops (the
  official loop retries it and is rejected again: same result).
* Without a bias the last weight row is rounded to nearest (the official code
  leaves it float for the final weight quantizer, which rounds it to nearest).
* Zero-width weight ranges get ``Δ = 1e-8`` (as :mod:`s2d_jax.ptq.quantizers`).
* big_vision's head is called twice (token map, pooled features): each call
  keeps its own activation quantizer (RepQ-ViT port); the statistics and the
  2-D rule use the last call (the pooled features that make the logits).
* A layer group that RepQ-ViT's port cannot reparameterise (see
  :mod:`s2d_jax.ptq.reparam`) keeps a per-tensor input and a single weight grid.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from s2d_jax.ptq import error_reduction as er
from s2d_jax.ptq import ops
from s2d_jax.ptq import quantizers as Q
from s2d_jax.ptq import reparam
from s2d_jax.ptq import repq

METHOD = "ERQ"
CALIB_IMAGES = 32
COE = 10000.0            # the official README's --coe
LAMBDA_2D = 0.1          # the official Aqer λ₁ for 2-D inputs (the head)
PAD_COLS = 128           # output channels padded to a multiple of this (compiles)

# The official weight quantizer's candidate quantiles (quant/quantizer.py, weights;
# the activation quantizers search (0.999, 0.9999, 0.99999) as RepQ-ViT does).
WEIGHT_QUANTILES = (0.97, 0.98, 0.99, 0.995, 0.9995, 0.9997, 0.9999, 0.99995,
                    0.99999, 1.0)
DUAL_PERCENTILE = 99.0   # outlier threshold of the dual-uniform split, per channel
DUAL_FRACTION = 20       # n_top = out_channels // 20 input rows get their own grid


@functools.partial(jax.jit, static_argnames=("quantiles",))
def weight_grid(w: jax.Array, bits: int, rows: jax.Array | None = None,
                quantiles: tuple[float, ...] = WEIGHT_QUANTILES
                ) -> tuple[jax.Array, jax.Array]:
  """ERQ's per-output-channel weight grid: least-L2 quantile pair.

  For each column ``o`` of ``w (d, out)`` (an output channel), over the rows
  selected by ``rows`` (bool ``(d,)``, default all) and each ``p`` in
  ``quantiles``: ``hi = quantile_p(w_o)``, ``lo = quantile_{1−p}(w_o)``
  (linear interpolation), ``s = (hi − lo)/(2^b − 1)`` (at least
  ``quantizers.MIN_DELTA``), ``z = round(−lo/s)``,
  score ``mean((Q(w_o) − w_o)²)``; the first least score wins (the official
  ``init_quantization_scale`` of a non-activation ``UniformQuantizer``).

  Returns:
    ``(scale, zero)`` of shape ``(1, out)``.
  """
  qmax = jnp.exp2(jnp.asarray(bits, jnp.float32)) - 1.0   # bits may be traced
  w = jnp.asarray(w, jnp.float32)
  sel = jnp.ones(w.shape[:1], bool) if rows is None else jnp.asarray(rows, bool)
  wm = jnp.where(sel[:, None], w, jnp.nan)
  p = jnp.asarray(quantiles, jnp.float32)
  hi = jnp.nanquantile(wm, p, axis=0)          # (P, out)
  lo = jnp.nanquantile(wm, 1.0 - p, axis=0)
  s = jnp.maximum((hi - lo) / qmax, Q.MIN_DELTA)
  z = jnp.round(-lo / s)
  q = (jnp.clip(jnp.round(w[None] / s[:, None]) + z[:, None], 0, qmax)
       - z[:, None]) * s[:, None]             # (P, d, out)
  err = jnp.sum(jnp.where(sel[None, :, None], (q - w[None]) ** 2, 0.0), axis=1)
  err = jnp.where(jnp.isfinite(err), err, jnp.inf)
  best = jnp.argmin(err, axis=0)               # first least score
  pick = lambda a: jnp.take_along_axis(a, best[None], axis=0)
  return pick(s), pick(z)


@jax.jit
def dual_rows(w: jax.Array, n_top: int) -> jax.Array:
  """The official dual-uniform split: input rows of ``w (d, out)`` with many outliers.

  Per output channel ``o``: rows ``i`` with ``w_io`` above the 99th percentile
  of the channel's positive weights or below the 1st percentile of its
  negative ones are outliers. Rows are ranked by how many channels flag them
  (ties: the row flagged by the earliest channel first, then the lower row
  index: the insertion order of the official ``Counter.most_common``), and
  the first ``n_top`` flagged rows are returned as a bool mask ``(d,)``
  (``n_top`` may be traced).
  """
  w = jnp.asarray(w, jnp.float32)
  d, n_out = w.shape
  thr_pos = jnp.nanpercentile(jnp.where(w > 0, w, jnp.nan), DUAL_PERCENTILE, axis=0)
  thr_neg = jnp.nanpercentile(jnp.where(w < 0, w, jnp.nan),
                              100.0 - DUAL_PERCENTILE, axis=0)
  flag = (w > thr_pos[None]) | (w < thr_neg[None])          # NaN thresholds: False
  count = jnp.sum(flag, axis=1)
  first = jnp.min(jnp.where(flag, jnp.arange(n_out)[None], n_out), axis=1)
  order = jnp.lexsort((jnp.arange(d), first, -count))
  rank = jnp.zeros((d,), jnp.int32).at[order].set(jnp.arange(d, dtype=jnp.int32))
  return (rank < n_top) & (count > 0)


@functools.partial(jax.jit, static_argnames=("quantiles",))
def dual_weight_grid(w: jax.Array, bits: int, n_top: int,
                     quantiles: tuple[float, ...] = WEIGHT_QUANTILES
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """ERQ's dual-uniform weight grid (official ``two_part`` quantizer).

  The rows of :func:`dual_rows` get one :func:`weight_grid` per output channel,
  the remaining rows another. Returns ``(scale, zero, top)`` with ``scale``,
  ``zero`` of shape ``(d, out)`` and ``top`` the bool ``(d,)`` split; with
  ``n_top == 0`` (e.g. fewer than 20 output channels, or a layer that gets a
  single grid) or no flagged row it is the plain per-channel
  :func:`weight_grid` broadcast to ``(d, out)``. ``bits`` and ``n_top`` may be
  traced (single and dual layers share one compilation).
  """
  d, n_out = w.shape
  top = dual_rows(w, n_top)
  s1, z1 = weight_grid(w, bits, top, quantiles=quantiles)
  s2, z2 = weight_grid(w, bits, ~top, quantiles=quantiles)
  return (jnp.where(top[:, None], s1, s2), jnp.where(top[:, None], z1, z2), top)


# ------------------------------------------------------------------ provider


class ErqProvider(repq.RepQProvider):
  """RepQ-ViT's activation quantizers, patch-embedding input float, weights
  untouched (ERQ bakes them with Wqer; during calibration they stay float)."""

  def __init__(self, w_bits: int, a_bits: int, *, dual=(), **kwargs):
    super().__init__(w_bits, a_bits, **kwargs)
    self.dual = set(dual)   # paths with a dual-uniform weight grid

  def _rule(self, p: ops.Point) -> dict[str, Any] | None:
    if p.kind == "matmul_input" and p.module_type == "Conv":
      return None
    if p.kind == "weight":
      grid = "dual-uniform" if p.path in self.dual else "uniform"
      return dict(bits=self.w_bits, quantizer=grid, granularity="channel",
                  calibration="10-quantile search, least L2; Aqer + Wqer")
    return super()._rule(p)

  def __call__(self, ctx: ops.Context, x: jax.Array) -> jax.Array:
    if ctx.point.kind == "weight":
      return x
    return super().__call__(ctx, x)


# ------------------------------------------------------------- layer groups


@dataclasses.dataclass(frozen=True)
class Unit:
  """Layers sharing one input (fused for Aqer/Wqer, like timm's ``qkv``)."""
  layers: tuple[er.Layer, ...]
  dual: bool          # input reparameterised (post-LayerNorm): dual-uniform grid
  conv: bool          # patch embedding: no Aqer, float input, no refinement

  @property
  def path(self) -> str:
    return self.layers[0].path

  @property
  def depth(self) -> int:
    return self.layers[0].depth

  @property
  def bias(self) -> bool:
    return self.layers[0].bias


def units(layers: Sequence[er.Layer], dual_paths) -> list[Unit]:
  """Group layers that share an input into units (forward order)."""
  by_share: dict[str, list[er.Layer]] = {}
  for layer in layers:
    by_share.setdefault(layer.shares, []).append(layer)
  out = []
  for members in by_share.values():
    first = members[0]
    fusable = all(m.bias == first.bias and m.rows == first.rows
                  and m.view.batch_shape == first.view.batch_shape for m in members)
    groups = [tuple(members)] if fusable else [(m,) for m in members]
    for g in groups:
      out.append(Unit(g, dual=all(m.path in dual_paths for m in g),
                      conv=g[0].kind == "Conv"))
  return out


def _pad_cols(n: int) -> int:
  return -(-n // PAD_COLS) * PAD_COLS


@functools.partial(jax.jit, static_argnames=("aqer", "wqer", "refine",
                                             "max_steps"))
def _erq_unit(w, b, aa, af, bits, n_top, lam1, lam2, *, aqer: bool, wqer: bool,
              refine: bool, max_steps: int):
  """Aqer (optional) → weight grid (dual, or single with ``n_top = 0``) → Wqer,
  one unit, jitted (``bits``, ``n_top``, ``λ`` traced).

  ``w (d, out_padded)``; the padded columns are zero. Returns ``(w_q, b_new,
  top)``.
  """
  if aqer:
    w, b = er.aqer(w, b, er.Moments(aa, af), lam1)
  scale, zero, top = dual_weight_grid(w, bits, n_top)
  qmax = jnp.exp2(jnp.asarray(bits, jnp.float32)) - 1.0
  if not wqer:   # ablation: round to nearest on the same grid
    return er.grid_quantize(w, scale, zero, qmax), b, top
  wq, bq = er.wqer(w, b, aa, scale, zero, qmax, lam2, refine=refine,
                   max_steps=max_steps)
  return wq, bq, top


@functools.partial(jax.jit, static_argnames=("pad",))
def _assemble(ws, bs, pad: int):
  """Members' matrices side by side, output channels zero-padded by ``pad``."""
  w = jnp.pad(jnp.concatenate([x.astype(jnp.float32) for x in ws], axis=1),
              ((0, 0), (0, pad)))
  b = None if bs is None else jnp.pad(
      jnp.concatenate([x.astype(jnp.float32) for x in bs]), (0, pad))
  return w, b


@functools.partial(jax.jit, static_argnames=("cols",))
def _split(wq, bq, cols: tuple[int, ...]):
  """Inverse of :func:`_assemble` (padding dropped)."""
  edges = np.cumsum((0,) + cols)
  return tuple((wq[:, a:z], None if bq is None else bq[a:z])
               for a, z in zip(edges[:-1], edges[1:]))


def _process_unit(params, unit: Unit, moments: er.Moments, index, bits: int,
                  coe: float, max_steps: int, aqer: bool = True,
                  wqer: bool = True, lambda_2d: float = LAMBDA_2D):
  """Runs :func:`_erq_unit` on one unit (layer ``index`` under scan); returns
  the new params and a JSON-able report entry."""
  mats = [er.layer_matrix(params, layer, index) for layer in unit.layers]
  cols = tuple(layer.cols for layer in unit.layers)
  n_out = sum(cols)
  w, b = _assemble(tuple(m[0] for m in mats),
                   None if mats[0][1] is None else tuple(m[1] for m in mats),
                   _pad_cols(n_out) - n_out)
  aa = moments.aa if index is None else moments.aa[index]
  af = None
  if moments.af is not None:
    af = moments.af if index is None else moments.af[index]
  two_d = unit.layers[0].input_ndim == 2
  lam1 = lambda_2d if two_d else 0.1 * coe
  lam2 = coe if unit.conv else 0.1 * coe
  n_top = n_out // DUAL_FRACTION if unit.dual else 0
  perm = er.torch_row_order(unit.layers[0])   # conv: rows in the official order
  if perm is not None:
    ext = np.concatenate([perm, [len(perm)]])
    w, aa = w[perm], aa[ext][:, ext]
    af = None if af is None else af[ext][:, ext]
  wq, bq, top = _erq_unit(
      w, b, aa, af, bits, n_top, lam1, lam2, aqer=aqer and not unit.conv,
      wqer=wqer, refine=not unit.conv, max_steps=max_steps)
  if perm is not None:
    wq = wq[np.argsort(perm)]
  for layer, (lw, lb) in zip(unit.layers, _split(wq, bq, cols)):
    params = er.set_layer_matrix(params, layer, lw, lb, index)
  entry = dict(layers=[l.path for l in unit.layers], index=index,
               rows=int(w.shape[0]), cols=int(n_out),
               aqer=aqer and not unit.conv,
               lambda1=None if unit.conv else lam1, lambda2=lam2, wqer=wqer,
               refine=wqer and not unit.conv, input_2d=two_d,
               weight_grid="dual-uniform" if unit.dual else "uniform",
               dual_rows=np.nonzero(np.asarray(top))[0].tolist() if unit.dual
               else None)
  return params, entry


# ------------------------------------------------------------------ quantize


def quantize(apply_fn: Callable[..., Any], variables: Mapping[str, Any],
             calib_images: Any, w_bits: int, a_bits: int, *,
             output_fn: Callable[[Any], Any] | None = None,
             num_calib: int | None = CALIB_IMAGES, coe: float = COE,
             dual_uniform: bool = True, max_steps: int = 100,
             lambda_2d: float = LAMBDA_2D, aqer: bool = True,
             wqer: bool = True, batch_size: int = 32,
             percentiles: Sequence[float] = Q.PERCENTILES,
             apply_kwargs: Mapping[str, Any] | None = None
             ) -> tuple[Callable[..., Any], dict[str, Any]]:
  """ERQ W``w_bits``A``a_bits`` (module docstring; contract of
  :func:`s2d_jax.ptq.quantize`).

  Args:
    apply_fn, variables: the model (``variables['params']``).
    calib_images: ``(N, H, W, C)`` float images; the first ``num_calib``
      (default 32, None = all) are used, in order (deterministic).
    w_bits, a_bits: bit widths (2..8 as the official quantizers).
    output_fn: unused (ERQ's objectives are per layer); accepted for the contract.
    coe: the official ``--coe``: ``λ₁ = 0.1·coe`` (0.1 for 2-D inputs),
      ``λ₂ = 0.1·coe`` (``coe`` for the patch embedding).
    lambda_2d: Aqer's λ₁ for layers with a 2-D ``(B, D)`` input (the head on
      pooled features; official 0.1). With few calibration images this ridge
      regression is nearly unregularised (the head's ``d+1`` unknowns per
      class from ``B`` pooled vectors) and can overfit; ``0.1·coe`` treats
      the head like every other layer.
    dual_uniform: the extended paper's dual-uniform grid for post-LayerNorm
      layers (official code: on); False: one grid per channel everywhere.
    max_steps: rounding-refinement moves per block and channel (official 100).
    aqer, wqer: ablations (the paper's Table 5): ``aqer=False`` skips the ridge
      update of the float weights, ``wqer=False`` rounds the weights to nearest
      on the same grids instead of Wqer.
    batch_size: calibration images per forward pass of the moment streaming.
    percentiles: the activation quantile-search candidates (RepQ-ViT's).
    apply_kwargs: extra keyword arguments for ``apply_fn``.
  """
  del output_fn
  t_start = time.perf_counter()
  if not (2 <= w_bits <= 8 and 2 <= a_bits <= 8):
    raise ValueError(f"{METHOD}: bits W{w_bits}A{a_bits} not supported; the official "
                     "quantizers take 2..8 bits")
  if not coe > 0:
    raise ValueError(f"{METHOD}: coe must be > 0 (ridge coefficients), got {coe}")
  if not lambda_2d > 0:
    raise ValueError(f"{METHOD}: lambda_2d must be > 0, got {lambda_2d}")
  if max_steps < 0:
    raise ValueError(f"{METHOD}: max_steps must be >= 0, got {max_steps}")
  x = repq._check_images(calib_images)   # pylint: disable=protected-access
  if num_calib is not None:
    x = x[:num_calib]
  if "params" not in variables:
    raise KeyError(f"{METHOD}: variables need a 'params' collection")
  kw = dict(apply_kwargs or {})
  params = variables["params"]
  base = {k: v for k, v in variables.items() if k != ops.COLLECTION}

  groups, skipped = reparam.find_groups(apply_fn, base, x[:1], **kw)
  if not groups:
    warnings.warn(f"{METHOD}: no LayerNorm -> Dense pair can be reparameterised in "
                  "this model; scale reparameterisation skipped (all inputs per "
                  "tensor, single weight grids).", stacklevel=2)
  for s in skipped:
    warnings.warn(f"{METHOD}: not reparameterising {s['layernorm']} -> "
                  f"{s['consumers']}: {s['reason']}; those inputs are per tensor.",
                  stacklevel=2)
  per_channel = [(c.path, c.call) for g in groups for c in g.consumers]
  dual_paths = {c.path for g in groups for c in g.consumers} if dual_uniform else set()
  provider = ErqProvider(w_bits, a_bits, dual=dual_paths, per_channel=per_channel,
                         percentiles=percentiles)

  # 1. activation quantizers, forward order, weights float
  _, state = ops.calibrate(apply_fn, provider, base, x, **kw)
  jax.block_until_ready(state)
  t_calib = time.perf_counter()
  # 2. scale reparameterisation
  params, state = repq.reparameterize(params, state, groups)
  provider.reparameterised = set(provider.per_channel)
  jax.block_until_ready(params)
  t_reparam = time.perf_counter()
  # 3. float pass: streamed moments of every unit's (quantized, float) input
  layers = er.discover_layers(apply_fn, base, x[:1], **kw)
  unit_list = units(layers, dual_paths)
  stream = er.MomentStream(apply_fn, {u.path for u in unit_list},
                           act_provider=provider, with_float=True, **kw)
  moments = stream({**base, "params": params, ops.COLLECTION: state}, x, batch_size)
  jax.block_until_ready(moments)
  t_moments = time.perf_counter()
  # 4-6. Aqer, weight grids, Wqer: unit by unit (scan: layer by layer)
  report = []
  for unit in unit_list:
    mom = moments[unit.path]
    nbytes = (mom.aa.nbytes + (0 if mom.af is None else mom.af.nbytes)) // unit.depth
    for index in (range(unit.depth) if unit.layers[0].view.batch_ndim else [None]):
      t0 = time.perf_counter()
      params, entry = _process_unit(params, unit, mom, index, w_bits, coe,
                                    max_steps, aqer, wqer, lambda_2d)
      jax.block_until_ready(params)
      entry.update(seconds=time.perf_counter() - t0, moments_bytes=int(nbytes),
                   tokens=int(mom.count if index is None else mom.count[index]))
      report.append(entry)
  t_done = time.perf_counter()
  qvariables = {**base, "params": params, ops.COLLECTION: state}
  qapply_inner = ops.intercepted(apply_fn, provider, mode="apply")

  def qapply(qvars, *args, **kwargs):
    return qapply_inner(qvars, *args, **kwargs)

  qapply.provider = provider
  qapply.info = dict(
      method=METHOD, name=f"{METHOD}/W{w_bits}A{a_bits}", w_bits=w_bits,
      a_bits=a_bits, calib_images=int(x.shape[0]),
      options=dict(num_calib=num_calib, coe=coe, lambda_2d=lambda_2d,
                   dual_uniform=dual_uniform,
                   max_steps=max_steps, aqer=aqer, wqer=wqer,
                   batch_size=batch_size,
                   percentiles=list(percentiles)),
      reparameterised=[g.to_json() for g in groups], skipped=skipped,
      plan=ops.plan(apply_fn, provider, qvariables, x[:1], **kw),
      act_ranges=repq._scales_report(state),   # pylint: disable=protected-access
      units=report,   # per unit (and layer): choices, λs, seconds, moment bytes
      moments_bytes=int(sum(m.aa.nbytes + (0 if m.af is None else m.af.nbytes)
                            for m in moments.values())),
      timing_s=dict(act_calibration=t_calib - t_start,
                    reparameterize=t_reparam - t_calib,
                    moments=t_moments - t_reparam,
                    error_reduction=t_done - t_moments,
                    total=time.perf_counter() - t_start))
  return qapply, qvariables
