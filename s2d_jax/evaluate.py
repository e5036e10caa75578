"""Outlier and post-training-quantization (PTQ) evaluation under ``jax.pmap``.

    python -m s2d_jax.evaluate --config configs/FILE.py[:ARGS] --workdir DIR \\
        [--config.evaluate.settings=float,W8A8,W4A4] [--config.evaluate.max_batches=10]

loads a checkpoint, runs the float model and every requested quant setting over
an evaluation split in one pass, and writes ``DIR/report.json`` and
``DIR/plots/*.png``, and prints a table.

Per batch, each setting is one ``pmap``-ed step over all local devices: the
global batch ``(B, ...)`` is reshaped to ``(devices, B / devices, ...)`` (a
``ValueError`` if ``B`` does not divide), and the step returns

    correct = psum_d Σ_b mask_b · [argmax_c logits_bc = label_b],
    count   = psum_d Σ_b mask_b,

so padded examples (``mask = 0``: the padding of the last partial batch, added
by the data pipeline or here) count neither as right nor as seen, and nothing
is counted twice. The float step also records the per-layer activation
statistics of :mod:`s2d_jax.outliers`, combined across devices with
collectives and across batches exactly on the host. Static quant settings
are calibrated first on the first ``calib_batches`` batches (padded rows
replaced by real rows of the same batch; minmax ranges combine by min/max,
percentile/MSE ranges by their mean over devices and batches). Accuracy is
classification top-1 for classifiers (``model_name='vit'``), zero-shot top-1
for SigLIP two-tower models (``evaluate.kind='zeroshot'``; the image tower is
quantized, class embeddings come from the float text tower).

``report.json`` holds: ``accuracy`` per setting, ``counts``, ``settings`` (every
field of each :class:`s2d_jax.quant.QuantSetting`), ``layers`` (float-model
statistics per layer: max |x|, mean per-token ‖x‖∞, kurtosis, top-1/median,
massive flag, channel-range spread), ``weights`` (σ_max, σ_1/σ_2, top-3 σ per
kernel), ``quant_plan`` (which modules each setting quantizes at which bits),
``pcdr`` (PCDR_1..3 on the first examples), ``model``,
``checkpoint`` (path, kind, params SHA-256, number of params), ``data`` and
``devices``. The numbers do not depend on the number of devices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from s2d_jax import outliers
from s2d_jax import quant
from s2d_jax import quant_model

AXIS = "batch"
MASK_KEY = "_mask"
FLOAT = "float"


def _log(msg: str, enabled: bool = True):
  if enabled:
    print(msg, file=sys.stderr, flush=True)


def parse_settings(names: Sequence[str | quant.QuantSetting]) -> list:
  """``['float', 'W8A8', ...]`` → ``[None | QuantSetting]`` (float = None).

  Raises a ``ValueError`` naming an unknown setting before any work starts.
  """
  if isinstance(names, str):
    names = [n for n in names.split(",") if n]
  out, seen = [], set()
  for n in names:
    s = None if n is None or n == FLOAT else quant.get_setting(n)
    key = FLOAT if s is None else s.name
    if key in seen:
      raise ValueError(f"quant setting {key!r} listed twice")
    seen.add(key)
    out.append(s)
  if not out:
    raise ValueError("no settings to evaluate")
  return out


def _pad_batch(batch: Mapping[str, np.ndarray], size: int) -> dict:
  """Pad a short batch to ``size`` rows with zeros and ``mask = 0``."""
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


def _shard(x: np.ndarray, n: int) -> np.ndarray:
  return x.reshape((n, x.shape[0] // n) + x.shape[1:])


def _fill_padding(images: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
  """Padded rows replaced by real rows (cyclically) — for calibration only."""
  real = np.flatnonzero(mask > 0)
  if real.size == 0:
    return None
  pad = np.flatnonzero(mask <= 0)
  images = images.copy()
  images[pad] = images[real[np.arange(pad.size) % real.size]]
  return images


def params_identity(params) -> dict[str, Any]:
  """SHA-256 over the leaves' paths, shapes, dtypes and bytes; param count."""
  h = hashlib.sha256()
  n = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    a = np.asarray(leaf)
    n += a.size
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str((a.shape, a.dtype.str)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return dict(params_sha256=h.hexdigest(), num_params=int(n))


def replicate(tree, devices):
  """Every leaf stacked ``(devices, ...)`` and placed one copy per device."""
  mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  n = len(devices)
  return jax.tree.map(lambda x: jax.device_put(
      np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), sharding), tree)


def _first(tree):
  """Device 0's copy of a pmap output (all devices hold the same after psum)."""
  return jax.tree.map(lambda a: np.asarray(a[0]), tree)


def _make_steps(apply_fn, output_fn, settings, devices, collect_stats):
  """pmap-ed per-setting steps, built once and reused for every batch."""

  def correct_count(out, labels, mask):
    pred = jnp.argmax(output_fn(out), axis=-1)
    m = mask.astype(jnp.int32)
    hit = (pred == labels).astype(jnp.int32) * m
    return jax.lax.psum(jnp.sum(hit), AXIS), jax.lax.psum(jnp.sum(m), AXIS)

  stats_fn = outliers.stats_apply(apply_fn)

  def float_step(variables, images, labels, mask):
    if collect_stats:
      out, st = stats_fn(variables, mask, images)
      st = outliers.reduce_stats(st, AXIS)
    else:
      out, st = apply_fn(variables, images), {}
    return correct_count(out, labels, mask), st

  def quant_step(setting):
    if setting.needs_calibration:
      def step(variables, calib, images, labels, mask):
        f = quant_model.quantized_apply(apply_fn, setting, calibration=calib)
        return correct_count(f(variables, images), labels, mask)
    else:
      def step(variables, images, labels, mask):
        f = quant_model.quantized_apply(apply_fn, setting)
        return correct_count(f(variables, images), labels, mask)
    return step

  def calib_step(setting):
    f = quant_model.calibration_apply(apply_fn, setting)
    return lambda variables, images: quant_model.reduce_calibration(
        f(variables, images), setting, AXIS)

  kw = dict(axis_name=AXIS, devices=devices)
  return (jax.pmap(float_step, **kw),
          {s.name: jax.pmap(quant_step(s), **kw) for s in settings if s},
          {s.name: jax.pmap(calib_step(s), **kw)
           for s in settings if s and s.needs_calibration})


def evaluate_model(apply_fn: Callable, variables: Mapping[str, Any],
                   batches: Iterable[Mapping[str, np.ndarray]], *,
                   settings: Sequence[str] = (FLOAT,),
                   output_fn: Callable = lambda out: out[0],
                   devices: Sequence[Any] | None = None,
                   calib_batches: int = 4, max_batches: int | None = None,
                   num_batches: int | None = None, collect_stats: bool = True,
                   weight_stats: bool = True, pcdr_examples: int = 8,
                   image_key: str = "image", label_key: str = "label",
                   progress: bool = True) -> dict[str, Any]:
  """Float + fake-quant evaluation of one model over ``batches`` (see module doc).

  Args:
    apply_fn: ``apply_fn(variables, images, **kw)`` with linen ``apply``
      semantics (must accept ``mutable=``), e.g. ``model.apply``.
    variables: ``{'params': ...}`` (host arrays; replicated here).
    batches: iterable of dicts with ``image_key`` ``(B, H, W, C)``,
      ``label_key`` ``(B,)`` and optionally ``'_mask'`` ``(B,)``; every batch
      has ``B`` rows except possibly the last (padded here with ``mask = 0``).
    settings: ``'float'`` and/or quant setting names / ``QuantSetting``s.
    output_fn: model output → logits ``(B, classes)``.
    devices: devices to ``pmap`` over (default: all local devices); ``B`` must
      be divisible by their number.
    calib_batches: batches used to calibrate static settings.
    max_batches: stop after this many batches (None = all).
    num_batches: expected number of batches (progress display only).
    collect_stats, weight_stats: per-layer activation / weight statistics.
    pcdr_examples: real examples of the first batch used for PCDR_1..3 (0 = off).
    progress: print progress to stderr.

  Returns:
    The report dict (``accuracy``, ``counts``, ``settings``, ``layers``,
    ``weights``, ``quant_plan``, ``pcdr``, ``devices``, ``timing_s``).
  """
  parsed = parse_settings(settings)
  devices = list(devices) if devices is not None else jax.local_devices()
  ndev = len(devices)
  if calib_batches < 1 and any(s and s.needs_calibration for s in parsed):
    raise ValueError("static quant settings need calib_batches >= 1")
  it = iter(batches)
  first = next(it, None)
  if first is None:
    raise ValueError("evaluate: the evaluation data yielded no batch")
  for key in (image_key, label_key):
    if key not in first:
      raise KeyError(f"evaluation batches need the key {key!r}; got {sorted(first)}")
  bsz = len(np.asarray(first[image_key]))
  if bsz % ndev:
    raise ValueError(f"batch size {bsz} does not divide among {ndev} devices; "
                     f"use a multiple of {ndev} (config.evaluate.batch_size)")
  if max_batches is not None and max_batches < 1:
    raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")

  float_step, quant_steps, calib_steps = _make_steps(
      apply_fn, output_fn, parsed, devices, collect_stats)
  rep_vars = replicate(dict(variables), devices)
  names = [FLOAT if s is None else s.name for s in parsed]

  # Buffer the calibration batches (they are also evaluated, once).
  buffered = [first]
  n_buf = calib_batches if calib_steps else 1
  while len(buffered) < n_buf and (max_batches is None or len(buffered) < max_batches):
    b = next(it, None)
    if b is None:
      break
    buffered.append(b)

  calibrations, timing = {}, {n: 0.0 for n in names}
  for s in parsed:
    if s is None or not s.needs_calibration:
      continue
    t0 = time.perf_counter()
    parts = []
    for b in buffered[:calib_batches]:
      b = _pad_batch(b, bsz)
      imgs = _fill_padding(b[image_key], b[MASK_KEY])
      if imgs is not None:
        parts.append(_first(calib_steps[s.name](rep_vars, _shard(imgs, ndev))))
    if not parts:
      raise ValueError(f"no real examples to calibrate {s.name!r} on")
    cal = quant_model.merge_calibration(parts, s)
    calibrations[s.name] = replicate(cal, devices)
    timing[f"calibrate/{s.name}"] = time.perf_counter() - t0
    _log(f"calibrated {s.name} on {len(parts)} batches", progress)

  def all_batches():
    yield from buffered
    yield from it

  correct = {n: 0 for n in names}
  counted = {n: 0 for n in names}
  stats = None
  start = last = time.perf_counter()
  done = 0
  total = min(num_batches or 0, max_batches or num_batches or 0) or None
  for b in all_batches():
    if max_batches is not None and done >= max_batches:
      break
    b = _pad_batch(b, bsz)
    imgs = _shard(b[image_key], ndev)
    labels = _shard(np.asarray(b[label_key]).astype(np.int32), ndev)
    mask = _shard(np.asarray(b[MASK_KEY]).astype(np.int32), ndev)
    for s, n in zip(parsed, names):
      t0 = time.perf_counter()
      if s is None:
        (c, t), st = float_step(rep_vars, imgs, labels, mask)
        if collect_stats:
          stats = outliers.merge_stats(
              stats, outliers.finalize_reduced(_first(st)))
      elif s.needs_calibration:
        c, t = quant_steps[n](rep_vars, calibrations[n], imgs, labels, mask)
      else:
        c, t = quant_steps[n](rep_vars, imgs, labels, mask)
      correct[n] += int(np.asarray(c)[0])
      counted[n] += int(np.asarray(t)[0])
      timing[n] += time.perf_counter() - t0
    done += 1
    now = time.perf_counter()
    if progress and (now - last > 10 or done == total):
      last = now
      rate = done / (now - start)
      eta = f", ETA {(total - done) / rate:.0f}s" if total else ""
      _log(f"evaluate: batch {done}{'/' + str(total) if total else ''} "
           f"({counted[names[0]]} examples, {rate:.2f} batches/s{eta}) "
           + " ".join(f"{n}={correct[n] / max(counted[n], 1):.4f}" for n in names),
           True)

  report: dict[str, Any] = dict(
      accuracy={n: correct[n] / counted[n] if counted[n] else float("nan")
                for n in names},
      counts={n: dict(correct=correct[n], total=counted[n]) for n in names},
      settings={n: (dict(float=True) if s is None else dataclasses.asdict(s))
                for s, n in zip(parsed, names)},
      devices=dict(count=ndev, platform=devices[0].platform),
      batches=done, batch_size=bsz, timing_s=timing)
  report["quant_plan"] = {
      n: _plan_summary(apply_fn, s, variables, buffered[0][image_key][:1])
      for s, n in zip(parsed, names) if s is not None}
  if collect_stats and stats is not None:
    report["layers"] = outliers.summarize(stats)
  if weight_stats and "params" in variables:
    report["weights"] = outliers.weight_spectrum(variables["params"])
  if pcdr_examples and "params" in variables:
    report["pcdr"] = _pcdr_report(apply_fn, variables, buffered[0], image_key,
                                  pcdr_examples)
  return report


def _plan_summary(apply_fn, setting, variables, images) -> dict[str, Any]:
  """Which module calls a setting quantizes, at which bits (traced only)."""
  plan = quant_model.quantization_plan(apply_fn, setting, dict(variables), images)
  by_bits: dict[str, list[str]] = {}
  for p in plan:
    key = f"W{p['w_bits']}A{p['a_bits']}" if p["w_bits"] else f"attnA{p['a_bits']}"
    if p["path"] not in by_bits.setdefault(key, []):
      by_bits[key].append(p["path"])
  return dict(num_quantized_calls=len(plan), modules_by_bits=by_bits)


def _pcdr_report(apply_fn, variables, batch, image_key, n):
  from s2d_jax import capture  # pylint: disable=g-import-not-at-top
  mask = np.asarray(batch.get(MASK_KEY, np.ones(len(batch[image_key]))))
  imgs = np.asarray(batch[image_key])[mask > 0][:n]
  if len(imgs) == 0:
    return {}
  inputs = jax.jit(lambda v, x: capture.capture_matmul_inputs(
      apply_fn, v, x)[1])(dict(variables), imgs)
  return outliers.pcdr_stats(variables["params"], inputs, 3)


# ---------------------------------------------------------------- CLI side --

def build_model(config):
  """The linen module of ``config.model_name`` (``'vit'`` or ``'two_towers'``)."""
  kw = dict(config.model)
  if config.model_name == "vit":
    from s2d_jax.models import vit  # pylint: disable=g-import-not-at-top
    return vit.Model(int(config.num_classes), **kw)
  if config.model_name == "two_towers":
    from s2d_jax.models import two_towers  # pylint: disable=g-import-not-at-top
    return two_towers.Model(**kw)
  raise ValueError(f"config.model_name={config.model_name!r}; expected 'vit' or "
                   "'two_towers'")


def load_model(config, workdir: str | None, params=None):
  """``(model, params, checkpoint_info)`` from params, an npz or an orbax workdir."""
  if params is not None:
    return build_model(config), params, dict(kind="in-memory", path=None)
  ev = config.evaluate
  path = ev.get("checkpoint") or workdir
  if not path:
    raise FileNotFoundError("no checkpoint: set config.evaluate.checkpoint or "
                            "--workdir")
  if not path.startswith("gs://") and not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path!r} (from "
                            f"{'config.evaluate.checkpoint' if ev.get('checkpoint') else '--workdir'})")
  from s2d_jax.models import siglip  # pylint: disable=g-import-not-at-top
  if path.endswith(".npz"):
    kw = {k: v for k, v in dict(config.model).items() if k != "variant"}
    if config.model_name == "vit":
      model, params = siglip.load_vit(path, num_classes=int(config.num_classes), **kw)
    else:
      model, params = siglip.load(path)
    return model, params, dict(kind="npz", path=path)
  from s2d_jax import checkpointing  # pylint: disable=g-import-not-at-top
  params = checkpointing.restore_params(path)
  return build_model(config), params, dict(kind="orbax", path=path)


def zeroshot_fns(model, class_emb) -> tuple[Callable, Callable]:
  """``(apply_fn, output_fn)`` for zero-shot evaluation of a two-tower model.

  ``apply_fn(v, images, **kw)`` runs the image tower only (so only it is
  quantized); ``output_fn`` maps its output to ``zimg @ class_embᵀ``
  ``(B, classes)``. ``class_emb (C, D)``: L2-normalised class embeddings.
  """
  from s2d_jax.models import zeroshot  # pylint: disable=g-import-not-at-top
  emb = jnp.asarray(class_emb, jnp.float32)

  def apply_fn(v, images, **kw):
    return model.apply(v, images, None, **kw)

  return apply_fn, lambda out: zeroshot.zeroshot_logits(out[0], emb)


def _zeroshot_from_config(config, model, params):
  """Class embeddings from the float text tower (tokenizer, names, templates)."""
  from s2d_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from s2d_jax.models import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  from s2d_jax.models import zeroshot  # pylint: disable=g-import-not-at-top
  ev = config.evaluate
  names = ev.get("classnames")
  if names is None:
    info = input_pipeline.get_info(ev.data.name, ev.get("data_dir"))
    names = info.features["label"].names
  tok = tok_lib.Tokenizer(**dict(ev.get("tokenizer", {}) or {}))
  emb = zeroshot.class_embeddings(model, params, tok, list(names),
                                  ev.get("templates"))
  return zeroshot_fns(model, emb)


def evaluate(config, workdir: str | None, *, params=None, devices=None,
             progress: bool = True, write: bool = True) -> dict[str, Any]:
  """Runs the evaluation described by ``config.evaluate``; writes the report.

  ``params`` (e.g. from the trainer) skips checkpoint loading. Writes
  ``workdir/report.json`` and ``workdir/plots/`` when ``write``. Reads
  ``config.evaluate``: data, pp, batch_size, data_dir, kind, settings,
  calib_batches, max_batches, checkpoint, and optionally pcdr_examples (8),
  collect_stats (True), classnames / templates / tokenizer (zero-shot).
  """
  from s2d_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  ev = config.evaluate
  settings = parse_settings(list(ev.settings))  # unknown names fail early
  devices = list(devices) if devices is not None else jax.local_devices()
  if ev.batch_size % len(devices):
    raise ValueError(f"config.evaluate.batch_size={ev.batch_size} does not divide "
                     f"among {len(devices)} devices")
  kind = ev.get("kind", "classification")
  want = {"classification": "vit", "zeroshot": "two_towers"}.get(kind)
  if want is None:
    raise ValueError(f"config.evaluate.kind={kind!r}; expected 'classification' "
                     "or 'zeroshot'")
  if config.model_name != want:
    raise ValueError(f"config.evaluate.kind={kind!r} needs model_name={want!r}, "
                     f"got {config.model_name!r}")
  model, params, ckpt = load_model(config, workdir, params)
  if kind == "classification":
    apply_fn, output_fn = model.apply, (lambda out: out[0])
  else:
    apply_fn, output_fn = _zeroshot_from_config(config, model, params)
  data_dir = ev.get("data_dir") or config.get("input", {}).get("data_dir")
  ds, nb = input_pipeline.get_eval_dataset(
      ev.data.name, ev.data.split, preprocess=ev.pp, batch_size=ev.batch_size,
      data_dir=data_dir)
  _log(f"evaluate: {ev.data.name}[{ev.data.split}] {nb} batches of "
       f"{ev.batch_size} on {len(devices)} devices; settings "
       f"{[s.name if s else FLOAT for s in settings]}", progress)
  report = evaluate_model(
      apply_fn, {"params": params}, ds.as_numpy_iterator(), settings=settings,
      output_fn=output_fn, devices=devices,
      calib_batches=int(ev.get("calib_batches", 4)),
      max_batches=ev.get("max_batches"), num_batches=nb, progress=progress,
      pcdr_examples=int(ev.get("pcdr_examples", 8)),
      collect_stats=bool(ev.get("collect_stats", True)))
  report["model"] = dict(name=config.model_name, kind=kind,
                         config=_jsonable(dict(config.model)))
  report["checkpoint"] = dict(ckpt, **params_identity(params))
  report["data"] = dict(name=ev.data.name, split=ev.data.split, pp=ev.pp,
                        batch_size=ev.batch_size, num_batches=nb)
  if write and workdir:
    write_report(report, workdir)
  print(format_table(report))
  return report


def _jsonable(x):
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.generic,)):
    return x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  if x is None or isinstance(x, (bool, int, float, str)):
    return x
  return str(x)


def write_report(report: Mapping[str, Any], workdir: str) -> str:
  """``workdir/report.json`` (non-finite floats as strings) and plots."""
  from s2d_jax import plots  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "report.json")
  with open(path, "w") as f:
    json.dump(_jsonable(report), f, indent=1, sort_keys=True)
  plots.save_all(report, os.path.join(workdir, "plots"))
  return path


def format_table(report: Mapping[str, Any]) -> str:
  """A readable table: setting, W/A bits, top-1, Δ vs float, examples."""
  acc = report["accuracy"]
  base = acc.get(FLOAT)
  rows = [("setting", "W", "A", "top-1 %", "Δ vs float", "examples")]
  for name, a in acc.items():
    s = report["settings"][name]
    w, ab = ("-", "-") if s.get("float") else (str(s["w_bits"]), str(s["a_bits"]))
    d = "" if base is None or name == FLOAT else f"{100 * (a - base):+.2f}"
    rows.append((name, w, ab, f"{100 * a:.2f}", d,
                 str(report["counts"][name]["total"])))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  massive = [k for k, v in report.get("layers", {}).items() if v.get("massive")]
  if "layers" in report:
    top = max(report["layers"].items(), key=lambda kv: kv[1]["max_abs"])
    lines.append(f"largest activation: {top[1]['max_abs']:.1f} at {top[0]}; "
                 f"{len(massive)} layer(s) with massive activations")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  from s2d_jax import config_utils  # pylint: disable=g-import-not-at-top
  argv = sys.argv[1:] if argv is None else argv
  config, workdir, _ = config_utils.parse_cli(argv)
  return evaluate(config, workdir)


if __name__ == "__main__":
  main()
