r"""The evaluator: float, uniform fake-quant and PTQ settings, outliers; one to N hosts.

    python -m s2d_jax.evaluate --config CONFIG[:ARG] --workdir DIR \
        [--config.evaluate.settings=float,W8A8,W4A4,RepQ-ViT/W4A4] (--help: all flags)

`evaluate_model` is the core: a `predict_fn` (`apply_fn`, `output_fn`) and data in,
metrics out; it never loads a model. `evaluate` is the config-level wrapper: restore
the model (the one place: npz through the model module's `load`, or an orbax
training checkpoint), read this process's rows of every global batch, run the core,
write the report (`s2d_jax.report`, process 0 only).

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
scores 0 % with every example flagged. The float step also records the per-layer activation statistics of
`s2d_jax.outliers` over the global batch (reduced by XLA inside the program) and
merges them across batches exactly on the host. Global batch i holds the same
examples whatever the number of processes (`input_pipeline.get_eval_dataset` gives
process p rows [p·b, (p+1)·b) of it), so the report does not depend on the number of
devices or processes (float sums up to rounding).

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

Before any work `evaluate` checks the config (`config_schema.validate`), the inputs
(`prepare_inputs`: the evaluation split and preprocessing, the calibration images,
the zero-shot tokenizer and class names) and that the workdir is writable; the
model's params are checked against the configured model (shapes) and for NaN / Inf
(refused unless `config.model_load.allow_nonfinite`). Process 0 prints the table,
then writes report.json atomically (temporary file + rename).

Accuracy is classification top-1 for classifiers, zero-shot top-1 for SigLIP
two-tower models (`evaluate.kind='zeroshot'`: only the image tower is quantized; class
embeddings come from the float text tower). The report's fields are documented in
`s2d_jax.report`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from s2d_jax import checkpointing
from s2d_jax import config_schema
from s2d_jax import config_utils
from s2d_jax import outliers
from s2d_jax import parallel
from s2d_jax import ptq
from s2d_jax import quant
from s2d_jax import quant_model
from s2d_jax import report as report_lib
from s2d_jax import tasks

MASK_KEY = "_mask"
FLOAT = report_lib.FLOAT


def _log(msg: str, enabled: bool = True):
  if enabled and jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


def parse_settings(names) -> list:
  """`['float', 'W8A8', 'RepQ-ViT/W4A4']` → `[None, QuantSetting, PTQSetting]`.

  Raises a ValueError naming an unknown or repeated setting before any work starts.
  """
  return config_schema.validate_settings(names, where="settings")


def _name(s) -> str:
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
  names = [_name(s) for s in parsed]
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
      _log(f"calibrated {s.name} on {len(parts)} batches", progress)
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
      _log(f"calibrated {s.name} on {len(calib_images)} images", progress)

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
      _log(f"evaluate: batch {done}{'/' + str(total) if total else ''} "
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
    repl = _replicated(variables, mesh)
    if weight_stats:
      rep["weights"] = outliers.weight_spectrum(parallel.local_copy(repl["params"]))
    if pcdr_examples:
      rep["pcdr"] = _pcdr_report(apply_fn, repl, buffered[0][1],
                                 min(pcdr_examples, first_count or 0), mesh)
  return rep


def _replicated(variables, mesh):
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


# ---------------------------------------------------------------- config side --

def _abstract_params(config, task, model, image_shape):
  """Shapes of the configured model's params (nothing computed)."""
  img = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  args = [img]
  if "labels" in task.inputs:
    tok = dict(config.evaluate.get("tokenizer") or {})
    args.append(jax.ShapeDtypeStruct((1, int(tok.get("max_len", 64))), jnp.int32))
  return jax.eval_shape(lambda r, *a: model.init(r, *a), jax.random.PRNGKey(0),
                        *args)["params"]


def _model_changes(config, meta) -> str:
  """The model keys of `config` that differ from the training config stored in a
  checkpoint's meta, as a hint for a shape mismatch ('' when unknown)."""
  then = meta.get("config")
  if not isinstance(then, dict):
    return ""
  keys = ("model_name", "model", "num_classes")
  changes = config_utils.config_changes(
      {k: config.get(k) for k in keys}, {k: then.get(k) for k in keys},
      f"checkpoint {meta.get('step')}'s training config")
  return ("the config differs: " + "; ".join(changes)) if changes else ""


def nonfinite_params(params) -> dict[str, tuple[int, int, int]]:
  """`{'a/b/kernel': (#NaN, #Inf, size)}` of the float leaves holding NaN / Inf.

  One jitted reduction per leaf over global arrays (sharded params are never
  gathered on a host); only the counts come back.
  """
  floats = {checkpointing._path_str(p): x  # pylint: disable=protected-access
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
            if jnp.issubdtype(x.dtype, jnp.floating)}
  counts = jax.device_get(jax.jit(lambda t: {
      k: (jnp.sum(jnp.isnan(x)), jnp.sum(jnp.isinf(x))) for k, x in t.items()})(
          floats))
  return {k: (int(n), int(i), int(np.size(floats[k])))
          for k, (n, i) in counts.items() if n or i}


def load_model(config, workdir: str | None, mesh, image_shape, params=None):
  """`(model, params, checkpoint_info)`; the one place the evaluator restores params.

  `params` (e.g. the trainer's, in memory) are used as they are; otherwise
  `config.evaluate.checkpoint` (or `workdir`) is a big_vision npz (the model
  module's `load`, checked against the configured model) or an orbax training
  checkpoint (its stored fingerprint compared with the configured model before
  anything is read, then restored onto the mesh, each process reading its own
  shards). Loaded params holding NaN / Inf raise a CheckpointError naming them
  unless `config.model_load.allow_nonfinite`.
  """
  from s2d_jax.models import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  task = tasks.get(config)
  model = task.build(config)
  if params is not None:
    return model, params, dict(kind="in-memory", path=None)
  ev = config.evaluate
  allow = bool(config.model_load.get("allow_nonfinite", False))
  path = ev.get("checkpoint") or workdir
  if not path:
    raise FileNotFoundError("no checkpoint: set config.evaluate.checkpoint or "
                            "--workdir")
  if "://" not in path and not os.path.exists(path):
    where = "config.evaluate.checkpoint" if ev.get("checkpoint") else "--workdir"
    raise FileNotFoundError(f"checkpoint not found: {path!r} (from {where})")
  abstract = _abstract_params(config, task, model, image_shape)
  if path.endswith(".npz"):
    host = task.module().load(abstract, path, config.model, (),
                              allow_nonfinite=allow)
    params = parallel.put(host, parallel.tree_shardings(abstract, mesh))
    return model, params, dict(kind="npz", path=path)
  params = checkpointing.restore_params(
      path, mesh=mesh, expected=abstract,
      hint=lambda meta: _model_changes(config, meta))
  bad = nonfinite_params(params)
  if bad:
    msg = (f"checkpoint {path}: {len(bad)} parameter(s) hold non-finite values: "
           f"{ckpt_lib.describe_nonfinite(bad)}")
    if not allow:
      raise ckpt_lib.CheckpointError(
          msg + ". Evaluating them gives NaN logits; set "
          "config.model_load.allow_nonfinite=True to evaluate them anyway.")
    import warnings  # pylint: disable=g-import-not-at-top
    warnings.warn(msg, ckpt_lib.NonFiniteWarning, stacklevel=2)
  return model, params, dict(kind="orbax", path=path)


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


def _predict_fns(config, model, params, mesh):
  """(apply_fn, output_fn) of the task's evaluation kind."""
  if config.evaluate.kind == "classification":
    return model.apply, (lambda out: out[0])
  from s2d_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from s2d_jax.models import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  from s2d_jax.models import zeroshot  # pylint: disable=g-import-not-at-top
  ev = config.evaluate
  names = ev.get("classnames")
  if names is None:
    names = input_pipeline.get_info(ev.data.name, _data_dir(config)).features[
        "label"].names
  tok = tok_lib.Tokenizer(**dict(ev.get("tokenizer") or {}))
  local = parallel.local_copy(_replicated({"params": params}, mesh))["params"]
  emb = zeroshot.class_embeddings(model, local, tok, list(names), ev.get("templates"))
  return zeroshot_fns(model, emb)


def _data_dir(config):
  return config.evaluate.get("data_dir") or config.get("input", {}).get("data_dir")


def prepare_inputs(config, num_devices: int | None = None):
  """Every input check of the evaluation, before any work: `(ds, num_batches)`.

  Checks, each error naming the config key: the global `evaluate.batch_size`
  divides among `num_devices` (default all) and the processes; the evaluation
  dataset and split exist (`evaluate.data`); the preprocessing builds and yields
  'image' and 'label' (`evaluate.pp`); PTQ settings: the calibration split
  (`input.data`) holds at least `evaluate.calib_images` examples; zero-shot: the
  tokenizer loads (`evaluate.tokenizer`), its vocabulary is the text tower's
  (`model.text.vocab_size`) and class names are known (`evaluate.classnames` or
  the dataset's 'label' names). Returns this process's
  evaluation data (nothing is read yet). The trainer calls it before its first step.
  """
  from s2d_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  ev = config.evaluate
  ndev = jax.device_count() if num_devices is None else int(num_devices)
  pcount = jax.process_count()
  if int(ev.batch_size) % ndev or int(ev.batch_size) % pcount:
    raise ValueError(f"config.evaluate.batch_size={ev.batch_size} does not divide "
                     f"among {ndev} devices")
  data_dir = _data_dir(config)
  try:
    input_pipeline.num_examples(ev.data.name, ev.data.split, data_dir=data_dir)
  except input_pipeline.DatasetNotFoundError as e:
    raise FileNotFoundError(f"config.evaluate.data: {e}") from None
  except (ValueError, KeyError) as e:
    raise ValueError(f"config.evaluate.data: {e}") from None
  try:
    ds, nb = input_pipeline.get_eval_dataset(
        ev.data.name, ev.data.split, preprocess=ev.pp,
        batch_size=int(ev.batch_size) // pcount, process_index=jax.process_index(),
        process_count=pcount, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"config.evaluate.pp={ev.pp!r}: {e}") from None
  keys = sorted(k for k in ds.element_spec if not k.startswith("_"))
  if "image" not in keys or "label" not in keys:
    raise ValueError(f"config.evaluate.pp: evaluation batches have keys {keys}; the "
                     "evaluator needs 'image' and 'label'")
  settings = config_schema.validate_settings(list(ev.settings))
  if any(isinstance(s, ptq.PTQSetting) for s in settings):
    data = config.input.data
    try:
      n = input_pipeline.num_examples(data["name"], data["split"],
                                      data_dir=config.input.get("data_dir"))
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"config.input.data (the calibration images of the PTQ "
                       f"settings): {e}") from None
    if n < int(ev.calib_images):
      raise ValueError(
          f"config.evaluate.calib_images={ev.calib_images}: the calibration split "
          f"{data['name']}[{data['split']}] (config.input.data) has only {n} "
          "examples")
  if ev.kind == "zeroshot":
    from s2d_jax.models import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
    tok_kw = dict(ev.get("tokenizer") or {})
    try:
      tok = tok_lib.Tokenizer(**tok_kw)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"config.evaluate.tokenizer={tok_kw!r}: "
                       f"{type(e).__name__}: {e}") from None
    _check_vocab_size(config, tok, tuple(ds.element_spec["image"].shape[1:]))
    if ev.get("classnames") is None:
      features = input_pipeline.get_info(ev.data.name, data_dir).features
      label = features["label"] if "label" in features.keys() else None
      if not getattr(label, "names", None):
        raise ValueError(
            f"config.evaluate.classnames: not set, and dataset {ev.data.name!r} has "
            "no 'label' class names to take them from")
  return ds, nb


def _check_vocab_size(config, tok, image_shape) -> None:
  """The tokenizer's pieces must be the text tower's vocabulary (its embedding
  rows): other ids would silently pick wrong (or, past the end, clamped)
  embeddings. Shapes only: nothing is computed."""
  task = tasks.get(config)
  abstract = _abstract_params(config, task, task.build(config), image_shape)
  rows = [x.shape[0] for p, x in jax.tree_util.tree_flatten_with_path(
      abstract.get("txt", {}))[0]
          if getattr(p[-1], "key", None) == "embedding" and len(x.shape) == 2]
  if rows and rows[0] != tok.vocab_size:
    raise ValueError(
        f"config.evaluate.tokenizer: the SentencePiece model {tok.path!r} has "
        f"{tok.vocab_size} pieces but the text tower's vocabulary "
        f"(config.model.text.vocab_size) is {rows[0]}: use the tokenizer the text "
        "tower was trained with")


def check_writable(workdir: str) -> None:
  """Raises OSError naming `workdir` unless process 0 can create files in it.

  Runs before any work, so that a read-only workdir does not cost a whole
  evaluation; every process gets the answer (process 0 writes the report). Local
  paths: the directory is created and a temporary file created and removed;
  remote paths (`gs://`, anything with `://`): the same through `tf.io.gfile`
  (makedirs, a small file written, closed and deleted), so a bucket without write
  permission fails here, not after the evaluation.
  """
  ok, why = True, ""
  if jax.process_index() == 0:
    try:
      if "://" in workdir:
        _probe_remote(workdir)
      else:
        os.makedirs(workdir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write_check_", dir=workdir)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
      ok, why = False, (str(e) if "://" in workdir else
                        f"{type(e).__name__}: {e.strerror or e}")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    ok = bool(multihost_utils.broadcast_one_to_all(np.asarray(ok)))
  if not ok:
    raise OSError(f"--workdir {workdir!r} is not writable ({why or 'on process 0'}): "
                  "report.json and plots/ go there; pick another --workdir")


def _probe_remote(workdir: str) -> None:
  """Creates `workdir` and a small file in it through tf.io.gfile, then deletes
  the file; TensorFlow's errors come back as OSError naming their class."""
  import uuid  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  probe = workdir.rstrip("/") + f"/.write_check_{uuid.uuid4().hex}"
  try:
    tf.io.gfile.makedirs(workdir)
    with tf.io.gfile.GFile(probe, "w") as f:
      f.write("s2d_jax write check\n")
    tf.io.gfile.remove(probe)
  except tf.errors.OpError as e:
    raise OSError(f"{type(e).__name__}: {e.message}") from None


def calibration_images(config, n: int) -> np.ndarray:
  """The first `n` images of the training split (`config.input.data`) with the
  evaluation preprocessing: deterministic, identical on every process."""
  from s2d_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  data = config.input.data
  ds, _ = input_pipeline.get_eval_dataset(
      data["name"], data["split"], preprocess=config.evaluate.pp, batch_size=n,
      process_index=0, process_count=1, data_dir=config.input.get("data_dir"))
  b = next(iter(ds.as_numpy_iterator()))
  return np.asarray(b["image"])[np.asarray(b[MASK_KEY]) > 0]


def evaluate(config, workdir: str | None, *, params=None, mesh=None,
             progress: bool = True, write: bool = True) -> dict[str, Any]:
  """Runs the evaluation described by `config.evaluate`; writes the report.

  `params` (e.g. the trainer's global arrays, with its `mesh`) skip checkpoint
  loading. Every check (config, inputs, a writable workdir, the checkpoint against
  the model) runs before any work. Process 0 prints the table, then writes
  `workdir/report.json` atomically and `workdir/plots/` (when `write`).
  """
  config_schema.validate(config, training=False)
  ev = config.evaluate
  settings = parse_settings(list(ev.settings))
  mesh = mesh if mesh is not None else parallel.make_mesh(int(config.mesh.fsdp))
  ndev, pcount = mesh.devices.size, jax.process_count()
  ds, nb = prepare_inputs(config, ndev)
  if write and workdir:
    check_writable(workdir)
  image_shape = tuple(ds.element_spec["image"].shape[1:])
  model, params, ckpt = load_model(config, workdir, mesh, image_shape, params)
  apply_fn, output_fn = _predict_fns(config, model, params, mesh)
  calib = None
  if any(isinstance(s, ptq.PTQSetting) for s in settings):
    calib = calibration_images(config, int(ev.calib_images))
  _log(f"evaluate: {ev.data.name}[{ev.data.split}] {nb} batches of "
       f"{ev.batch_size} on {ndev} devices ({pcount} processes); settings "
       f"{[_name(s) for s in settings]}", progress)
  rep = evaluate_model(
      apply_fn, {"params": params}, ds.as_numpy_iterator(), settings=settings,
      output_fn=output_fn, mesh=mesh, calib_batches=int(ev.calib_batches),
      calib_images=calib, max_batches=ev.get("max_batches"), num_batches=nb,
      progress=progress, pcdr_examples=int(ev.pcdr_examples),
      collect_stats=bool(ev.collect_stats))
  rep["model"] = dict(name=config.model_name, kind=ev.kind,
                      config=report_lib.jsonable(dict(config.model)))
  rep["checkpoint"] = dict(ckpt, **params_identity(params))
  rep["data"] = dict(name=ev.data.name, split=ev.data.split, pp=ev.pp,
                     batch_size=ev.batch_size, num_batches=nb)
  if jax.process_index() == 0:
    print(report_lib.format_table(rep), flush=True)
    if write and workdir:
      report_lib.write_report(rep, workdir)
  if pcount > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("evaluate: report written")
  return rep


# ---------------------------------------------------------------------- CLI --

USAGE = r"""Evaluates a checkpoint: float, fake-quant and PTQ accuracy, outliers.

  python -m s2d_jax.evaluate --config CONFIG[:ARG] --workdir DIR [--config.KEY=VALUE]

The checkpoint is config.evaluate.checkpoint (a big_vision npz or an orbax run
directory) or, when empty, the training run in DIR. Writes DIR/report.json and
DIR/plots/, prints a table. Settings: 'float', uniform (W8A8, W4A4, W6A6-static, ...)
and the paper's PTQ methods (RepQ-ViT/W4A4, PTQ4ViT/W6A6, ERQ/W4A4).

Examples:
  python -m s2d_jax.evaluate --config siglip2_b16_384_i1k --workdir gs://B/run
  python -m s2d_jax.evaluate --config siglip2_b16_384_i1k --workdir /tmp/ev \
      --config.evaluate.checkpoint=/path/params.npz \
      --config.evaluate.settings=float,W8A8,W4A4
  # two processes (run once per process):
  python -m s2d_jax.evaluate --config demo:size=tiny --workdir /tmp/run \
      --coordinator_address 127.0.0.1:1234 --num_processes 2 --process_id 1
"""


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  fv = flags.FlagValues()
  config_utils.define_flags(fv, workdir_help="Where report.json and plots/ go; also "
                            "the checkpoint when config.evaluate.checkpoint is empty.")
  config = config_utils.parse_flags(fv, sys.argv[1:] if argv is None else argv,
                                    usage=USAGE)
  config_utils.maybe_initialize_distributed(fv)
  return evaluate(config, fv["workdir"].value)


if __name__ == "__main__":
  config_utils.run_cli(main)
