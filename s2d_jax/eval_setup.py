"""The evaluation's checks before any work, and the model it evaluates.

`s2d_jax.evaluate` runs these before the first forward pass, so that a bad input
costs seconds, not an evaluation; each error names the config key or file at fault:

* `prepare_inputs`: the global `evaluate.batch_size` divides among the devices and
  processes; the evaluation dataset and split exist (`evaluate.data`); the
  preprocessing builds and yields 'image' and 'label' (`evaluate.pp`); PTQ settings:
  the calibration split (`input.data`) has `evaluate.calib_images` examples;
  zero-shot: the tokenizer loads, its vocabulary is the text tower's, and class
  names are known. The trainer calls it before its first step.
* `check_writable`: the workdir (local, or remote through `tf.io.gfile`) takes files.
* `load_model`: the one place the evaluator restores params: a big_vision npz (the
  model module's `load`, checked against the configured model) or an orbax training
  checkpoint (its stored fingerprint compared with the configured model before
  anything is read, naming the config keys that differ); params holding NaN / Inf
  are refused (`nonfinite_params`) unless `config.model_load.allow_nonfinite`.
* `calibration_images`: the PTQ settings' calibration images (read, not checked).
"""

from __future__ import annotations

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from s2d_jax import checkpointing
from s2d_jax import config_schema
from s2d_jax import config_utils
from s2d_jax import evaluator
from s2d_jax import fileio
from s2d_jax import parallel
from s2d_jax import ptq
from s2d_jax import tasks


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
  if not fileio.exists(path):
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


def eval_data_dir(config):
  """The tfds data_dir of the evaluation data (`evaluate.data_dir`, else the
  training input's)."""
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
  data_dir = eval_data_dir(config)
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
  return np.asarray(b["image"])[np.asarray(b[evaluator.MASK_KEY]) > 0]
