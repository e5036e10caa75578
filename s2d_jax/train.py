r"""The trainer: AdamW / AdamW + S2D / QAT, one CPU to a multi-host TPU pod.

    python -m s2d_jax.train --config siglip2_b16_384_i1k:s2d=True --workdir /tmp/run \
        [--config.lr=1e-4 ...]   (--help lists every flag)

One step (global batch B, params θ, jitted once; shardings fixed), `train_step`:

    g      = ∇_θ L(θ; batch)                        the task's loss (s2d_jax.tasks):
                                                    softmax / sigmoid cross-entropy
                                                    (classifier) or SigLIP sigmoid loss
                                                    (two towers); through STE fake-quant
                                                    under QAT
    g      = g · min(1, c / ‖g‖₂)                   global-norm clipping (c > 0)
    g      = g + λ Σ_{i<k_W} σ_i^n u_i v_iᵀ          S2D (per selected kernel W, when on)
    θ      = AdamW(g; lr_t, wd · mask)              decoupled decay on kernels only
    lr_t   = lr · t / T_w (t < T_w),  then lr · (f + (1-f)·½(1 + cos(π (t-T_w)/(T-T_w))))

Kernels (weight-decay mask, S2D mask, σ logging, PCDR) are `spectral.kernel_mask`'s.
Every `s2d.refresh_every` steps (and at step 0) PCDR re-selects k_W ∈ [0, K_max] per
kernel from the matmul inputs of `s2d.pcdr_batch` images of the current training batch
(`capture_matmul_inputs` → `pcdr.select_active` → `optim.set_active`); the counts are
values in the optimizer state, so the train step is never recompiled.

Parallelism (`s2d_jax.parallel`): a 2-D mesh ('data', 'fsdp') over all devices of all
processes; the batch is split over both axes, params and optimizer state are
replicated over 'data' and split over 'fsdp' (big_vision's FSDP rule). Each process
feeds its 1/process_count of the batch; `--coordinator_address/--num_processes/
--process_id` (or `--distributed` on TPU pods) call `jax.distributed.initialize`.

Phases of `train` (each in one place):
1. `_startup`: every check before anything is written — config keys and values
   (`config_schema.validate`: finite everywhere), dataset present, batch divisible by
   devices, the evaluation's inputs (`evaluate.prepare_inputs`: split, calibration
   images, tokenizer) when it runs, the init npz read once and checked against the
   model and for NaN / Inf (`model_load.allow_nonfinite`), and the latest checkpoint:
   readable (else `DamagedCheckpointError` naming the step to fall back to) and
   written for this model, optimizer *and* QAT setting (the fingerprints of params,
   optimizer state and extra state; `qat.enabled` / `qat.setting` unchanged; else
   `IncompatibleCheckpointError` saying what differs in config terms, e.g.
   "s2d is on now, off in checkpoint 200").
2. `_restore_or_init`: resume from the latest checkpoint (params, optimizer state
   incl. S2D bases, static-QAT ranges, data position), or initialise (random, then
   `model_init`; static QAT: ranges calibrated on batch 0). Only then is
   `config.json` written; "resuming from step N" is printed (with the config keys
   that differ from the checkpoint's) and the metrics.jsonl records and TensorBoard
   events of steps > N are dropped, so no step is logged twice.
3. the loop: one explicit `while`, logging (metrics.jsonl, TensorBoard, steps/s, ETA)
   and checkpoints every `ckpt_every` steps and at the end; a restarted run continues
   exactly (same data order, dropout keys and PCDR refresh steps). The first step
   whose loss or gradient norm is NaN / Inf is tracked on device (no extra host
   round-trip); before every log line, checkpoint and the export it is checked, and a
   diverged run stops with a `RunError` naming that step and the last good
   checkpoint (exit 1 from the CLI): no NaN checkpoint, no NaN params.npz.
4. export: the final params as a big_vision npz (`WORKDIR/params.npz`, process 0).

QAT (`config.qat`, classifiers): the forward pass is `quant_model.quantized_apply(
..., ste=True)` (straight-through gradients through every weight and activation
quantizer). A static setting (`W4A4-static`, ...) fixes its per-tensor activation
ranges once, before step 0: one float pass (no dropout) of the *initial* params over
training batch 0, the whole global batch (`qat_calibration_fn`: min-max ranges are
the exact min / max over it). The ranges are training state: saved in every
checkpoint (the `extra` item, with its fingerprint) and restored on resume, so a
resumed static-QAT run equals the uninterrupted one bit for bit, as dynamic
settings do (recalibrating on resume, as before, would use the restored params and
change the ranges). Resuming with another `qat.setting` (or QAT switched on / off)
is refused before the workdir is touched.

`train_and_evaluate` adds the evaluation (`s2d_jax.evaluate`, WORKDIR/report.json).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import sys
from typing import Any, Callable, Sequence

from absl import flags
import flax
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from jax.experimental import multihost_utils

from s2d_jax import capture
from s2d_jax import checkpointing
from s2d_jax import config_schema
from s2d_jax import config_utils
from s2d_jax import fileio
from s2d_jax import metrics as metrics_lib
from s2d_jax import optim
from s2d_jax import parallel
from s2d_jax import pcdr
from s2d_jax import quant
from s2d_jax import quant_model
from s2d_jax import spectral
from s2d_jax import tasks
from s2d_jax.data import input_pipeline


# ----------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------

def lr_schedule(config, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr` over T_w steps, cosine decay to lr·min_lr_frac."""
  warmup = int(config.warmup_steps) or int(round(config.warmup_frac * total_steps))
  warmup = min(warmup, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=config.lr * config.min_lr_frac)


def make_optimizer(config, total_steps: int, abstract_params):
  """optax chain: clip → [S2D] → AdamW(schedule, wd on kernels); returns (tx, sched)."""
  sched = lr_schedule(config, total_steps)
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  s2d_tx = None
  if config.s2d.enabled:
    s = config.s2d
    s2d_tx = optim.s2d(
        k=int(s.k_max), strength=s.strength, power=s.power, iters=int(s.iters),
        mask=spectral.kernel_mask(abstract_params, tuple(s.exclude)),
        k_max=int(s.k_max), decoupled=bool(s.decoupled),
        learning_rate=sched if s.decoupled else None, seed=int(config.seed))
  adamw = optax.adamw(sched, b1=config.b1, b2=config.b2, eps=config.eps,
                      weight_decay=config.wd, mask=spectral.kernel_mask)
  if s2d_tx is not None and not config.s2d.decoupled:
    parts.append(s2d_tx)       # coupled (paper): S2D gradient goes through Adam
  parts.append(adamw)
  if s2d_tx is not None and config.s2d.decoupled:
    parts.append(s2d_tx)       # decoupled: -lr_t·λ·Σσ^n u vᵀ added after AdamW
  return optax.chain(*parts), sched


# ----------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------

def train_step(params, opt_state, batch, step, *, apply_fn: Callable,
               loss_fn: Callable, inputs: Sequence[str], tx, rng):
  """One optimizer step; returns (params, opt_state, metrics).

  `apply_fn(variables, *model_inputs, train=True, rngs=...)` (e.g. `model.apply`, or
  its fake-quantized version under QAT), `loss_fn(model_output, batch) -> (loss,
  aux)`, `inputs`: the batch keys fed to the model in order. Dropout keys are
  `fold_in(rng, step)`, so a resumed run draws the same ones. metrics: loss,
  grad_norm = ‖∇L‖₂ (before clipping) and the loss's aux values (e.g. acc).
  """
  drop = jax.random.fold_in(rng, step)

  def loss_of(p):
    out = apply_fn({'params': p}, *(batch[k] for k in inputs), train=True,
                   rngs={'dropout': drop})
    return loss_fn(out, batch)

  (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return params, opt_state, {'loss': loss, 'grad_norm': optax.tree.norm(grads), **aux}


# ----------------------------------------------------------------------------------
# Spectral and S2D logging
# ----------------------------------------------------------------------------------

def largest_kernels(params, top: int) -> list[str]:
  """Paths of the `top` kernels (`spectral.kernel_mask`) with the most entries per
  layer (ties by name)."""
  chosen = spectral.select_kernels(params, spectral.kernel_mask(params))
  cands = sorted((-v.rows * v.cols, name) for name, (_, v) in chosen.items())
  return [name for _, name in cands[:top]]


def _get(tree, path: str):
  for k in path.split('/'):
    tree = tree[k]
  return tree


def sigma_max_fn(paths: list[str]) -> Callable:
  """params -> {path: σ_max} (max over layers for scanned kernels), exact SVD."""

  def f(params):
    out = {}
    for path in paths:
      w = _get(params, path)
      view = spectral.matrix_view(tuple(path.split('/')), w.shape)
      mats = view.to_matrix(w)
      mats = mats.reshape((-1,) + mats.shape[-2:]).astype(jnp.float32)
      out[path] = jnp.max(jnp.linalg.svd(mats, compute_uv=False)[..., 0])
    return out
  return f


def s2d_log(opt_state) -> dict:
  """Active S2D components (total) and the largest tracked σ (traceable; jit it).

  The one place that reads the S2D state for logging (through `optim`'s accessors).
  """
  out = {}
  active = optim.active_counts(opt_state)   # {kernel: (*layers,) int32}
  if active:
    out['s2d_active'] = sum(jnp.sum(a.astype(jnp.int32)) for a in active.values())
  sig = optim.sigma_estimates(opt_state)
  if sig:
    out['s2d_sigma_max'] = jnp.max(jnp.stack([jnp.max(v) for v in sig.values()]))
  return out


def _is_refresh_step(step: int, every: int) -> bool:
  """PCDR re-selection happens before steps 0, m, 2m, ... (only step 0 if m == 0)."""
  return step == 0 if every == 0 else step % every == 0


def _make_pcdr_refresh(config, model, mesh, opt_sh):
  """(params, opt_state, images) -> (opt_state with new active counts, active).

  capture runs as one jitted program on `pcdr_batch` images (replicated); the PCDR
  of each kernel is its own small jitted program (pcdr.select_active called outside
  jit, on each process's local copy of the replicated params and inputs) and
  set_active replaces values only, so nothing
  recompiles after the first refresh. (A single fused capture+PCDR program
  deadlocks XLA:CPU's multi-device collectives: still so with jax 0.10.2, an
  all-gather rendezvous timeout; reproduction: benchmarks/xla_cpu_hangs.py.)
  """
  nb = int(config.s2d.pcdr_batch)
  exclude = tuple(config.s2d.exclude)
  repl = parallel.replicated(mesh)
  sharded = mesh.shape['fsdp'] > 1

  @functools.partial(jax.jit, out_shardings=repl)
  def capture_fn(params, images):
    imgs = jax.lax.with_sharding_constraint(images[:nb], repl)
    params = jax.lax.with_sharding_constraint(params, repl)
    mask = spectral.kernel_mask(params, exclude)
    keep = {spectral.path_str(p[:-1]) for p, m in spectral.leaves_with_paths(mask) if m}
    _, inputs = capture.capture_matmul_inputs(
        model.apply, {'params': params}, imgs, train=False,
        include=lambda path: '/'.join(path) in keep)
    return inputs, (params if sharded else None)

  def refresh(params, opt_state, images):
    inputs, full = jax.block_until_ready(capture_fn(params, images))
    # Replicated values: every process selects on its own first device (the same
    # deterministic programs, no cross-process work).
    p, inputs = parallel.local_copy((full if sharded else params, inputs))
    active = pcdr.select_active(p, inputs, k_max=int(config.s2d.k_max),
                                tau=float(config.s2d.tau),
                                mask=spectral.kernel_mask(p, exclude))
    active = jax.block_until_ready(active)
    opt_state = jax.device_put(optim.set_active(opt_state, active), opt_sh)
    return opt_state, active
  return refresh


# ----------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------

def total_steps_of(config, n_examples: int | None) -> int:
  if int(config.total_steps or 0) > 0:
    return int(config.total_steps)
  return max(1, int(math.ceil(config.total_epochs * n_examples
                              / int(config.input.batch_size))))


def _data_kwargs(config, process_index: int, process_count: int) -> dict:
  return dict(preprocess=config.input.pp,
              batch_size=int(config.input.batch_size) // process_count,
              process_index=process_index, process_count=process_count,
              shuffle_buffer_size=int(config.input.shuffle_buffer_size),
              seed=int(config.seed), data_dir=config.input.get('data_dir'))


def input_spec(config, process_index: int, process_count: int) -> dict:
  """element_spec (batched TensorSpecs) of the training pipeline (nothing read)."""
  ds = input_pipeline.get_dataset(config.input.data['name'], config.input.data['split'],
                                  **_data_kwargs(config, process_index, process_count))
  return dict(ds.element_spec)


def train_iterator(config, start_step: int, process_index: int, process_count: int):
  """Local (per-process) numpy batches, starting after `start_step` batches."""
  return input_pipeline.train_iterator(
      config.input.data['name'], config.input.data['split'],
      start_step=int(start_step), **_data_kwargs(config, process_index, process_count))


def _check_dataset(config) -> int:
  """Fails early (nothing written) if a dataset is missing; returns #train examples."""
  try:
    return input_pipeline.num_examples(config.input.data['name'],
                                       config.input.data['split'],
                                       data_dir=config.input.get('data_dir'))
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(
        f'config.input.data: dataset {config.input.data["name"]!r} split '
        f'{config.input.data["split"]!r} is not available (data_dir='
        f'{config.input.get("data_dir")!r}): {e}') from e


# ----------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------

@dataclasses.dataclass
class _Setup:
  """Everything `_startup` checked and built (nothing written yet)."""
  task: tasks.Task
  model: Any
  mesh: Any
  total: int
  example_inputs: tuple
  abstract_params: Any
  loaded: Any          # model_init params (host; abstract leaves = not loaded) or None
  param_sh: Any
  tx: Any
  sched: Any
  abstract_opt: Any
  opt_sh: Any
  qat_calib: Callable | None   # static QAT: jitted (params, batch) -> ranges
  abstract_extra: Any          # {'qat_calibration': shapes} (static QAT) or None
  resume_step: int | None
  resume_changes: list   # config keys that differ from the resumed checkpoint's


def qat_calibration_fn(config, task: tasks.Task, model, mesh) -> Callable | None:
  """`(params, batch) -> ranges` of a static `config.qat.setting` (None otherwise).

  One float forward pass (`train=False`: no dropout) over the global `batch`,
  jitted over the mesh (`quant_model.calibration_apply`); the ranges
  `{module path: {'quant_calib_<point>': (2,) = (lo, hi), or (depth, 2) scanned}}`
  come back replicated. With the min-max calibrator, lo / hi are the exact min / max
  of the operand over the whole global batch.
  """
  if not config.qat.enabled:
    return None
  setting = quant.get_setting(config.qat.setting)
  if not setting.needs_calibration:
    return None
  cal = quant_model.calibration_apply(model.apply, setting)
  return jax.jit(
      lambda params, batch: cal({'params': params}, *task.model_inputs(batch),
                                train=False),
      out_shardings=parallel.replicated(mesh))


def qat_apply_fn(config, model, calibration=None) -> Callable:
  """The step's forward: `model.apply`, or under QAT its fake-quantized version
  with straight-through gradients (static settings: with `calibration`)."""
  if not config.qat.enabled:
    return model.apply
  return quant_model.quantized_apply(model.apply, config.qat.setting,
                                     calibration=calibration, ste=True)


def _check_qat_unchanged(config, meta: dict, step: int, where: str) -> None:
  """Refuses to resume with another QAT quantizer than checkpoint `step`'s.

  The quantizer (and a static setting's ranges) is part of the training state: a
  run resumed with another one would not continue the checkpoint's run. Checkpoints
  without a stored config are not checked.
  """
  then = meta.get('config')
  if not isinstance(then, dict) or not isinstance(then.get('qat'), dict):
    return
  now = config_utils.config_as_json(config.qat)
  key = lambda q: (bool(q.get('enabled')), q.get('setting') if q.get('enabled')
                   else None)
  if key(now) == key(then['qat']):
    return
  changes = config_utils.config_changes({'qat': now}, {'qat': then['qat']},
                                        f'checkpoint {step}')
  raise checkpointing.IncompatibleCheckpointError(
      f'{where} was written with another QAT quantizer: {"; ".join(changes)}. The '
      'quantizer (and a static setting\'s calibrated ranges) is part of the '
      'training state; resume with the checkpoint\'s config.qat, or start a new '
      'workdir (e.g. from its params with config.model_init)')


def _config_changes(config, meta: dict, step: int) -> list[str]:
  """What differs between `config` and the config stored in checkpoint `step`."""
  then = meta.get('config')
  if not isinstance(then, dict):
    return []
  return config_utils.config_changes(config, then, f'checkpoint {step}')


def _init_file(model_init: str) -> str:
  """The file of `config.model_init`, without a ':sub/tree' selector after '.npz'."""
  m = re.fullmatch(r'(.*?\.npz):[\w/\-]+', model_init)
  return m.group(1) if m else model_init


def _startup(config: mlc.ConfigDict, workdir: str) -> _Setup:
  """Every start-up check, before anything is written (see the module docstring)."""
  config_schema.validate(config)
  task = tasks.get(config)
  pidx, pcount = jax.process_index(), jax.process_count()
  if int(config.input.batch_size) % jax.device_count():
    raise ValueError(
        f'config.input.batch_size={config.input.batch_size} is not divisible by the '
        f'{jax.device_count()} devices')
  total = total_steps_of(config, _check_dataset(config))
  if config.evaluate.enabled:   # split, calibration images, tokenizer: before step 0
    from s2d_jax import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.prepare_inputs(config)
  if config.model_init and not fileio.exists(_init_file(config.model_init)):
    raise FileNotFoundError(f'config.model_init: no such file {config.model_init!r}')
  mesh = parallel.make_mesh(int(config.mesh.fsdp))
  model = task.build(config)

  # Shapes for init from the pipeline's element spec (nothing is read yet).
  spec = input_spec(config, pidx, pcount)
  ex = {k: np.zeros((1,) + tuple(v.shape[1:]), v.dtype.as_numpy_dtype)
        for k, v in spec.items() if not k.startswith('_')}
  missing = [k for k in task.inputs if k not in ex]
  if missing:
    raise ValueError(f'config.input.pp: batches have keys {sorted(ex)}, the '
                     f'{config.model_name} model needs {missing}')
  example_inputs = task.model_inputs(ex)
  abstract_params = jax.eval_shape(
      lambda r: flax.core.unfreeze(model.init(r, *example_inputs))['params'],
      jax.random.PRNGKey(0))
  loaded = None
  if config.model_init:  # read once, checked against the model
    loaded = task.module().load(
        abstract_params, config.model_init, config.model,
        tuple(config.model_load.get('dont_load', ())),
        allow_nonfinite=bool(config.model_load.get('allow_nonfinite', False)))
  param_sh = parallel.tree_shardings(abstract_params, mesh)
  tx, sched = make_optimizer(config, total, abstract_params)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_sh = parallel.tree_shardings(abstract_opt, mesh)
  qat_calib = qat_calibration_fn(config, task, model, mesh)
  abstract_extra = None
  if qat_calib is not None:
    abstract_extra = {'qat_calibration': jax.eval_shape(
        qat_calib, abstract_params, {k: ex[k] for k in task.inputs})}

  # Existing checkpoints: readable, and written for this model and optimizer?
  resume_step, changes = None, []
  has_ckpts = fileio.isdir(checkpointing.checkpoint_dir(workdir))
  if pcount > 1:
    # Every process must take the same branch (orbax syncs inside both), and on a
    # shared filesystem process 0 may already have created the directory by the time
    # another process looks: use process 0's view. The broadcast is also a barrier,
    # so nobody creates the directory before everyone has looked.
    has_ckpts = bool(multihost_utils.broadcast_one_to_all(np.asarray(has_ckpts)))
  if has_ckpts:
    ro = checkpointing.Checkpointer(workdir, create=False)
    try:
      resume_step = ro.latest_step()
      if resume_step is not None:
        meta = ro.read_meta(resume_step)
        changes = _config_changes(config, meta, resume_step)
        _check_qat_unchanged(config, meta, resume_step,
                             f'checkpoint {ro.step_dir(resume_step)}')
        ro.check_compatible(
            abstract_params, resume_step, abstract_opt_state=abstract_opt, meta=meta,
            abstract_extra=abstract_extra, check_extra=True,
            hint=('the config differs: ' + '; '.join(changes)) if changes else '')
    finally:
      ro.close()
  return _Setup(task, model, mesh, total, example_inputs, abstract_params, loaded,
                param_sh, tx, sched, abstract_opt, opt_sh, qat_calib, abstract_extra,
                resume_step, changes)


def _restore_or_init(config, s: _Setup, ckpt: checkpointing.Checkpointer, echo: bool):
  """(params, opt_state, extra, start step): the one place that restores a
  checkpoint. `extra` is the rest of the training state ({'qat_calibration':
  ranges} under static QAT, else None): restored, or calibrated on batch 0 with
  the initial params."""
  if s.resume_step is not None:
    with_sh = lambda a, sh: jax.tree.map(
        lambda x, y: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=y), a, sh)
    extra_abs = None
    if s.abstract_extra is not None:
      repl = parallel.replicated(s.mesh)
      extra_abs = with_sh(s.abstract_extra,
                          jax.tree.map(lambda _: repl, s.abstract_extra))
    params, opt_state, meta, *extra = ckpt.restore(
        with_sh(s.abstract_params, s.param_sh), with_sh(s.abstract_opt, s.opt_sh),
        s.resume_step, abstract_extra=extra_abs)
    had = meta.get('data', {}).get('process_count', jax.process_count())
    if had != jax.process_count() and echo and jax.process_index() == 0:
      print(f'warning: resuming with {jax.process_count()} processes, checkpoint had '
            f'{had}: the data order changes', flush=True)
    return params, opt_state, (extra[0] if extra else None), int(meta['step'])
  init = jax.jit(
      lambda r: flax.core.unfreeze(s.model.init(r, *s.example_inputs))['params'],
      out_shardings=s.param_sh)
  params = init(jax.random.split(jax.random.PRNGKey(int(config.seed)))[0])
  if s.loaded is not None:
    params = jax.tree.map(
        lambda cur, new, sh: cur if isinstance(new, jax.ShapeDtypeStruct) else
        parallel.put_leaf(np.asarray(new, cur.dtype), sh),
        params, s.loaded, s.param_sh)
  opt_state = jax.jit(s.tx.init, out_shardings=s.opt_sh)(params)
  extra = None
  if s.qat_calib is not None:  # static QAT: ranges of the initial params on batch 0
    first = next(iter(train_iterator(config, 0, jax.process_index(),
                                     jax.process_count())))
    extra = {'qat_calibration': s.qat_calib(
        params, parallel.global_batch(_model_keys(first), s.mesh))}
  return params, opt_state, extra, 0


def _track_nonfinite(first, step, m):
  """(first bad step, its loss, its grad norm): step+1 of the first step whose loss
  or gradient norm is NaN / Inf (-1 while none), kept on device."""
  bad_step, loss, gnorm = first
  new = (bad_step < 0) & ~(jnp.isfinite(m['loss']) & jnp.isfinite(m['grad_norm']))
  return (jnp.where(new, step + 1, bad_step),
          jnp.where(new, m['loss'].astype(jnp.float32), loss),
          jnp.where(new, m['grad_norm'].astype(jnp.float32), gnorm))


def _diverged(first, ckpt, workdir: str) -> config_utils.RunError | None:
  """The error for a run whose loss / grad norm went non-finite (None if not)."""
  bad_step, loss, gnorm = (x.item() for x in jax.device_get(first))
  if bad_step < 0:
    return None
  last = ckpt.latest_step()
  if last is None:
    keep = 'no checkpoint was written before it'
    again = 'start again'
  else:
    keep = (f'the last good checkpoint is step {last} in {ckpt.directory} (kept: '
            'nothing after the divergence is saved, no params.npz written)')
    again = f're-run to resume from step {last}'
  return config_utils.RunError(
      f'training diverged in {workdir}: non-finite loss at step {bad_step} (loss '
      f'{loss}, grad_norm {gnorm}); {keep}. Lower config.lr, set '
      f'config.grad_clip_norm, or check the data / model_init, then {again}')


def export_npz(params, path: str) -> str:
  """Writes params as a big_vision npz (process 0), whatever their sharding.

  Params split over processes (FSDP) are gathered to every host first
  (`parallel.to_host`); the write is atomic and all processes wait for it.
  """
  from s2d_jax.models import siglip  # pylint: disable=g-import-not-at-top
  host = parallel.to_host(params)
  if jax.process_index() == 0:
    tmp = path + '.tmp.npz'
    siglip.save(tmp, host)
    fileio.replace(tmp, path)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'export {path}')
  return path


def train(config: mlc.ConfigDict, workdir: str, *,
          on_step: Callable[[int], None] | None = None, echo: bool = True) -> dict:
  """Runs (or resumes) training in `workdir`; returns a summary dict.

  Returns {'workdir', 'total_steps', 'start_step', 'metrics' (last logged),
  'params' (global arrays), 'mesh', 'npz' when exported, and 'qat_calibration'
  (the static ranges trained with) under static QAT}. `on_step(step)` is
  called after each completed step (after any checkpoint of that step); tests use it
  to simulate a crash.
  """
  s = _startup(config, workdir)
  pidx, pcount = jax.process_index(), jax.process_count()

  # --- from here on we write into workdir ---
  fileio.makedirs(workdir)
  ckpt = checkpointing.Checkpointer(workdir, max_to_keep=int(config.keep_ckpts))
  try:
    params, opt_state, extra, start = _restore_or_init(config, s, ckpt, echo)
  except BaseException:
    ckpt.close()
    raise
  if pidx == 0:   # only after a successful restore
    fileio.atomic_write_text(os.path.join(workdir, 'config.json'),
                             config.to_json_best_effort(indent=2))
    if start and echo:
      print(f'resuming from step {start} of {s.total} ({ckpt.directory})'
            + ('; the config differs: ' + '; '.join(s.resume_changes)
               if s.resume_changes else ''), flush=True)
  writer = metrics_lib.MetricWriter(os.path.join(workdir, 'metrics.jsonl'),
                                    enabled=pidx == 0,
                                    stream=sys.stdout if echo else None,
                                    tb_dir=os.path.join(workdir, 'tensorboard'),
                                    start_step=start)
  mesh, total = s.mesh, s.total
  repl = parallel.replicated(mesh)

  # QAT: STE fake-quant forward; static ranges from the (restored) training state.
  apply_fn = qat_apply_fn(config, s.model,
                          extra['qat_calibration'] if extra is not None else None)

  # Buffer donation saves a copy of params + optimizer state on TPU/GPU; on CPU a
  # donated S2D step hangs XLA:CPU (still with jax 0.10.2, on 1, 2 and 8 devices:
  # benchmarks/xla_cpu_hangs.py reproduces it), so CPU runs do not donate.
  donate = (0, 1) if jax.default_backend() != 'cpu' else ()
  step_fn = jax.jit(
      functools.partial(train_step, apply_fn=apply_fn,
                        loss_fn=functools.partial(s.task.loss, config),
                        inputs=s.task.inputs, tx=s.tx,
                        rng=jax.random.split(jax.random.PRNGKey(int(config.seed)))[1]),
      donate_argnums=donate, out_shardings=(s.param_sh, s.opt_sh, repl))
  refresh = (_make_pcdr_refresh(config, s.model, mesh, s.opt_sh)
             if config.s2d.enabled else None)
  sig_paths = largest_kernels(s.abstract_params, int(config.sigma_log_top))
  sigma_fn = jax.jit(sigma_max_fn(sig_paths), out_shardings=repl) if sig_paths else None
  s2d_fn = jax.jit(s2d_log, out_shardings=repl) if config.s2d.enabled else None

  config_json = config_utils.config_as_json(config)
  data_meta = lambda step: {'data': {'batches_consumed': int(step),
                                     'process_count': pcount,
                                     'seed': int(config.seed)},
                            'config': config_json}
  track = jax.jit(_track_nonfinite, out_shardings=repl)
  first_bad = jax.device_put((np.int32(-1), np.float32(0), np.float32(0)), repl)

  def stop_if_diverged():
    err = _diverged(first_bad, ckpt, workdir)
    if err is not None:
      raise err
  it = iter(train_iterator(config, start, pidx, pcount)) if start < total else None
  chrono = metrics_lib.Chrono(total)
  last_metrics = {}
  step = start
  try:
    while step < total:
      batch = parallel.global_batch(_model_keys(next(it)), mesh)
      if refresh is not None and _is_refresh_step(step, int(config.s2d.refresh_every)):
        opt_state, _ = refresh(params, opt_state, batch['image'])
        # Wait before the step: on XLA:CPU the two programs running concurrently
        # (async dispatch) were seen to deadlock; costs nothing measurable on TPU.
        jax.block_until_ready(opt_state)
      step_arr = jnp.asarray(step, jnp.int32)
      params, opt_state, m = step_fn(params, opt_state, batch, step_arr)
      first_bad = track(first_bad, step_arr, m)
      step += 1
      if step == start + 1:
        jax.block_until_ready(m)
        chrono.start(step)   # the first step's compile is not in the rate
      if step % int(config.log_every) == 0 or step == total:
        stop_if_diverged()
        rec = {'total_steps': total, **jax.device_get(m),
               'lr': float(s.sched(step - 1)), **chrono.report(step)}
        if sigma_fn is not None:
          sig = jax.device_get(sigma_fn(params))
          rec['sigma_max'] = max(float(v) for v in sig.values())
          rec.update({f'sigma_max/{k}': v for k, v in sig.items()})
        if s2d_fn is not None:
          rec.update(jax.device_get(s2d_fn(opt_state)))
        last_metrics = writer.write(step, rec, echo=echo)
      if config.ckpt_every and step % int(config.ckpt_every) == 0 and step < total:
        stop_if_diverged()
        ckpt.save(step, params, opt_state, data_meta(step), extra=extra)
      if on_step is not None:
        on_step(step)
    if start < total or ckpt.latest_step() != total:
      stop_if_diverged()
      ckpt.save(total, params, opt_state, data_meta(total), extra=extra)
  finally:
    ckpt.close()
    writer.close()

  result = {'workdir': workdir, 'total_steps': total, 'start_step': start,
            'metrics': last_metrics, 'params': params, 'mesh': mesh}
  if extra is not None:
    result['qat_calibration'] = extra['qat_calibration']
  if config.export_npz:
    result['npz'] = export_npz(params, os.path.join(workdir, 'params.npz'))
  return result


def _model_keys(local: dict) -> dict:
  """Drops pipeline-private keys ('_rng', '_mask', ...) the model must not see."""
  return {k: v for k, v in local.items() if not k.startswith('_')}


def train_and_evaluate(config: mlc.ConfigDict, workdir: str, *, echo: bool = True,
                       **train_kw) -> dict:
  """`train`, then (config.evaluate.enabled) `evaluate.evaluate` on the final params,
  on the training mesh (no host gather): WORKDIR/report.json. Shared by `main` and
  the main job; returns train's dict plus 'report'."""
  from s2d_jax import evaluate  # pylint: disable=g-import-not-at-top
  result = train(config, workdir, echo=echo, **train_kw)
  if config.evaluate.enabled:
    result['report'] = evaluate.evaluate(config, workdir, params=result['params'],
                                         mesh=result['mesh'], progress=echo)
  return result


# ----------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------

USAGE = r"""Fine-tunes a model (AdamW, AdamW + S2D, QAT) and evaluates it.

  python -m s2d_jax.train --config CONFIG[:ARG] --workdir DIR [--config.KEY=VALUE ...]

CONFIG is a config file or a shipped config name (demo, demo_pretrain,
siglip2_b16_384_i1k, siglip2_b16_384_i1k_qat, siglip_b16_224_i1k, siglip_l16_384_i1k,
siglip_so400m14_384_i1k). Writes DIR/checkpoints, metrics.jsonl, tensorboard/,
params.npz and report.json; re-running into DIR resumes from its last checkpoint.

Examples:
  python -m s2d_jax.train --config siglip2_b16_384_i1k:s2d=True --workdir gs://B/run
  python -m s2d_jax.train --config configs/demo.py:s2d=True,data_dir=/tmp/tfds \
      --workdir /tmp/demo --config.total_steps=50
  # two processes (run once per process):
  python -m s2d_jax.train --config demo:size=tiny --workdir /tmp/mh \
      --coordinator_address 127.0.0.1:1234 --num_processes 2 --process_id 0
"""


def main(argv: Sequence[str] | None = None) -> dict:
  fv = flags.FlagValues()
  config_utils.define_flags(fv, workdir_help='Run directory (checkpoints, metrics, '
                            'params.npz, report.json); an existing one resumes.')
  config = config_utils.parse_flags(fv, sys.argv[1:] if argv is None else argv,
                                    usage=USAGE)
  config_utils.maybe_initialize_distributed(fv)
  return train_and_evaluate(config, fv['workdir'].value)


if __name__ == '__main__':
  config_utils.run_cli(main)
