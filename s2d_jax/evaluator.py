r"""The evaluator core: a predict_fn and batches in, accuracies and statistics out.

`evaluate_model(apply_fn, variables, batches, settings=..., output_fn=...)` runs
float, uniform fake-quant and PTQ settings on one to N hosts and returns the report
dict; it never loads a model or reads a config (`s2d_jax.evaluate` does: config →
`s2d_jax.eval_setup` → here → `s2d_jax.report`).

Every step is one `jit` over the global ('data', 'fsdp') mesh of `s2d_jax.parallel`
(the trainer's mesh): params stay where training put them (FSDP-sharded params are
never gathered on a host), each global batch (B, ...) is split over all devices of
all processes, and

    finite_b  = [every logit output_fn(out)_bc is finite]
    correct   = Σ_b mask_b · finite_b · [argmax_c output_fn(out)_bc = label_b],
    count     = Σ_b mask_b,
    nonfinite = Σ_b mask_b · (1 − finite_b)

are reduced inside the program, so padded examples (mask = 0: the padding of the
last partial batch, added by the data pipeline or here) count neither as right nor as
seen. An example whose logits hold a NaN / Inf is never right (argmax of NaN logits
would pick class 0 and give a plausible-looking accuracy): it is counted as wrong
and reported in `counts[setting]['nonfinite']` and in the table, so an all-NaN model
scores 0 % with every example flagged. The float step also records the per-layer
activation statistics of `s2d_jax.outliers` over the global batch (reduced by XLA
inside the program) and merges them across batches exactly on the host. Global
batch i holds the same examples whatever the number of processes
(`input_pipeline.get_eval_dataset` gives process p rows [p·b, (p+1)·b) of it), so
the report does not depend on the number of devices or processes (float sums up to
rounding).

Settings:
* `'float'`;
* uniform `s2d_jax.quant` settings (`W8A8`, `W4A4-static`, ...): static ones are
  calibrated on the first `calib_batches` global batches (padded rows replaced by
  real rows of the same batch; minmax ranges combine by min/max, percentile/MSE by
  the mean over batches); their weights are quantized once per setting
  (`quant_model.prequantize`, one extra copy of the params per uniform setting
  while evaluating), so each pass quantizes activations only;
* PTQ methods `METHOD/WxAy` (`s2d_jax.ptq.quantize`): calibrated once per setting on
  `calib_images` (the same images on every process), then `qapply(qvariables, x)`
  is evaluated like the other settings.

Accuracy is classification top-1 for classifiers (`output_fn(out) = out[0]`) and
zero-shot top-1 for SigLIP two-tower models with `zeroshot_fns` (only the image
tower runs, so only it is quantized; class embeddings come from the float text
tower). The report's fields are documented in `s2d_jax.report`.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from s2d_jax import config_schema
from s2d_jax import outliers
from s2d_jax import parallel
from s2d_jax import ptq
from s2d_jax import quant
from s2d_jax import quant_model
from s2d_jax import report as report_lib

MASK_KEY = "_mask"
FLOAT = report_lib.FLOAT


def log_progress(msg: str, enabled: bool = True):
  """Prints `msg` to stderr on process 0 (when `enabled`)."""
  if enabled and jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


def parse_settings(names) -> list:
  """`['float', 'W8A8', 'RepQ-ViT/W4A4']` → `[None, QuantSetting, PTQSetting]`.

  Raises a ValueError naming an unknown or repeated setting before any work starts.
  """
  return config_schema.validate_settings(names, where="settings")


def setting_name(s) -> str:
  """'float' for None, else the setting's name."""
  return FLOAT if s is None else s.name


def _pad_batch(batch: Mapping[str, np.ndarray], size: int) -> dict:
  """Pad a short batch to `size` rows with zeros and `mask = 0`."""
  batch = {k: np.asarray(v) for k, v in batch.items()}
  n = len(next(iter(batch.values())))
  if MASK_KEY not in batch:
    batch[MASK_KEY] = np.ones((n,), np.int32)
  if n == size:
    return batch
  if n > size:
    raise ValueError(f"batch of {n} examples is larger than the first batch "
                     f"({size}); batches must have a fixed size")
  return {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}


def _fill_padding(images, mask):
  """Padded rows replaced by real rows (cyclically, in order): for calibration only."""
  real = mask > 0
  order = jnp.argsort(~real, stable=True)              # real rows first
  nreal = jnp.maximum(jnp.sum(real), 1)
  rank = jnp.cumsum(~real) - 1                          # rank among the padded rows
  src = jnp.where(real, jnp.arange(mask.shape[0]), order[rank % nreal])
  return images[src]


def params_identity(params) -> dict[str, Any]:
  """SHA-256 over the leaves' paths, shapes, dtypes and bytes; param count.

  Leaves are brought to the host one at a time (a sharded model is never gathered
  whole).
  """
  h = hashlib.sha256()
  n = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    a = np.asarray(parallel.to_host(leaf))
    n += a.size
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str((a.shape, a.dtype.str)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return dict(params_sha256=h.hexdigest(), num_params=int(n))


class _Steps:
  """The jitted per-setting programs, built once and reused for every batch."""

  def __init__(self, apply_fn, output_fn, mesh, collect_stats):
    self.apply_fn, self.output_fn = apply_fn, output_fn
    self.repl = parallel.replicated(mesh)
    self.collect_stats = collect_stats
    self.float = jax.jit(self._float, out_shardings=self.repl)
    self.quant, self.calib = {}, {}

  def _count(self, out, labels, mask):
    """(correct, count, nonfinite) of one global batch (module docstring)."""
    logits = self.output_fn(out)
    finite = jnp.all(jnp.isfinite(logits), axis=-1)
    pred = jnp.argmax(logits, axis=-1)
    m = mask.astype(jnp.int32)
    right = ((pred == labels) & finite).astype(jnp.int32)
    return (jnp.sum(right * m), jnp.sum(m),
            jnp.sum((~finite).astype(jnp.int32) * m))

  def _float(self, variables, images, labels, mask):
    if self.collect_stats:
      out, st = outliers.stats_apply(self.apply_fn)(variables, mask, images)
    else:
      out, st = self.apply_fn(variables, images), {}
    return self._count(out, labels, mask), st

  def add_uniform(self, s):
    # `variables` are the setting's prequantized ones (weights on their grid once,
    # not re-quantized in every pass): only activations are quantized here.
    def step(variables, calib, images, labels, mask):
      f = quant_model.quantized_apply(self.apply_fn, s, calibration=calib,
                                      prequantized=True)
      return self._count(f(variables, images), labels, mask)
    self.quant[s.name] = jax.jit(step, out_shardings=self.repl)
    if s.needs_calibration:
      cal = quant_model.calibration_apply(self.apply_fn, s)
      self.calib[s.name] = jax.jit(
          lambda v, x, m: (cal(v, _fill_padding(x, m)), jnp.sum(m > 0)),
          out_shardings=self.repl)

  def add_ptq(self, name, qapply):
    def step(qvariables, calib, images, labels, mask):
      del calib
      return self._count(qapply(qvariables, images), labels, mask)
    self.quant[name] = jax.jit(step, out_shardings=self.repl)


def evaluate_model(apply_fn: Callable, variables: Mapping[str, Any],
                   batches: Iterable[Mapping[str, np.ndarray]], *,
                   settings: Sequence[Any] = (FLOAT,),
                   output_fn: Callable = lambda out: out[0],
                   mesh=None, devices: Sequence[Any] | None = None,
                   calib_batches: int = 4, calib_images: np.ndarray | None = None,
                   max_batches: int | None = None, num_batches: int | None = None,
                   collect_stats: bool = True, weight_stats: bool = True,
                   pcdr_examples: int = 8, image_key: str = "image",
                   label_key: str = "label", progress: bool = True) -> dict[str, Any]:
  """Float + fake-quant + PTQ evaluation of one model (see the module docstring).

  Args:
    apply_fn: `apply_fn(variables, images, **kw)` with linen `apply` semantics (must
      accept `mutable=`), e.g. `model.apply`.
    variables: `{'params': ...}`: host arrays (identical on every process) or global
      arrays (e.g. the trainer's, FSDP-sharded on `mesh`).
    batches: this process's rows of each global batch: dicts with `image_key`
      `(b, H, W, C)`, `label_key` `(b,)` and optionally `'_mask'` `(b,)`; every batch
      has `b` rows except possibly the last (padded here with `mask = 0`).
    settings: `'float'`, uniform setting names / `QuantSetting`s, PTQ names.
    output_fn: model output → logits `(B, classes)`.
    mesh: a `parallel.make_mesh` mesh (default: data-parallel over `devices`, default
      all devices); the global batch `b · process_count` must divide among its devices.
    calib_batches: global batches used to calibrate static uniform settings.
    calib_images: `(N, H, W, C)` calibration images of PTQ settings (the same on
      every process).
    max_batches: stop after this many batches (None = all).
    num_batches: expected number of batches (progress display only).
    collect_stats, weight_stats: per-layer activation / weight statistics.
    pcdr_examples: real examples of the first batch used for PCDR_1..3 (0 = off).
    progress: print progress to stderr (process 0).

  Returns:
    The report dict (`accuracy`, `counts` (correct, total, nonfinite), `settings`,
    `layers`, `weights`, `quant_plan`, `pcdr`, `devices`, `batches`, `batch_size`,
    `timing_s`).
  """
  parsed = parse_settings(settings)
  if mesh is None:
    mesh = parallel.make_mesh(1, devices)
  ndev = mesh.devices.size
  ptq_settings = [s for s in parsed if isinstance(s, ptq.PTQSetting)]
  if ptq_settings and (calib_images is None or len(calib_images) == 0):
    raise ValueError(f"PTQ settings {[s.name for s in ptq_settings]} need "
                     "calib_images (config.evaluate.calib_images)")
  it = iter(batches)
  first = next(it, None)
  if first is None:
    raise ValueError("evaluate: the evaluation data yielded no batch")
  for key in (image_key, label_key):
    if key not in first:
      raise KeyError(f"evaluation batches need the key {key!r}; got {sorted(first)}")
  local_bs = len(np.asarray(first[image_key]))
  bsz = local_bs * jax.process_count()
  if bsz % ndev:
    raise ValueError(f"batch size {bsz} does not divide among {ndev} devices; "
                     f"use a multiple of {ndev} (config.evaluate.batch_size)")
  if max_batches is not None and max_batches < 1:
    raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")

  variables = parallel.put(dict(variables), parallel.tree_shardings(dict(variables),
                                                                      mesh))
  steps = _Steps(apply_fn, output_fn, mesh, collect_stats)
  names = [setting_name(s) for s in parsed]
  timing = {n: 0.0 for n in names}

  def to_global(b):
    b = _pad_batch(b, local_bs)
    return parallel.global_batch(
        {"image": b[image_key], "label": np.asarray(b[label_key]).astype(np.int32),
         "mask": np.asarray(b[MASK_KEY]).astype(np.int32)}, mesh)

  # Buffer the calibration batches (they are also evaluated, once).
  buffered = [first]
  uniform_static = [s for s in parsed if isinstance(s, quant.QuantSetting)
                    and s.needs_calibration]
  if uniform_static and calib_batches < 1:
    raise ValueError("static quant settings need calib_batches >= 1")
  n_buf = calib_batches if uniform_static else 1
  while len(buffered) < n_buf and (max_batches is None or len(buffered) < max_batches):
    b = next(it, None)
    if b is None:
      break
    buffered.append(b)
  buffered = [(b, to_global(b)) for b in buffered]

  calibrations, ptq_info, qweights = {}, {}, {}
  example = np.asarray(first[image_key])[:1]
  for s in parsed:
    if isinstance(s, quant.QuantSetting):
      steps.add_uniform(s)
      qweights[s.name] = quant_model.prequantize(apply_fn, s, variables, example)
    if isinstance(s, quant.QuantSetting) and s.needs_calibration:
      t0 = time.perf_counter()
      parts = []
      for _, g in buffered[:calib_batches]:
        cal, nreal = jax.device_get(steps.calib[s.name](variables, g["image"],
                                                         g["mask"]))
        if nreal:
          parts.append(cal)
      if not parts:
        raise ValueError(f"no real examples to calibrate {s.name!r} on")
      cal = jax.device_get(quant_model.merge_calibration(parts, s))
      calibrations[s.name] = parallel.put(
          cal, jax.tree.map(lambda _: steps.repl, cal))
      timing[f"calibrate/{s.name}"] = time.perf_counter() - t0
      log_progress(f"calibrated {s.name} on {len(parts)} batches", progress)
    elif isinstance(s, ptq.PTQSetting):
      t0 = time.perf_counter()
      qapply, qvars = ptq.quantize(apply_fn, variables, np.asarray(calib_images),
                                   s.name, output_fn=output_fn)
      calibrations[s.name] = parallel.put(qvars, parallel.tree_shardings(qvars, mesh))
      steps.add_ptq(s.name, qapply)
      ptq_info[s.name] = dict(method=s.method, w_bits=s.w_bits, a_bits=s.a_bits,
                              calib_images=int(len(calib_images)),
                              info=getattr(qapply, "info", {}))
      timing[f"calibrate/{s.name}"] = time.perf_counter() - t0
      log_progress(f"calibrated {s.name} on {len(calib_images)} images", progress)

  def all_batches():
    for _, g in buffered:
      yield g
    for b in it:
      yield to_global(b)

  correct = {n: 0 for n in names}
  counted = {n: 0 for n in names}
  nonfinite = {n: 0 for n in names}
  stats, first_count = None, None
  start = last = time.perf_counter()
  done = 0
  total = min(num_batches or 0, max_batches or num_batches or 0) or None
  for g in all_batches():
    if max_batches is not None and done >= max_batches:
      break
    for s, n in zip(parsed, names):
      t0 = time.perf_counter()
      if s is None:
        (c, t, nf), st = jax.device_get(steps.float(variables, g["image"],
                                                    g["label"], g["mask"]))
        if collect_stats:
          stats = outliers.merge_stats(stats, st)
      elif isinstance(s, ptq.PTQSetting):
        c, t, nf = jax.device_get(steps.quant[n](calibrations[n], None, g["image"],
                                                 g["label"], g["mask"]))
      else:
        c, t, nf = jax.device_get(steps.quant[n](qweights[n], calibrations.get(n),
                                                 g["image"], g["label"], g["mask"]))
      correct[n] += int(c)
      counted[n] += int(t)
      nonfinite[n] += int(nf)
      timing[n] += time.perf_counter() - t0
    if first_count is None:
      first_count = counted[names[0]]
    done += 1
    now = time.perf_counter()
    if progress and (now - last > 10 or done == total):
      last = now
      rate = done / (now - start)
      eta = f", ETA {(total - done) / rate:.0f}s" if total else ""
      log_progress(f"evaluate: batch {done}{'/' + str(total) if total else ''} "
           f"({counted[names[0]]} examples, {rate:.2f} batches/s{eta}) "
           + " ".join(f"{n}={correct[n] / max(counted[n], 1):.4f}"
                      + (f" ({nonfinite[n]} non-finite)" if nonfinite[n] else "")
                      for n in names))

  settings_rec = {}
  for s, n in zip(parsed, names):
    if s is None:
      settings_rec[n] = dict(float=True)
    elif isinstance(s, ptq.PTQSetting):
      settings_rec[n] = ptq_info[n]
    else:
      settings_rec[n] = report_lib.setting_record(s)
  rep: dict[str, Any] = dict(
      accuracy={n: correct[n] / counted[n] if counted[n] else float("nan")
                for n in names},
      counts={n: dict(correct=correct[n], total=counted[n], nonfinite=nonfinite[n])
              for n in names},
      settings=settings_rec,
      devices=dict(count=int(ndev), processes=jax.process_count(),
                   platform=jax.devices()[0].platform, mesh=dict(mesh.shape)),
      batches=done, batch_size=bsz, timing_s=timing)
  image0 = np.asarray(buffered[0][0][image_key])[:1]
  abstract_vars = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                               variables)
  rep["quant_plan"] = {
      n: _plan_summary(apply_fn, s, abstract_vars, image0)
      for s, n in zip(parsed, names) if isinstance(s, quant.QuantSetting)}
  if collect_stats and stats is not None:
    rep["layers"] = outliers.summarize(stats)
  if (weight_stats or pcdr_examples) and "params" in variables:
    repl = replicate(variables, mesh)
    if weight_stats:
      rep["weights"] = outliers.weight_spectrum(parallel.local_copy(repl["params"]))
    if pcdr_examples:
      rep["pcdr"] = _pcdr_report(apply_fn, repl, buffered[0][1],
                                 min(pcdr_examples, first_count or 0), mesh)
  return rep


def replicate(variables, mesh):
  """The variables replicated on every device (a no-op when already replicated)."""
  repl = parallel.replicated(mesh)
  if all(x.sharding.is_fully_replicated for x in jax.tree.leaves(variables)):
    return variables
  return jax.jit(lambda v: v, out_shardings=repl)(variables)


def _plan_summary(apply_fn, setting, variables, images) -> dict[str, Any]:
  """Which module calls a setting quantizes, at which bits (traced only)."""
  plan = quant_model.quantization_plan(apply_fn, setting, dict(variables), images)
  by_bits: dict[str, list[str]] = {}
  for p in plan:
    key = f"W{p['w_bits']}A{p['a_bits']}" if p["w_bits"] else f"attnA{p['a_bits']}"
    if p["path"] not in by_bits.setdefault(key, []):
      by_bits[key].append(p["path"])
  return dict(num_quantized_calls=len(plan), modules_by_bits=by_bits)


def _pcdr_report(apply_fn, variables, g, n: int, mesh):
  """PCDR_1..3 per kernel on the first `n` real examples of the first global batch."""
  from s2d_jax import capture  # pylint: disable=g-import-not-at-top
  if n <= 0:
    return {}

  @functools.partial(jax.jit, out_shardings=parallel.replicated(mesh))
  def inputs_fn(v, images, mask):
    idx = jnp.argsort(mask <= 0, stable=True)[:n]     # real rows first, in order
    x = jax.lax.with_sharding_constraint(images[idx], parallel.replicated(mesh))
    return capture.capture_matmul_inputs(apply_fn, v, x)[1]

  inputs = inputs_fn(dict(variables), g["image"], g["mask"])
  return outliers.pcdr_stats(*parallel.local_copy((variables["params"], inputs)), 3)


def zeroshot_fns(model, class_emb) -> tuple[Callable, Callable]:
  """`(apply_fn, output_fn)` for zero-shot evaluation of a two-tower model.

  `apply_fn(v, images, **kw)` runs the image tower only (so only it is quantized);
  `output_fn` maps its output to `zimg @ class_embᵀ` `(B, classes)`.
  `class_emb (C, D)`: L2-normalised class embeddings.
  """
  from s2d_jax.models import zeroshot  # pylint: disable=g-import-not-at-top
  emb = jnp.asarray(class_emb, jnp.float32)

  def apply_fn(v, images, **kw):
    return model.apply(v, images, None, **kw)

  return apply_fn, lambda out: zeroshot.zeroshot_logits(out[0], emb)
