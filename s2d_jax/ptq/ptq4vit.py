"""PTQ4ViT (Yuan et al., ECCV 2022, arXiv 2111.12293) as ``"PTQ4ViT/W<w>A<a>"``.

A port of the official code (hahnyuan/PTQ4ViT: ``configs/PTQ4ViT.py``,
``utils/net_wrap.py``, ``utils/quant_calib.py`` ``HessianQuantCalibrator``,
``quant_layers/*.py``, the flow of ``example/test_vit.py``) onto big_vision ViT /
SigLIP image towers, reached from outside through ``flax.linen.intercept_methods``.
The quantizers and searches themselves are in :mod:`s2d_jax.ptq.twin_uniform`.

What is quantized (``w`` = W bits, ``a`` = A bits; ``m = 2^(bits-1)``):

================  ==========================  ======  ============================
official module   here                        weight  input(s)
================  ==========================  ======  ============================
qconv             every ``nn.Conv`` (patch    w, per  float (``a_bit=32``)
                  embedding)                  cout
qlinear_qkv       ``query``/``key``/``value``  w, per  a, uniform, one per-tensor
(n_V = 3)         of an attention called on   tensor  interval shared by the three
                  one input                   each
qlinear_proj      attention ``out``           w       a, uniform, per tensor
qlinear_MLP_1     ``MlpBlock_*/Dense_0``      w       a, uniform, per tensor
qlinear_MLP_2     ``MlpBlock_*/Dense_1``      w       a, post-GELU twin uniform
qlinear_classif.  ``head`` (and every other   w       a, uniform, per tensor
                  Dense, e.g. ``pre_logits``)
qmatmul_qk        q·kᵀ                        --      q and k: a, uniform, per head
qmatmul_scorev    probs·v                     --      probs: a, post-softmax twin
                                                      uniform (one split per layer);
                                                      v: a, uniform, per head
================  ==========================  ======  ============================

LayerNorm, softmax, GELU, residual adds, pooling, biases and position embeddings
stay float. Weights use the signed grid ``clip(round(w/Δ), -m, m-1)``; every
interval starts at ``max|·| / (m - 1/2)`` and is chosen by the Hessian-guided
search among ``(0.01 + 0.0119 i)·Δ₀``, ``i = 0..100`` (``eq_alpha=0.01``,
``eq_beta=1.2``, ``eq_n=100``, ``search_round=3``; the softmax split among
``2^-i``, ``i < 20``). Which Dense gets the post-GELU quantizer is a rule on module
paths (``post_gelu=``, default big_vision's ``MlpBlock_<i>/Dense_1``).

Calibration, as ``HessianQuantCalibrator(..., sequential=False).batching_quant_calib()``
(the official default): every layer is calibrated on the *float* network (earlier
layers are not quantized while a later one is calibrated), from

* ``X``: its float input(s) over all calibration images (official: 32),
* ``O``: its float output, and
* ``g = ∂L/∂O``: the gradient of the loss w.r.t. that output, from a backward pass
  in micro-batches of ``batch_size`` images (official: 4),

then its intervals are searched with ``err = Σ (g ⊙ (O - Ô))²`` (see
:mod:`~s2d_jax.ptq.twin_uniform`). Because calibration never sees quantized
neighbours, layers are independent: the layers' ``X`` and ``g`` are recorded in a
few forward+backward passes over the calibration set (as many as needed to keep
the recorded tensors under ``capture_gib``) instead of one pass per layer, and each
search evaluates as many candidates at once as ``search_gib`` holds. Cost: about
``2 · 101 · rounds`` (≤ 606) evaluations of every layer, i.e. several hundred float
passes over the calibration set (measured below 1.5·10³ on CPU, README).

Recording uses this module's own small interceptor (:class:`_Recorder`) on the
shared helpers of :mod:`s2d_jax.intercept` (the attention goes through
``intercept.wrap_attention``, the hook ``ops`` uses): ``ops`` points give layer
inputs and q, k, v, probs, but not the gradients w.r.t. the probabilities and the
``out`` layer's input, nor which of q/k/v share one input. ``∂L/∂S`` of the logits
follows from ``∂L/∂P`` through the softmax, ``∂L/∂(probs·v)`` is the gradient at
the ``out`` layer's input. The float outputs ``O`` are recomputed in float32 from
the recorded inputs inside the searches (the official code's fp32; on GPUs whose
default f32 matmul is TF32, the model's own outputs would not match the candidates'
arithmetic). The calibrated model runs on ``ops`` (a provider that quantizes layer
inputs, q, k, v and probs; weights baked once with ``ops.bake_weights``); its state
is ``ops``' ``ptq.<kind>`` layout in ``'intermediates'`` (stacked per layer under
``nn.scan``).

Deviations from the official code (all deliberate):

* **The loss whose gradient weighs the metric.** The official loss is
  ``KL(softmax(f(x)) ‖ softmax(f̂(x)))`` with ``f̂`` the network *as calibrated so
  far*; with ``sequential=False`` that network is the float one, so the loss and its
  gradient vanish identically (hahnyuan/PTQ4ViT#23) and the GPU's rounding noise
  (full-batch vs 4-image forward passes) is what weighs the metric. Here ``g`` is
  the gradient of ``Σ_n CE(f(x_n), y_n)`` with one label per image drawn from the
  float prediction, ``y_n ~ softmax(f(x_n))`` (fixed ``seed``, per-image keys):
  ``E_y[g²] = diag(Jᵀ (diag(p) - p pᵀ) J)``, the Gauss-Newton Hessian of the
  official KL loss at the float point mapped to the layer's output -- the curvature
  the paper's Hessian-guided metric stands for, estimated with one draw per image
  (:func:`sampled_label_loss`). ``output_fn`` gives the logits.
* **Recording in groups of layers** instead of one forward+backward per layer:
  identical data, since every layer is calibrated on the float network.
* **Rounds stop at a fixed point** (a round that changed nothing): identical result.
* **q·kᵀ**: q and k are quantized before flax's ``1/√d`` as the official code does
  before its ``* scale``; the error is measured on the scaled logits (same argmin).
* **SigLIP's MAP head** (not in the official ViT/DeiT/Swin code) is treated like a
  block: its probe attention's ``query`` (input: the learned probe) is a linear of
  its own and ``key``/``value`` (both on the encoder output) share one input
  interval (``n_V = 2``), then ``out``, the two attention matmuls and its MLP
  (fc2 post-GELU) as in a block.
* **Layers called several times** (big_vision's ``head`` and ``pre_logits`` on the
  token map and on the pooled features) keep one set of intervals, calibrated on the
  calls whose output reaches the loss (``∂L/∂O ≢ 0``; official: the head sees the
  class token only). A layer whose gradient vanishes on every call (its output
  never reaches ``output_fn``) is searched with ``g = 1`` (plain L2) rather than
  letting all-equal errors pick the smallest candidate; ``info`` says so.
* An all-zero group starts from ``Δ₀ = 1/(m - 1/2)`` instead of 0 (no NaN).
* No bias correction: the official ``*Batching*`` layers never apply it either
  (``bias_correction: True`` in the config reaches only the unused non-batching
  path).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
from flax.linen import dtypes as nn_dtypes
import jax
import jax.numpy as jnp
import numpy as np

from s2d_jax import intercept
from s2d_jax.ptq import ops
from s2d_jax.ptq import twin_uniform as tu

COLLECTION = intercept.COLLECTION
PREFIX = "ptq4vit_"
POST_GELU = r"(^|/)MlpBlock_\d+/Dense_1$"

# Recorded names (each with the call index, e.g. "x0"): a layer's input rows "x" and
# the zero probe "g" on its output; an attention's q, k, v and probabilities "p",
# with the probe "dp" on the probabilities (∂L/∂S follows from ∂L/∂P) and the probe
# "dy" on the input of its "out" layer (= the probs·v output).


def _default_output_fn(out):
  return out[0] if isinstance(out, (tuple, list)) else out


@dataclasses.dataclass
class _Unit:
  """One official wrapped module: a quantized op and its search."""
  name: str                      # report name
  kind: str                      # 'linear' | 'conv' | 'qk' | 'pv'
  paths: tuple[str, ...]         # member module paths (qk/pv: the attention's path)
  act: str | None = None         # linear input quantizer: 'uniform' | 'post_gelu' | None
  order: int = 0                 # forward order of the first call


class _Plan:
  """Trace-time facts about the model's layers (filled by the 'plan' interceptor)."""

  def __init__(self):
    self.layers: dict[str, dict[str, Any]] = {}
    self.attention: dict[str, dict[str, Any]] = {}
    self._order = 0

  def _next(self):
    self._order += 1
    return self._order

  def add_layer(self, path, **info):
    if path not in self.layers:
      self.layers[path] = dict(info, order=self._next())

  def add_attention(self, path, **info):
    if path not in self.attention:
      self.attention[path] = dict(info, order=self._next())


def _attention_sources(args, kwargs):
  """The (q, k, v) inputs of an ``nn.MultiHeadDotProductAttention`` call (flax rules)."""
  inputs_q = args[0] if args else kwargs.get("inputs_q")
  inputs_k = args[1] if len(args) > 1 else kwargs.get("inputs_k")
  inputs_v = args[2] if len(args) > 2 else kwargs.get("inputs_v")
  inputs_kv = kwargs.get("inputs_kv")
  if inputs_kv is not None:
    return inputs_q, inputs_kv, inputs_kv
  if inputs_k is None:
    inputs_k = inputs_q
  if inputs_v is None:
    inputs_v = inputs_k
  return inputs_q, inputs_k, inputs_v


class _Recorder:
  """Calibration interceptor: records what the searches need, on the float network.

  For every target layer its input rows (``x``, first member of a unit only) and a
  zero probe ``g`` on its output; for every target attention (through
  :func:`intercept.wrap_attention`) q, k, v, the probabilities ``p``, a zero probe
  ``dp`` on ``p`` (q·kᵀ) and ``dy`` on the input of its ``out`` layer (probs·v).
  Differentiating the loss w.r.t. the probes gives ``∂L/∂O``, ``∂L/∂P``,
  ``∂L/∂(probs·v)``. :mod:`s2d_jax.ptq.ops` records layer inputs/outputs and q, k,
  v, probs too, but not those input/probability gradients nor which of q/k/v share
  one input, hence this small interceptor. Two modes:

  * ``'plan'``: records what the model calls (into ``plan``) and every value and
    probe of every layer (run under ``jax.eval_shape``: shapes only);
  * ``'record'``: the same for ``targets`` only, probes read from the variables.
  """

  def __init__(self, mode: str, *, plan: _Plan | None = None,
               targets: frozenset = frozenset(),
               first_members: frozenset = frozenset()):
    self.mode, self.plan, self.targets = mode, plan, targets
    self.first_members = first_members
    self.counter = intercept.CallCounter()

  def __call__(self, next_fun, args, kwargs, context):
    mod = context.module
    if not intercept.is_call(context) or intercept.is_wrapped(mod):
      return next_fun(*args, **kwargs)
    if intercept.is_attention(mod):
      return self._attention(mod, next_fun, args, kwargs)
    if intercept.is_matmul(mod) and args:
      return self._matmul(mod, next_fun, args, kwargs)
    return next_fun(*args, **kwargs)

  def _probe(self, mod, name, value):
    """``value`` plus the zero probe ``name`` (created as zeros in 'plan' mode)."""
    if self.mode == "plan":
      mod.put_variable(COLLECTION, PREFIX + name, jnp.zeros_like(value))
      return value
    return value + mod.get_variable(COLLECTION, PREFIX + name).astype(value.dtype)

  def _attention(self, mod, next_fun, args, kwargs):
    path = intercept.module_path(mod)
    i = self.counter.index(mod, path)
    if self.mode == "plan":
      q_src, k_src, v_src = _attention_sources(args, kwargs)
      self.plan.add_attention(path, shared_qk=k_src is q_src,
                              shared_kv=v_src is k_src, q_ndim=q_src.ndim + 1)
      qk = pv = True
    else:
      qk, pv = (path, "qk") in self.targets, (path, "pv") in self.targets
      if not (qk or pv):
        return next_fun(*args, **kwargs)
    cell = {}

    def hook(kind, x):
      m = cell["clone"]
      if (kind in ("q", "k") and qk) or (kind == "v" and pv):
        m.put_variable(COLLECTION, f"{PREFIX}{kind}{i}", x)
      elif kind == "probs":
        m.put_variable(COLLECTION, f"{PREFIX}p{i}", x)
        if qk:
          x = self._probe(m, f"dp{i}", x)
      return x

    cell["clone"] = intercept.wrap_attention(mod, hook)
    return cell["clone"](*args, **kwargs)

  def _matmul(self, mod, next_fun, args, kwargs):
    path = intercept.module_path(mod)
    i = self.counter.index(mod, path)
    parent = mod.parent
    attention_out = intercept.is_attention(parent) and mod.name == "out"
    plan = self.mode == "plan"
    if plan:
      in_attention = intercept.is_attention(parent) and mod.name in (
          "query", "key", "value", "out")
      features = getattr(mod, "features", 1)
      self.plan.add_layer(
          path, kind="conv" if isinstance(mod, nn.Conv) else "linear",
          parent=intercept.module_path(parent) if in_attention else None,
          role=mod.name if in_attention else None,
          kernel_ndim=mod.get_variable("params", "kernel").ndim,
          n_out_axes=(len(features) if isinstance(mod, nn.DenseGeneral)
                      and isinstance(features, (tuple, list)) else 1))
    layer = plan or path in self.targets
    dy = attention_out and (plan or (intercept.module_path(parent), "pv")
                            in self.targets)
    if not (layer or dy):
      return next_fun(*args, **kwargs)
    if dy:
      args = (self._probe(mod, f"dy{i}", args[0]),) + tuple(args[1:])
    if plan or path in self.first_members:
      mod.put_variable(COLLECTION, f"{PREFIX}x{i}", intercept.matmul_rows(mod, args[0]))
    y = next_fun(*args, **kwargs)
    return self._probe(mod, f"g{i}", y) if layer else y


# ------------------------------------------------------------------------------
# Units (the official wrapped modules) from the plan
# ------------------------------------------------------------------------------


def _units(plan: _Plan, post_gelu: str) -> list[_Unit]:
  rule = re.compile(post_gelu)
  units, grouped = [], set()
  for path, info in plan.attention.items():
    roles = {r: f"{path}/{r}" for r in ("query", "key", "value", "out")}
    present = {r: p for r, p in roles.items() if p in plan.layers}
    if {"query", "key", "value"} <= present.keys():
      if info["shared_qk"] and info["shared_kv"]:
        groups = [("qkv", ("query", "key", "value"))]
      elif info["shared_kv"]:
        groups = [("query", ("query",)), ("kv", ("key", "value"))]
      elif info["shared_qk"]:
        groups = [("qk_proj", ("query", "key")), ("value", ("value",))]
      else:
        groups = [(r, (r,)) for r in ("query", "key", "value")]
      for name, members in groups:
        ps = tuple(roles[r] for r in members)
        units.append(_Unit(f"{path}/{name}", "linear", ps, "uniform",
                           plan.layers[ps[0]]["order"]))
        grouped.update(ps)
    units.append(_Unit(f"{path}/matmul_qk", "qk", (path,), None, info["order"] + 0.1))
    units.append(_Unit(f"{path}/matmul_pv", "pv", (path,), None, info["order"] + 0.2))
  for path, info in plan.layers.items():
    if path in grouped:
      continue
    if info["kind"] == "conv":
      units.append(_Unit(path, "conv", (path,), None, info["order"]))
    else:
      act = "post_gelu" if rule.search(path) else "uniform"
      units.append(_Unit(path, "linear", (path,), act, info["order"]))
  units.sort(key=lambda u: u.order)
  return units


# ------------------------------------------------------------------------------
# Recording passes
# ------------------------------------------------------------------------------


def _shapes_by_path(tree) -> dict[str, dict[str, Any]]:
  """``{module path: {variable name without prefix: ShapeDtypeStruct}}``."""
  out: dict[str, dict[str, Any]] = {}
  for key, value in intercept.flatten(tree).items():
    name = key[-1]
    if isinstance(name, str) and name.startswith(PREFIX):
      out.setdefault("/".join(key[:-1]), {})[name[len(PREFIX):]] = value
  return out


def _split_name(name: str) -> tuple[str, int]:
  m = re.fullmatch(r"([a-z]+)(\d+)", name)
  return m.group(1), int(m.group(2))


def _calls_of(shapes, path: str, point: str) -> list[int]:
  return sorted(i for p, i in map(_split_name, shapes.get(path, {})) if p == point)


def _unit_records(unit: _Unit, shapes) -> list[tuple[str, str]]:
  """(module path, variable name) of the values a unit's search reads."""
  p = unit.paths[0]
  points = {"linear": ("x",), "conv": ("x",), "qk": ("q", "k", "p"),
            "pv": ("p", "v")}[unit.kind]
  return [(p, f"{pt}{i}") for pt in points for i in _calls_of(shapes, p, pt)]


def _unit_probes(unit: _Unit, shapes) -> list[tuple[str, str]]:
  """(module path, variable name) of the zero probes a unit needs."""
  if unit.kind in ("linear", "conv"):
    return [(p, f"g{i}") for p in unit.paths for i in _calls_of(shapes, p, "g")]
  if unit.kind == "qk":
    p = unit.paths[0]
    return [(p, f"dp{i}") for i in _calls_of(shapes, p, "dp")]
  out = unit.paths[0] + "/out"
  return [(out, f"dy{i}") for i in _calls_of(shapes, out, "dy")]


def _nbytes(s) -> int:
  return math.prod(s.shape) * 4   # recorded and searched in float32


def _passes(units, shapes, n_micro: int, budget: float) -> list[list[_Unit]]:
  """Units packed, in forward order, into recording passes under ``budget`` bytes."""
  passes, cur, used = [], [], 0.0
  for u in units:
    size = n_micro * sum(_nbytes(shapes[p][n])
                         for p, n in _unit_records(u, shapes) + _unit_probes(u, shapes))
    if cur and used + size > budget:
      passes.append(cur)
      cur, used = [], 0.0
    cur.append(u)
    used += size
  if cur:
    passes.append(cur)
  return passes


def sampled_label_loss(logits: jax.Array, image_index: jax.Array,
                       key: jax.Array) -> jax.Array:
  """``Σ_n CE(z_n, y_n)`` with ``y_n ~ softmax(z_n)`` drawn with ``fold_in(key, n)``.

  ``z`` are the float model's logits ``(B, ..., C)`` (labels are drawn from them
  with gradients stopped) and ``n`` the images' indices in the calibration set, so
  the draw does not depend on the micro-batching. ``E_y[(∂CE/∂O)²]`` is the
  diagonal of ``Jᵀ F J`` with ``F = diag(p) - p pᵀ`` the Hessian of the official
  ``KL(p ‖ p̂)`` at ``p̂ = p``: squared gradients of this loss estimate, one label
  per image, the curvature the official metric stands for.
  """
  logits = logits.astype(jnp.float32)
  keys = jax.vmap(lambda n: jax.random.fold_in(key, n))(image_index)
  labels = jax.vmap(jax.random.categorical)(keys, jax.lax.stop_gradient(logits))
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.take_along_axis(logp, labels[..., None], axis=-1))


def _record_fn(apply_fn, output_fn, targets, first_members):
  """Jitted ``(variables, probes, images, index, key) -> (records, ∂L/∂probes)``.

  Cached per (apply_fn, output_fn, targets): calibrating the same model again
  (other bits, seed or images of the same shape) compiles nothing new.
  """
  try:
    return _record_fn_cached(apply_fn, output_fn, targets, first_members)
  except TypeError:        # unhashable apply_fn / output_fn
    return _make_record_fn(apply_fn, output_fn, targets, first_members)


def _make_record_fn(apply_fn, output_fn, targets, first_members):
  def loss(probes, variables, images, index, key):
    hooks = _Recorder("record", targets=targets, first_members=first_members)
    with nn.intercept_methods(hooks):
      out, state = apply_fn({**variables, COLLECTION: probes}, images,
                            mutable=[COLLECTION])
    return sampled_label_loss(output_fn(out), index, key), state.get(COLLECTION, {})

  def step(variables, probes, images, index, key):
    grads, state = jax.grad(loss, has_aux=True)(probes, variables, images, index, key)
    return state, grads

  return jax.jit(step)


_record_fn_cached = functools.lru_cache(maxsize=16)(_make_record_fn)


def _get(tree, path: str, name: str):
  node = intercept.subtree(tree, path)
  return None if node is None else node.get(PREFIX + name)


# ------------------------------------------------------------------------------
# Per-unit search
# ------------------------------------------------------------------------------


def _rows(chunks, layer, feat: int):
  """Micro-batch chunks of one recorded value -> ``(rows, feat)`` for one layer."""
  parts = [c if layer is None else c[layer] for c in chunks]
  return jnp.concatenate([p.reshape(-1, feat) for p in parts], axis=0)


def _batch(chunks, layer):
  parts = [c if layer is None else c[layer] for c in chunks]
  return jnp.concatenate(parts, axis=0)


def _stack(results: list[dict], stacked: bool) -> dict:
  if not stacked:
    return dict(results[0])
  return {k: jnp.stack([r[k] for r in results]) for k in results[0]}


class _Calibrator:
  """Recording passes, searches, and the quantized params / state they give."""

  def __init__(self, apply_fn, variables, images, w_bits, a_bits, *, output_fn,
               batch_size, cfg, post_gelu, capture_gib, seed, label_samples,
               search_gib=1.0):
    self.apply_fn, self.output_fn, self.cfg = apply_fn, output_fn, cfg
    self.search_bytes = search_gib * 2 ** 30
    self.key, self.label_samples = jax.random.key(seed), label_samples
    self.variables = {k: v for k, v in variables.items() if k != COLLECTION}
    self.params = variables["params"]
    self.w_bits, self.a_bits = w_bits, a_bits
    self.post_gelu, self.budget = post_gelu, capture_gib * 2 ** 30
    bs = min(batch_size, images.shape[0])
    self.micro = [images[i:i + bs] for i in range(0, images.shape[0], bs)]

  # -- plan --------------------------------------------------------------------

  def plan(self) -> list[_Unit]:
    plan = _Plan()

    def f(variables, images):
      with nn.intercept_methods(_Recorder("plan", plan=plan)):
        _, state = self.apply_fn(variables, images, mutable=[COLLECTION])
      return state.get(COLLECTION, {})

    self.shapes = {}
    for m in self.micro:
      if m.shape[0] not in self.shapes:
        self.shapes[m.shape[0]] = _shapes_by_path(jax.eval_shape(f, self.variables, m))
    self.layers, self.attention = plan.layers, plan.attention
    self.units = _units(plan, self.post_gelu)
    if not self.units:
      raise ValueError("PTQ4ViT: the model calls no nn.Dense / nn.DenseGeneral / "
                       "nn.Conv / nn.MultiHeadDotProductAttention; nothing to "
                       "quantize.")
    return self.units

  def passes(self) -> list[list[_Unit]]:
    shapes = self.shapes[self.micro[0].shape[0]]
    return _passes(self.units, shapes, len(self.micro), self.budget)

  # -- recording ---------------------------------------------------------------

  def record(self, units) -> dict[tuple[str, str], list]:
    """One pass over the calibration set: ``{(path, name): [chunk per micro-batch]}``.

    Values: the units' recorded inputs (:func:`_unit_records`); gradients
    ``(path, 'g<i>')`` for layers, ``(attention, 'ds<i>')`` (∂L/∂logits, from
    ∂L/∂P) for q·kᵀ and ``(attention, 'dy<i>')`` for probs·v, each the root mean
    square over ``label_samples`` draws (the metric only uses ``g²``).
    """
    targets, first = set(), set()
    for u in units:
      if u.kind in ("linear", "conv"):
        targets.update(u.paths)
        first.add(u.paths[0])
      else:
        targets.add((u.paths[0], u.kind))
    fn = _record_fn(self.apply_fn, self.output_fn, frozenset(targets),
                    frozenset(first))
    values: dict[tuple[str, str], list] = {}
    start = 0
    for m in self.micro:
      index = jnp.arange(start, start + m.shape[0])
      start += m.shape[0]
      shapes = self.shapes[m.shape[0]]
      probe_keys = [k for u in units for k in _unit_probes(u, shapes)]
      probes = intercept.nest({
          tuple(p.split("/")) + (PREFIX + n,): jnp.zeros(shapes[p][n].shape,
                                                          shapes[p][n].dtype)
          for p, n in probe_keys})
      sq: dict[tuple[str, str], jax.Array] = {}
      for k in range(self.label_samples):
        state, grads = fn(self.variables, probes, m, index,
                          jax.random.fold_in(self.key, k))
        for p, n in probe_keys:
          point, i = _split_name(n)
          g = _get(grads, p, n).astype(jnp.float32)
          if point == "dp":       # ∂L/∂P -> ∂L/∂S through the softmax
            g = tu.softmax_grad(_get(state, p, f"p{i}").astype(jnp.float32), g)
            key = (p, f"ds{i}")
          elif point == "dy":     # the out layer's input -> its attention
            key = (p.rsplit("/", 1)[0], n)
          else:
            key = (p, n)
          sq[key] = sq[key] + jnp.square(g) if key in sq else jnp.square(g)
      for key, v in sq.items():
        values.setdefault(key, []).append(jnp.sqrt(v / self.label_samples))
      for p, n in dict.fromkeys(k for u in units for k in _unit_records(u, shapes)):
        values.setdefault((p, n), []).append(_get(state, p, n))
    return values

  # -- searches ----------------------------------------------------------------

  @staticmethod
  def _calls(unit, values, grad_point) -> tuple[list[int], bool]:
    """The calls to calibrate on (``∂L/∂O ≢ 0``), and whether none had a gradient."""
    by_call: dict[int, list] = {}
    for (p, n), chunks in values.items():
      point, i = _split_name(n)
      if p in unit.paths and point == grad_point:
        by_call.setdefault(i, []).extend(chunks)
    used = [i for i, cs in by_call.items() if any(bool(jnp.any(c != 0)) for c in cs)]
    return (sorted(used), False) if used else (sorted(by_call), True)

  def _cfg(self, out_size: int) -> tu.SearchConfig:
    """The search config with as many candidates per step as ``search_gib`` holds
    (about three float32 copies of the output per candidate)."""
    if self.cfg.candidate_batch is not None:
      return self.cfg
    batch = int(max(1, min(self.cfg.eq_n + 1, self.search_bytes // (12 * out_size))))
    return dataclasses.replace(self.cfg, candidate_batch=batch)

  def _stacked(self, path) -> bool:
    kernel = intercept.subtree(self.params, path)["kernel"]
    return kernel.ndim == self.layers[path]["kernel_ndim"] + 1

  def search_linear(self, unit: _Unit, values) -> dict:
    calls, grad_free = self._calls(unit, values, "g")
    stacked = self._stacked(unit.paths[0])
    nodes = [intercept.subtree(self.params, p) for p in unit.paths]
    n_layers = nodes[0]["kernel"].shape[0] if stacked else 1
    conv = unit.kind == "conv"
    results = []
    for layer in (range(n_layers) if stacked else [None]):
      ws, bs, gs = [], [], []
      for p, node in zip(unit.paths, nodes):
        kernel = node["kernel"] if layer is None else node["kernel"][layer]
        n_out = math.prod(kernel.shape[kernel.ndim - self.layers[p]["n_out_axes"]:])
        ws.append(jnp.asarray(kernel, jnp.float32).reshape(-1, n_out))
        bias = node.get("bias")
        bs.append(jnp.zeros((n_out,), jnp.float32) if bias is None else
                  jnp.asarray(bias if layer is None else bias[layer],
                              jnp.float32).reshape(-1))
        gs.append(jnp.concatenate([_rows(values[(p, f"g{i}")], layer, n_out)
                                   for i in calls]))
      if len({w.shape[1] for w in ws}) != 1:
        raise ValueError(f"PTQ4ViT: members of {unit.name} have different output "
                         f"sizes {[w.shape[1] for w in ws]}; they cannot share one "
                         "input quantizer with equal n_V groups")
      x = jnp.concatenate([_rows(values[(unit.paths[0], f"x{i}")], layer,
                                 ws[0].shape[0]) for i in calls])
      w, b = jnp.concatenate(ws, axis=1), jnp.concatenate(bs)
      g = jnp.concatenate(gs, axis=1)
      if grad_free:
        g = jnp.ones_like(g)
      results.append(tu.search_linear(
          x, w, b, None, g, w_bits=self.w_bits, a_bits=None if conv else self.a_bits,
          n_groups=w.shape[1] if conv else len(unit.paths),
          act=None if conv else unit.act, cfg=self._cfg(g.size)))
    out = _stack(results, stacked)
    out.update(calls=calls, grad_free=grad_free)
    return out

  def search_attention(self, unit: _Unit, values) -> dict:
    path = unit.paths[0]
    a, b = ("q", "k") if unit.kind == "qk" else ("p", "v")
    grad_point = "ds" if unit.kind == "qk" else "dy"
    calls, grad_free = self._calls(unit, values, grad_point)
    first = values[(path, f"q{calls[0]}" if unit.kind == "qk" else f"v{calls[0]}")][0]
    stacked = first.ndim == self.attention[path]["q_ndim"] + 1
    n_layers = first.shape[0] if stacked else 1
    search = tu.search_qk if unit.kind == "qk" else tu.search_pv
    results = []
    for layer in (range(n_layers) if stacked else [None]):
      xa, xb, g = (jnp.concatenate([_batch(values[(path, f"{pt}{i}")], layer)
                                    for i in calls])
                   for pt in (a, b, grad_point))
      if grad_free:
        g = jnp.ones_like(g)
      results.append(search(xa, xb, None, g, bits=self.a_bits,
                            cfg=self._cfg(max(g.size, xa.size))))
    out = _stack(results, stacked)
    out.update(calls=calls, grad_free=grad_free)
    return out

  # -- results -----------------------------------------------------------------

  def _n_calls(self, path: str, point: str) -> int:
    names = self.shapes[self.micro[0].shape[0]][path]
    return sum(1 for n in names if _split_name(n)[0] == point)

  def state(self, results: dict[str, dict]) -> dict[str, Any]:
    """The calibrated intervals as :mod:`~s2d_jax.ptq.ops` state (``ptq.<kind>``).

    ``ptq.weight``: ``{'interval'}`` shaped to broadcast against the (stacked)
    kernel; ``ptq.matmul_input[@call]``: ``{'interval'}`` (every call of a layer
    gets the layer's interval); attention ``ptq.q|k|v``: ``{'interval'}`` per head
    ``(H, 1)``, ``ptq.probs``: ``{'split'}`` (stacked ``(depth, ...)`` under scan).
    """
    flat: dict[tuple[str, str], Any] = {}
    key = lambda kind, call: ops.PREFIX + (kind if call == 0 else f"{kind}@{call}")
    for unit in self.units:
      r = results[unit.name]
      if unit.kind in ("linear", "conv"):
        for j, p in enumerate(unit.paths):
          kernel = intercept.subtree(self.params, p)["kernel"]
          iv = r["w_interval"]
          if unit.kind == "linear":
            iv = iv[..., j]                                   # (L,) or ()
            iv = iv.reshape(iv.shape + (1,) * (kernel.ndim - iv.ndim))
          else:                                               # per cout (last axis)
            iv = iv.reshape(iv.shape[:-1] + (1,) * (kernel.ndim - iv.ndim)
                            + iv.shape[-1:])
          flat[p, key("weight", 0)] = {"interval": iv}
          if unit.act is not None:
            for c in range(self._n_calls(p, "g")):
              flat[p, key("matmul_input", c)] = {"interval": r["a_interval"]}
      else:
        p = unit.paths[0]
        per_head = lambda iv: iv[..., None]                   # (..., H, 1)
        if unit.kind == "qk":
          entries = {"q": {"interval": per_head(r["q_interval"])},
                     "k": {"interval": per_head(r["k_interval"])}}
        else:
          entries = {"probs": {"split": r["split"]},
                     "v": {"interval": per_head(r["v_interval"])}}
        for c in range(self._n_calls(p, "q" if unit.kind == "qk" else "p")):
          for kind, value in entries.items():
            flat[p, key(kind, c)] = value
    return ops.from_entries(flat)


class _Provider:
  """PTQ4ViT at :mod:`~s2d_jax.ptq.ops` points (apply mode: activations only).

  ``acts``: module path -> input quantizer (``'uniform'`` / ``'post_gelu'`` /
  None for float, e.g. the patch embedding); weights were quantized once into the
  params (:func:`ops.bake_weights`).
  """

  attention = True

  def __init__(self, acts: Mapping[str, str | None], w_bits: int, a_bits: int,
               calibration: str = ""):
    self.acts, self.w_bits, self.a_bits = dict(acts), w_bits, a_bits
    self.calibration = calibration

  def __call__(self, ctx: ops.Context, x: jax.Array) -> jax.Array:
    kind, path = ctx.point.kind, ctx.point.path
    if kind == "matmul_input":
      act = self.acts.get(path)
      if act is None:
        return x
      y = tu.quantize_input(x.astype(jnp.float32), ctx.get()["interval"],
                            self.a_bits, act)
    elif kind in ("q", "k", "v"):
      y = tu.uniform(x.astype(jnp.float32), ctx.get()["interval"], self.a_bits)
    elif kind == "probs":
      y = tu.post_softmax(x.astype(jnp.float32), ctx.get()["split"], self.a_bits)
    else:      # weights (already on their grid), layer outputs
      return x
    return y.astype(x.dtype)

  def describe(self, point: ops.Point) -> dict[str, Any] | None:
    """One entry of ``info['plan']`` (None: the point stays float)."""
    cal = dict(calibration=self.calibration)
    if point.kind == "weight":
      if point.path not in self.acts:
        return None
      conv = point.module_type == "Conv"
      return dict(bits=self.w_bits, quantizer="uniform",
                  granularity="channel" if conv else "tensor", **cal)
    if point.kind == "matmul_input":
      act = self.acts.get(point.path)
      if act is None:
        return None
      return dict(bits=self.a_bits,
                  quantizer="post-GELU twin uniform" if act == "post_gelu"
                  else "uniform", granularity="tensor", **cal)
    if point.kind in ("q", "k", "v"):
      return dict(bits=self.a_bits, quantizer="uniform", granularity="head", **cal)
    if point.kind == "probs":
      return dict(bits=self.a_bits, quantizer="post-softmax twin uniform",
                  granularity="tensor (one split)", **cal)
    return None


@functools.partial(jax.jit, static_argnums=2)
def _bake(params, state, w_bits: int):
  """Every kernel with ``ptq.weight`` state on its grid (:func:`ops.bake_weights`)."""
  return ops.bake_weights(params, state, lambda path, kernel, ws: tu.uniform(
      jnp.asarray(kernel, jnp.float32), ws["interval"], w_bits))


def _plain(x):
  """JSON-able: arrays -> (nested) lists of Python floats / ints."""
  if isinstance(x, (jax.Array, np.ndarray)):
    x = np.asarray(x)
    return x.item() if x.ndim == 0 else x.tolist()
  return x


def _op_entry(unit: _Unit, w_bits: int, a_bits: int) -> dict:
  """What a unit quantizes (one row of the ops table)."""
  if unit.kind in ("linear", "conv"):
    names = [p.rsplit("/", 1)[-1] for p in unit.paths]
    return dict(
        op=unit.name, kind=unit.kind, modules=list(unit.paths),
        w_bits=w_bits, w_quantizer="uniform",
        w_granularity=("per output channel" if unit.kind == "conv" else
                       "per tensor" if len(names) == 1 else
                       "per tensor of each of " + "/".join(names)),
        a_bits=None if unit.act is None else a_bits,
        a_quantizer=unit.act or "float",
        a_granularity=None if unit.act is None else
        ("per tensor" if len(names) == 1 else "per tensor, shared"))
  if unit.kind == "qk":
    return dict(op=unit.name, kind="qk", modules=list(unit.paths), w_bits=None,
                a_bits=a_bits, a_quantizer="uniform (q, k)", a_granularity="per head")
  return dict(op=unit.name, kind="pv", modules=list(unit.paths), w_bits=None,
              a_bits=a_bits, a_quantizer="post_softmax (probs), uniform (v)",
              a_granularity="probs: one split; v: per head")


def _unit_info(unit: _Unit, r: dict, w_bits: int, a_bits: int) -> dict:
  info = _op_entry(unit, w_bits, a_bits)
  info.update(calls=list(r["calls"]), grad_free=bool(r["grad_free"]),
              rounds=_plain(r["rounds"]))
  for k in ("w_interval", "a_interval", "q_interval", "k_interval", "split",
            "v_interval"):
    if k in r and not (k == "a_interval" and unit.act is None):
      info[k] = _plain(r[k])
  return info


def _check(variables, calib_images, w_bits, a_bits, post_gelu):
  """Validated ``(w_bits, a_bits, images)``; errors name the argument at fault."""
  w_bits = tu.check_bits(w_bits, "PTQ4ViT w_bits")
  a_bits = tu.check_bits(a_bits, "PTQ4ViT a_bits")
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError("PTQ4ViT: variables must be a mapping with a 'params' entry")
  images = jnp.asarray(calib_images)
  if images.ndim != 4 or images.shape[0] < 1 or not jnp.issubdtype(images.dtype,
                                                                   jnp.floating):
    raise ValueError("PTQ4ViT: calib_images must be float (N, H, W, C) with N >= 1, "
                     f"got shape {images.shape} dtype {images.dtype}")
  try:
    re.compile(post_gelu)
  except (re.error, TypeError) as e:
    raise ValueError(f"PTQ4ViT: post_gelu={post_gelu!r} is not a regex: {e}") from e
  return w_bits, a_bits, images


def _check_int(name, value, low):
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"PTQ4ViT: {name} must be an int >= {low}, got {value!r}")


def plan(apply_fn: Callable[..., Any], variables: Mapping[str, Any], images: Any,
         w_bits: int, a_bits: int, *, post_gelu: str = POST_GELU
         ) -> list[dict[str, Any]]:
  """The ops PTQ4ViT quantizes in this model, in forward order (traced, not run).

  One dict per official wrapped module: ``op``, ``kind`` (``'conv'``, ``'linear'``,
  ``'qk'``, ``'pv'``), ``modules`` (the flax module paths), weight and input bits,
  quantizers and granularities. ``images``: a batch of the model's input shape.
  """
  w_bits, a_bits, images = _check(variables, images, w_bits, a_bits, post_gelu)
  cal = _Calibrator(apply_fn, variables, images[:1], w_bits, a_bits,
                    output_fn=_default_output_fn, batch_size=1, cfg=tu.SearchConfig(),
                    post_gelu=post_gelu, capture_gib=1.0, seed=0, label_samples=1)
  return [_op_entry(u, w_bits, a_bits) for u in cal.plan()]


def quantize(apply_fn: Callable[..., Any], variables: Mapping[str, Any],
             calib_images: Any, w_bits: int, a_bits: int, *,
             output_fn: Callable[[Any], Any] | None = None, batch_size: int = 4,
             eq_alpha: float = 0.01, eq_beta: float = 1.2, eq_n: int = 100,
             search_round: int = 3, n_splits: int = 20,
             post_gelu: str = POST_GELU, capture_gib: float = 4.0,
             search_gib: float = 1.0, seed: int = 0, label_samples: int = 1
             ) -> tuple[Callable[..., Any], dict[str, Any]]:
  """Calibrates PTQ4ViT ``W<w_bits>A<a_bits>`` (contract: :func:`s2d_jax.ptq.quantize`).

  Args:
    apply_fn: ``apply_fn(variables, images, **kw) -> output`` (a linen ``apply``).
    variables: ``{'params': ...}`` (other collections are passed through).
    calib_images: float ``(N, H, W, C)`` (official: 32 ImageNet training images).
    w_bits, a_bits: weight / activation bits, ints in [2, 16].
    output_fn: model output -> logits for the loss (default ``out[0]`` of tuples).
    batch_size: images per forward+backward (official: 4); results do not
      depend on it beyond float rounding.
    eq_alpha, eq_beta, eq_n, search_round, n_splits: search hyper-parameters
      (defaults: the official ``configs/PTQ4ViT.py``).
    post_gelu: regex on module paths of the Dense layers whose input is post-GELU.
    capture_gib: device memory for recorded activations per pass (GiB).
    search_gib: device memory for evaluating candidates at once (GiB): each
      search evaluates as many candidates per step as fit (the official code
      sizes its ``parallel_eq_n`` the same way); results do not depend on it.
    seed: PRNG seed of the labels drawn for the metric's gradient.
    label_samples: labels drawn per image (the metric uses the mean of ``g²``
      over the draws; official: one backward pass per image).

  Returns:
    ``(qapply, qvariables)``: ``qvariables = {'params': weights on their grids,
    'intermediates': the calibrated intervals in the ops state layout}``;
    ``qapply(qvariables, images, **kw)`` runs the fake-quantized model;
    ``qapply.info`` is JSON-able: ``method``, ``name``, bits, ``calib_images``,
    ``options``, ``plan`` (every quantized ``ops`` point: path, kind, call,
    bits, quantizer, granularity), ``ops`` (the official wrapped modules,
    :func:`plan`), ``layers`` (per op: chosen and initial intervals, rounds, calls
    used), ``recording_passes`` and ``calibration_s``.
  """
  w_bits, a_bits, images = _check(variables, calib_images, w_bits, a_bits, post_gelu)
  _check_int("batch_size", batch_size, 1)
  _check_int("seed", seed, -2 ** 63)
  _check_int("label_samples", label_samples, 1)
  for name, value in (("capture_gib", capture_gib), ("search_gib", search_gib)):
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0):
      raise ValueError(f"PTQ4ViT: {name} must be a number > 0, got {value!r}")
  cfg = tu.SearchConfig(eq_alpha=eq_alpha, eq_beta=eq_beta, eq_n=eq_n,
                        search_round=search_round, n_splits=n_splits)
  output_fn = output_fn or _default_output_fn

  t0 = time.perf_counter()
  cal = _Calibrator(apply_fn, variables, images, w_bits, a_bits, output_fn=output_fn,
                    batch_size=batch_size, cfg=cfg, post_gelu=post_gelu,
                    capture_gib=capture_gib, seed=seed,
                    label_samples=label_samples, search_gib=search_gib)
  units = cal.plan()
  passes = cal.passes()
  results = {}
  for group in passes:
    values = cal.record(group)
    for unit in group:
      if unit.kind in ("linear", "conv"):
        results[unit.name] = cal.search_linear(unit, values)
      else:
        results[unit.name] = cal.search_attention(unit, values)
    del values
  state = cal.state(results)
  qparams = _bake(cal.params, state, w_bits)
  seconds = time.perf_counter() - t0

  qvariables = {**cal.variables, "params": qparams, COLLECTION: state}
  acts = {p: u.act for u in units if u.kind in ("linear", "conv") for p in u.paths}
  provider = _Provider(acts, w_bits, a_bits, calibration=(
      f"Hessian-guided search ({eq_n + 1} candidates {eq_alpha}..{eq_beta} x "
      f"min-max, {search_round} rounds; softmax split among 2^-i, i < {n_splits})"))
  qapply_inner = ops.intercepted(apply_fn, provider, mode="apply")

  def qapply(qvars, *args, **kwargs):
    return qapply_inner(qvars, *args, **kwargs)

  points = ops.plan(apply_fn, provider, qvariables, images[:1])
  qapply.provider = provider
  qapply.info = dict(
      method="PTQ4ViT", name=f"PTQ4ViT/W{w_bits}A{a_bits}", w_bits=w_bits,
      a_bits=a_bits, calib_images=int(images.shape[0]),
      options=dict(batch_size=batch_size, eq_alpha=eq_alpha, eq_beta=eq_beta,
                   eq_n=eq_n, search_round=search_round, n_splits=n_splits,
                   post_gelu=post_gelu, capture_gib=capture_gib,
                   search_gib=search_gib, seed=seed, label_samples=label_samples,
                   metric="hessian: sum (dL/dO * (O - O_hat))^2",
                   loss="cross-entropy vs labels drawn from the float softmax"),
      plan=points, ops=[_op_entry(u, w_bits, a_bits) for u in units],
      layers=[_unit_info(u, results[u.name], w_bits, a_bits) for u in units],
      recording_passes=len(passes), calibration_s=seconds)
  return qapply, qvariables
