r"""`python -m s2d_jax.evaluate`: a checkpoint's float, fake-quant and PTQ accuracy
and its outliers, from a config; one to N hosts.

    python -m s2d_jax.evaluate --config CONFIG[:ARG] --workdir DIR \
        [--config.evaluate.settings=float,W8A8,W4A4,RepQ-ViT/W4A4] (--help: all flags)

`evaluate(config, workdir)` is the config-level run, in three modules by concern:

1. `s2d_jax.eval_setup`, before any work: the config (`config_schema.validate`),
   the inputs (evaluation split and preprocessing, calibration images, zero-shot
   tokenizer, its vocabulary and the class names), a writable workdir (local or
   `gs://`), then the model: an npz or an orbax training checkpoint, checked
   against the configured model (shapes, with the config keys that differ) and for
   NaN / Inf (refused unless `config.model_load.allow_nonfinite`);
2. `predict_fns`: the model's logits, or zero-shot logits against the float text
   tower's class embeddings (`config.evaluate.kind`);
3. `s2d_jax.evaluator.evaluate_model`, the core (predict_fn and batches in,
   metrics out, jitted over the global mesh); then process 0 prints the table and
   writes report.json atomically (temporary file + rename) and plots/
   (`s2d_jax.report`).

The names of the one-module evaluator of earlier releases stay importable from
here (`s2d_jax.evaluate.evaluate_model`, `.prepare_inputs`, `.zeroshot_fns`, ...).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from absl import flags
import jax

from s2d_jax import config_schema
from s2d_jax import config_utils
from s2d_jax import eval_setup
from s2d_jax import evaluator
from s2d_jax import parallel
from s2d_jax import ptq
from s2d_jax import report as report_lib

# The evaluator's public names, as before the split (s2d_jax.evaluate.X).
FLOAT = evaluator.FLOAT
MASK_KEY = evaluator.MASK_KEY
evaluate_model = evaluator.evaluate_model
parse_settings = evaluator.parse_settings
params_identity = evaluator.params_identity
zeroshot_fns = evaluator.zeroshot_fns
prepare_inputs = eval_setup.prepare_inputs
check_writable = eval_setup.check_writable
load_model = eval_setup.load_model
nonfinite_params = eval_setup.nonfinite_params
calibration_images = eval_setup.calibration_images


def predict_fns(config, model, params, mesh):
  """(apply_fn, output_fn) of `config.evaluate.kind`: the model's logits, or
  zero-shot logits against the class embeddings of the float text tower (class
  names and templates from the config or the dataset, the configured tokenizer)."""
  if config.evaluate.kind == "classification":
    return model.apply, (lambda out: out[0])
  from s2d_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from s2d_jax.models import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  from s2d_jax.models import zeroshot  # pylint: disable=g-import-not-at-top
  ev = config.evaluate
  names = ev.get("classnames")
  if names is None:
    names = input_pipeline.get_info(
        ev.data.name, eval_setup.eval_data_dir(config)).features["label"].names
  tok = tok_lib.Tokenizer(**dict(ev.get("tokenizer") or {}))
  local = parallel.local_copy(evaluator.replicate({"params": params}, mesh))["params"]
  emb = zeroshot.class_embeddings(model, local, tok, list(names), ev.get("templates"))
  return evaluator.zeroshot_fns(model, emb)


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
  settings = evaluator.parse_settings(list(ev.settings))
  mesh = mesh if mesh is not None else parallel.make_mesh(int(config.mesh.fsdp))
  ndev, pcount = mesh.devices.size, jax.process_count()
  ds, nb = eval_setup.prepare_inputs(config, ndev)
  if write and workdir:
    eval_setup.check_writable(workdir)
  image_shape = tuple(ds.element_spec["image"].shape[1:])
  model, params, ckpt = eval_setup.load_model(config, workdir, mesh, image_shape, params)
  apply_fn, output_fn = predict_fns(config, model, params, mesh)
  calib = None
  if any(isinstance(s, ptq.PTQSetting) for s in settings):
    calib = eval_setup.calibration_images(config, int(ev.calib_images))
  evaluator.log_progress(
      f"evaluate: {ev.data.name}[{ev.data.split}] {nb} batches of "
      f"{ev.batch_size} on {ndev} devices ({pcount} processes); settings "
      f"{[evaluator.setting_name(s) for s in settings]}", progress)
  rep = evaluator.evaluate_model(
      apply_fn, {"params": params}, ds.as_numpy_iterator(), settings=settings,
      output_fn=output_fn, mesh=mesh, calib_batches=int(ev.calib_batches),
      calib_images=calib, max_batches=ev.get("max_batches"), num_batches=nb,
      progress=progress, pcdr_examples=int(ev.pcdr_examples),
      collect_stats=bool(ev.collect_stats))
  rep["model"] = dict(name=config.model_name, kind=ev.kind,
                      config=report_lib.jsonable(dict(config.model)))
  rep["checkpoint"] = dict(ckpt, **evaluator.params_identity(params))
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
