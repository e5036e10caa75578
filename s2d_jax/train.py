r"""Fine-tuning trainer: AdamW / AdamW + S2D / QAT, one CPU to a TPU pod.

    python -m s2d_jax.train --config configs/siglip2_b16_384_i1k.py:s2d=True \
        --workdir /tmp/run [--config.lr=1e-4 ...]

One step (global batch B, params θ, jitted once; shardings fixed):

    g      = ∇_θ L(θ; batch)                        L: softmax / sigmoid cross-entropy
                                                    (classifier) or SigLIP sigmoid loss
                                                    (two towers); through STE fake-quant
                                                    under QAT
    g      = g · min(1, c / ‖g‖₂)                   global-norm clipping (c > 0)
    g      = g + λ Σ_{i<k_W} σ_i^n u_i v_iᵀ          S2D (per selected kernel W, when on)
    θ      = AdamW(g; lr_t, wd · mask)              decoupled decay on kernels only
    lr_t   = lr · t / T_w (t < T_w),  then lr · (f + (1-f)·½(1 + cos(π (t-T_w)/(T-T_w))))

Every `s2d.refresh_every` steps (and at step 0) PCDR re-selects k_W ∈ [0, K_max] per
kernel from the matmul inputs of `s2d.pcdr_batch` images of the current training batch
(`capture_matmul_inputs` → `pcdr.select_active` → `optim.set_active`); the counts are
values in the optimizer state, so the train step is never recompiled.

Parallelism: a 2-D mesh ('data', 'fsdp') over all devices of all processes; the
batch is split over both axes, params and optimizer state are replicated over 'data'
and, with `mesh.fsdp > 1`, split along their largest dimension that the fsdp size
divides (big_vision's FSDP rule). Multi-host: each process feeds its
1/process_count of the batch (`jax.make_array_from_process_local_data`);
`--num_processes/--process_id/--coordinator_address` (or `--distributed` on TPU pods)
call `jax.distributed.initialize`.

Checkpoints (s2d_jax/checkpointing.py): params, optimizer state (S2D bases, active
counts, Adam moments), step and data position every `ckpt_every` steps and at the end;
a restarted run resumes from the latest and continues exactly (same data order, same
dropout keys, same PCDR refresh steps). At the end the final params are exported as a
big_vision npz (`WORKDIR/params.npz`) and evaluated (`WORKDIR/report.json`).

Start-up checks (before anything is written): config keys and values, dataset
present, batch divisible by devices, `model_init` / existing checkpoints compatible
with the configured model.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from s2d_jax import checkpointing
from s2d_jax import config_utils
from s2d_jax import metrics as metrics_lib

LOSSES = ('softmax_xent', 'sigmoid_xent')
MODEL_NAMES = ('vit', 'two_towers')


# ----------------------------------------------------------------------------------
# Config validation
# ----------------------------------------------------------------------------------

def validate_config(config: mlc.ConfigDict) -> None:
  """Raises ValueError naming the key for every inconsistent or out-of-range value."""
  def need(cond, key, msg):
    if not cond:
      raise ValueError(f'config.{key}: {msg}')

  known = set(config_utils.default_train_config().keys())
  unknown = sorted(set(config.keys()) - known)
  need(not unknown, unknown[0] if unknown else '', f'unknown top-level key(s) '
       f'{unknown}; known: {sorted(known)}')
  need(config.model_name in MODEL_NAMES, 'model_name',
       f'{config.model_name!r} is not one of {MODEL_NAMES}')
  if config.model_name == 'vit':
    need(int(config.num_classes) > 0, 'num_classes', 'must be > 0 for a classifier')
    need(config.loss in LOSSES, 'loss', f'{config.loss!r} is not one of {LOSSES}')
  steps, epochs = int(config.get('total_steps') or 0), float(
      config.get('total_epochs') or 0)
  need((steps > 0) != (epochs > 0), 'total_steps',
       f'set exactly one of total_steps ({steps}) / total_epochs ({epochs}) > 0')
  need(config.lr > 0, 'lr', f'must be > 0, got {config.lr}')
  need(config.wd >= 0, 'wd', f'must be >= 0, got {config.wd}')
  need(0 <= config.warmup_frac < 1, 'warmup_frac', 'must be in [0, 1)')
  need(config.warmup_steps >= 0, 'warmup_steps', 'must be >= 0')
  need(0 <= config.min_lr_frac <= 1, 'min_lr_frac', 'must be in [0, 1]')
  need(config.grad_clip_norm >= 0, 'grad_clip_norm', 'must be >= 0 (0 = off)')
  need(int(config.input.batch_size) > 0, 'input.batch_size', 'must be > 0')
  need(config.log_every > 0, 'log_every', 'must be > 0')
  need(config.ckpt_every >= 0, 'ckpt_every', 'must be >= 0 (0 = only at the end)')
  need(config.keep_ckpts >= 1, 'keep_ckpts', 'must be >= 1')
  need(int(config.mesh.fsdp) == -1 or int(config.mesh.fsdp) >= 1, 'mesh.fsdp',
       f'must be >= 1 or -1 (all devices), got {config.mesh.fsdp}')
  s = config.s2d
  if s.enabled:
    need(s.strength >= 0, 's2d.strength', 'must be >= 0')
    need(s.power > 0, 's2d.power', 'must be > 0')
    need(int(s.k_max) >= 1, 's2d.k_max', 'must be >= 1')
    need(0 < s.tau <= 1, 's2d.tau', 'must be in (0, 1]')
    need(int(s.refresh_every) >= 0, 's2d.refresh_every',
         'must be >= 0 (0 = select once at the start)')
    need(int(s.pcdr_batch) >= 1, 's2d.pcdr_batch', 'must be >= 1')
  if config.qat.enabled:
    need(config.model_name == 'vit', 'qat.enabled', 'QAT is implemented for the vit '
         'classifier only')
    from s2d_jax import quant  # pylint: disable=g-import-not-at-top
    try:
      quant.get_setting(config.qat.setting)
    except (KeyError, ValueError) as e:
      raise ValueError(f'config.qat.setting: {e}') from e


# ----------------------------------------------------------------------------------
# Mesh and shardings
# ----------------------------------------------------------------------------------

def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
  """Mesh ('data', 'fsdp') over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  fsdp = n if fsdp == -1 else int(fsdp)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f'config.mesh.fsdp={fsdp} does not divide the {n} devices')
  arr = np.asarray(devices, dtype=object).reshape(n // fsdp, fsdp)
  return Mesh(arr, ('data', 'fsdp'))


def fsdp_spec(shape, fsdp_size: int) -> P:
  """Split the largest dimension that `fsdp_size` divides over 'fsdp'; else replicate.

  Ties go to the later dimension (the output side of a kernel).
  """
  if fsdp_size <= 1 or not shape:
    return P()
  best = None
  for i, d in enumerate(shape):
    if d % fsdp_size == 0 and d >= fsdp_size and (best is None or d >= shape[best]):
      best = i
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = 'fsdp'
  return P(*spec)


def tree_shardings(tree, mesh: Mesh):
  """NamedSharding per leaf of an (abstract) tree, by `fsdp_spec` of its shape."""
  size = mesh.shape['fsdp']
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), size)),
                      tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(('data', 'fsdp')))


# ----------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------

def _path_str(path) -> str:
  return checkpointing._path_str(path)  # pylint: disable=protected-access


def weight_decay_mask(params) -> Any:
  """True for leaves named 'kernel' with ndim >= 2 (no decay on biases, norms, posemb,
  cls/probe tokens, temperature)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: _path_str(p).split('/')[-1] == 'kernel' and np.ndim(x) >= 2,
      params)


def s2d_mask(params, exclude=()) -> Any:
  """Kernels (ndim >= 2) whose path matches none of the `exclude` regexes."""
  pats = [re.compile(e) for e in exclude]
  def sel(p, x):
    s = _path_str(p)
    return (s.split('/')[-1] == 'kernel' and np.ndim(x) >= 2
            and not any(r.search(s) for r in pats))
  return jax.tree_util.tree_map_with_path(sel, params)


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
    from s2d_jax import optim  # pylint: disable=g-import-not-at-top
    s = config.s2d
    s2d_tx = optim.s2d(
        k=int(s.k_max), strength=s.strength, power=s.power, iters=int(s.iters),
        mask=s2d_mask(abstract_params, tuple(s.exclude)), k_max=int(s.k_max),
        decoupled=bool(s.decoupled),
        learning_rate=sched if s.decoupled else None, seed=int(config.seed))
  adamw = optax.adamw(sched, b1=config.b1, b2=config.b2, eps=config.eps,
                      weight_decay=config.wd, mask=weight_decay_mask)
  if s2d_tx is not None and not config.s2d.decoupled:
    parts.append(s2d_tx)       # coupled (paper): S2D gradient goes through Adam
  parts.append(adamw)
  if s2d_tx is not None and config.s2d.decoupled:
    parts.append(s2d_tx)       # decoupled: -lr_t·λ·Σσ^n u vᵀ added after AdamW
  return optax.chain(*parts), sched


# ----------------------------------------------------------------------------------
# Model, losses
# ----------------------------------------------------------------------------------

def build_model(config):
  """The linen module named by config.model_name with config.model kwargs."""
  kw = config.model.to_dict() if hasattr(config.model, 'to_dict') else dict(
      config.model)
  if config.model_name == 'vit':
    from s2d_jax.models import vit  # pylint: disable=g-import-not-at-top
    return vit.Model(int(config.num_classes), **kw)
  from s2d_jax.models import two_towers  # pylint: disable=g-import-not-at-top
  return two_towers.Model(**kw)


def softmax_xent(logits, labels, num_classes, smoothing=0.0):
  """mean_b −Σ_c y_bc log softmax(z_b)_c with y = (1−ε)·onehot + ε/C."""
  y = jax.nn.one_hot(labels, num_classes)
  if smoothing:
    y = y * (1 - smoothing) + smoothing / num_classes
  return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits), axis=-1))


def sigmoid_xent(logits, labels, num_classes):
  """mean_b −Σ_c [y log σ(z) + (1−y) log σ(−z)] (big_vision's sigmoid_xent)."""
  y = jax.nn.one_hot(labels, num_classes)
  ll = y * jax.nn.log_sigmoid(logits) + (1 - y) * jax.nn.log_sigmoid(-logits)
  return -jnp.mean(jnp.sum(ll, axis=-1))


def make_loss_fn(config, model, apply_fn=None) -> Callable:
  """loss_fn(params, batch, rng) -> (loss, aux {'acc': ...})."""
  apply_fn = apply_fn or model.apply
  if config.model_name == 'vit':
    n = int(config.num_classes)

    def loss_fn(params, batch, rng):
      logits, _ = apply_fn({'params': params}, batch['image'], train=True,
                           rngs={'dropout': rng})
      logits = logits.astype(jnp.float32)
      if config.loss == 'softmax_xent':
        loss = softmax_xent(logits, batch['label'], n, config.label_smoothing)
      else:
        loss = sigmoid_xent(logits, batch['label'], n)
      acc = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
      return loss, {'acc': acc}
    return loss_fn

  from s2d_jax.models import two_towers  # pylint: disable=g-import-not-at-top

  def tt_loss_fn(params, batch, rng):
    zimg, ztxt, out = apply_fn({'params': params}, batch['image'], batch['labels'],
                               train=True, rngs={'dropout': rng})
    loss = two_towers.sigmoid_loss(zimg, ztxt, out['t'], out.get('b'))
    # image -> text retrieval top-1 within the batch
    acc = jnp.mean(jnp.argmax(zimg @ ztxt.T, -1) == jnp.arange(zimg.shape[0]))
    return loss, {'acc': acc}
  return tt_loss_fn


def model_inputs_keys(config) -> tuple[str, ...]:
  return ('image', 'label') if config.model_name == 'vit' else ('image', 'labels')


def model_inputs(config, batch_like) -> tuple:
  """Positional model inputs of a batch (for init / shape inference)."""
  if config.model_name == 'vit':
    return (batch_like['image'],)
  return (batch_like['image'], batch_like['labels'])


# ----------------------------------------------------------------------------------
# Spectral logging
# ----------------------------------------------------------------------------------

def largest_kernels(params, top: int) -> list[str]:
  """Paths of the `top` kernels (ndim >= 2) with the most elements per layer."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  cands = []
  for p, x in flat:
    s = _path_str(p)
    if s.split('/')[-1] != 'kernel' or np.ndim(x) < 2:
      continue
    per_layer = int(np.prod(np.shape(x))) // (np.shape(x)[0] if _is_scanned(s) else 1)
    cands.append((per_layer, s))
  cands.sort(key=lambda t: (-t[0], t[1]))
  return [s for _, s in cands[:top]]


def _is_scanned(path: str) -> bool:
  return 'encoderblock' in path.split('/')


def _get(tree, path: str):
  for k in path.split('/'):
    tree = tree[k]
  return tree


def sigma_max_fn(paths: list[str]) -> Callable:
  """params -> {path: σ_max} (max over layers for scanned kernels), exact SVD."""
  from s2d_jax import spectral  # pylint: disable=g-import-not-at-top

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


# ----------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------

def num_examples(data_cfg, data_dir=None) -> int:
  from s2d_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.num_examples(data_cfg['name'], data_cfg['split'],
                                     data_dir=data_dir)


def total_steps_of(config, n_examples: int | None) -> int:
  if int(config.total_steps or 0) > 0:
    return int(config.total_steps)
  return max(1, int(math.ceil(config.total_epochs * n_examples
                              / int(config.input.batch_size))))


def input_spec(config, process_index: int, process_count: int) -> dict:
  """element_spec (batched TensorSpecs) of the training pipeline."""
  from s2d_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  ds = input_pipeline.get_dataset(
      config.input.data['name'], config.input.data['split'],
      preprocess=config.input.pp,
      batch_size=int(config.input.batch_size) // process_count,
      process_index=process_index, process_count=process_count,
      shuffle_buffer_size=int(config.input.shuffle_buffer_size),
      seed=int(config.seed), data_dir=config.input.get('data_dir'))
  return dict(ds.element_spec)


def train_iterator(config, start_step: int, process_index: int, process_count: int):
  """Local (per-process) numpy batches, starting after `start_step` batches."""
  from s2d_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  local_bs = int(config.input.batch_size) // process_count
  return input_pipeline.train_iterator(
      config.input.data['name'], config.input.data['split'],
      preprocess=config.input.pp, batch_size=local_bs,
      process_index=process_index, process_count=process_count,
      shuffle_buffer_size=int(config.input.shuffle_buffer_size), seed=int(config.seed),
      data_dir=config.input.get('data_dir'), start_step=int(start_step))


# ----------------------------------------------------------------------------------
# Initialisation
# ----------------------------------------------------------------------------------

def load_init_params(config, model, abstract_params, example_inputs) -> Any:
  """Params from config.model_init (npz), checked against the configured model."""
  from s2d_jax.models import siglip  # pylint: disable=g-import-not-at-top
  path = config.model_init
  if not os.path.exists(path) and not path.startswith('gs://'):
    raise FileNotFoundError(f'config.model_init: no such file {path!r}')
  dont_load = tuple(config.model_load.get('dont_load', ()))
  model_kw = {k: v for k, v in dict(config.model).items() if k != 'variant'}
  if config.model_name == 'vit':
    res = tuple(example_inputs[0].shape[1:3])
    _, params = siglip.load_classifier(path, int(config.num_classes), res=res,
                                       **model_kw)
  else:
    _, params = siglip.load(path, **model_kw)
  params = flax.core.unfreeze(params)
  pats = [re.compile(d) for d in dont_load]
  want = checkpointing.fingerprint(abstract_params)
  got = checkpointing.fingerprint(params)
  keep = {k: v for k, v in want.items() if not any(r.fullmatch(k) for r in pats)}
  got_kept = {k: v for k, v in got.items() if not any(r.fullmatch(k) for r in pats)}
  checkpointing.compare_fingerprints(keep, got_kept, f'config.model_init {path!r}')
  return params, pats


def init_params(config, model, rng, example_inputs, abstract_params, shardings):
  """Random init (jitted onto `shardings`), then model_init's params where loaded."""
  init = jax.jit(lambda r: flax.core.unfreeze(model.init(r, *example_inputs))['params'],
                 out_shardings=shardings)
  params = init(rng)
  if not config.model_init:
    return params
  loaded, pats = load_init_params(config, model, abstract_params, example_inputs)
  flat_l = {k: v for k, v in _flatten(loaded).items()}

  def pick(path, cur, sh):
    s = _path_str(path)
    if any(r.fullmatch(s) for r in pats) or s not in flat_l:
      return cur
    return jax.device_put(np.asarray(flat_l[s], dtype=cur.dtype), sh)
  return jax.tree_util.tree_map_with_path(pick, params, shardings)


def _flatten(tree) -> dict:
  return {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ----------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------

def _global_batch(local: Mapping[str, np.ndarray], sharding, process_count: int):
  out = {}
  for k, v in local.items():
    if k.startswith('_'):
      continue
    v = np.asarray(v)
    gshape = (v.shape[0] * process_count,) + v.shape[1:]
    out[k] = jax.make_array_from_process_local_data(sharding, v, gshape)
  return out


def _check_dataset(config):
  """Fails early (nothing written) if a dataset is missing; returns #train examples."""
  try:
    n = num_examples(config.input.data, config.input.get('data_dir'))
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(
        f'config.input.data: dataset {config.input.data["name"]!r} split '
        f'{config.input.data["split"]!r} is not available (data_dir='
        f'{config.input.get("data_dir")!r}): {e}') from e
  return n


def train(config: mlc.ConfigDict, workdir: str, *,
          on_step: Callable[[int], None] | None = None, echo: bool = True) -> dict:
  """Runs (or resumes) training in `workdir`; returns a summary dict.

  `on_step(step)` is called after each completed step (after any checkpoint of that
  step); tests use it to simulate a crash.
  """
  validate_config(config)
  pidx, pcount = jax.process_index(), jax.process_count()
  if int(config.input.batch_size) % jax.device_count():
    raise ValueError(
        f'config.input.batch_size={config.input.batch_size} is not divisible by the '
        f'{jax.device_count()} devices')
  n_train = _check_dataset(config)
  total = total_steps_of(config, n_train)
  if config.model_init and not config.model_init.startswith('gs://') and \
      not os.path.exists(config.model_init):
    raise FileNotFoundError(f'config.model_init: no such file {config.model_init!r}')

  mesh = make_mesh(int(config.mesh.fsdp))
  data_sh = batch_sharding(mesh)
  model = build_model(config)
  rng = jax.random.PRNGKey(int(config.seed))
  rng_init, rng_drop = jax.random.split(rng)

  # Shapes for init from the pipeline's element spec (nothing is read yet).
  spec = input_spec(config, pidx, pcount)
  ex = {k: np.zeros((1,) + tuple(v.shape[1:]), v.dtype.as_numpy_dtype)
        for k, v in spec.items() if not k.startswith('_')}
  for k in model_inputs_keys(config):
    if k not in ex:
      raise ValueError(f'config.input.pp: batches have keys {sorted(ex)}, the '
                       f'{config.model_name} model needs {k!r}')
  example_inputs = model_inputs(config, ex)
  abstract_params = jax.eval_shape(
      lambda r: flax.core.unfreeze(model.init(r, *example_inputs))['params'], rng_init)
  if config.model_init:  # start-up check before anything is written
    load_init_params(config, model, abstract_params, example_inputs)
  param_sh = tree_shardings(abstract_params, mesh)

  tx, sched = make_optimizer(config, total, abstract_params)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_sh = tree_shardings(abstract_opt, mesh)

  # Existing checkpoints: compatible with this model? (before writing anything)
  ckpt_dir = checkpointing.checkpoint_dir(workdir)
  resume_step = None
  has_ckpts = os.path.isdir(ckpt_dir)
  if pcount > 1:
    # Every process must take the same branch (orbax syncs inside both), and on a
    # shared filesystem process 0 may already have created the directory by the time
    # another process looks: use process 0's view. The broadcast is also a barrier,
    # so nobody creates the directory before everyone has looked.
    has_ckpts = bool(multihost_utils.broadcast_one_to_all(np.asarray(has_ckpts)))
  if has_ckpts:
    ro = checkpointing.Checkpointer(workdir, create=False)
    resume_step = ro.latest_step()
    if resume_step is not None:
      ro.check_compatible(abstract_params, resume_step)
    ro.close()

  # --- from here on we write into workdir ---
  os.makedirs(workdir, exist_ok=True)
  if pidx == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  ckpt = checkpointing.Checkpointer(workdir, max_to_keep=int(config.keep_ckpts))
  writer = metrics_lib.MetricWriter(os.path.join(workdir, 'metrics.jsonl'),
                                    enabled=pidx == 0,
                                    stream=sys.stdout if echo else None)

  if resume_step is not None:
    with_sh = lambda a, s: jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), a, s)
    params, opt_state, meta = ckpt.restore(with_sh(abstract_params, param_sh),
                                           with_sh(abstract_opt, opt_sh), resume_step)
    start = int(meta['step'])
    if meta.get('data', {}).get('process_count', pcount) != pcount and echo:
      print(f'warning: resuming with {pcount} processes, checkpoint had '
            f'{meta["data"]["process_count"]}: the data order changes', flush=True)
  else:
    params = init_params(config, model, rng_init, example_inputs, abstract_params,
                         param_sh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    start = 0

  # QAT: STE fake-quant forward (static settings: calibrate on the first batch).
  apply_fn = model.apply
  if config.qat.enabled:
    from s2d_jax import quant, quant_model  # pylint: disable=g-import-not-at-top
    setting = quant.get_setting(config.qat.setting)
    calib = None
    if setting.needs_calibration:
      # batch 0 with the current params (a resumed run re-calibrates: static-range
      # QAT resumes approximately; dynamic settings resume exactly)
      first = next(iter(train_iterator(config, 0, pidx, pcount)))
      g = _global_batch(first, data_sh, pcount)
      calib = quant_model.calibrate(model.apply, setting, {'params': params},
                                    [model_inputs(config, g)], train=False)
    apply_fn = quant_model.quantized_apply(model.apply, setting, calibration=calib,
                                           ste=True)
  loss_fn = make_loss_fn(config, model, apply_fn)

  repl = NamedSharding(mesh, P())

  # Buffer donation saves a copy of params + optimizer state on TPU/GPU; on CPU
  # (tests, the demo) a donated multi-device S2D step was seen to hang in XLA:CPU.
  donate = (0, 1) if jax.default_backend() != 'cpu' else ()

  @functools.partial(jax.jit, donate_argnums=donate,
                     out_shardings=(param_sh, opt_sh, repl))
  def train_step(params, opt_state, batch, step):
    drop = jax.random.fold_in(rng_drop, step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch, drop)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {'loss': loss, 'grad_norm': optax.global_norm(grads),
                               **aux}

  refresh = None
  if config.s2d.enabled:
    refresh = _make_pcdr_refresh(config, model, opt_sh, repl)

  sig_paths = largest_kernels(abstract_params, int(config.sigma_log_top))
  sigma_fn = jax.jit(sigma_max_fn(sig_paths), out_shardings=repl) if sig_paths else None

  data_meta = lambda step: {'data': {'batches_consumed': int(step),
                                     'process_count': pcount,
                                     'seed': int(config.seed)}}
  it = iter(train_iterator(config, start, pidx, pcount)) if start < total else None
  t_last, step_last = time.time(), start
  last_metrics, active = {}, None
  step = start
  try:
    while step < total:
      local = next(it)
      batch = _global_batch(local, data_sh, pcount)
      if refresh is not None and _is_refresh_step(step, int(config.s2d.refresh_every)):
        opt_state, active = refresh(params, opt_state, batch['image'])
        # Wait before the step: on XLA:CPU the two programs running concurrently
        # (async dispatch) were seen to deadlock; costs nothing measurable on TPU.
        jax.block_until_ready(opt_state)
      params, opt_state, m = train_step(params, opt_state, batch,
                                        jnp.asarray(step, jnp.int32))
      step += 1
      if step % int(config.log_every) == 0 or step == total:
        m = jax.device_get(m)
        now = time.time()
        rec = {'loss': m['loss'], 'acc': m['acc'], 'grad_norm': m['grad_norm'],
               'lr': float(sched(step - 1)),
               'steps_per_sec': (step - step_last) / max(now - t_last, 1e-9)}
        if sigma_fn is not None:
          sig = jax.device_get(sigma_fn(params))
          rec['sigma_max'] = max(float(v) for v in sig.values())
          for k, v in sig.items():
            rec[f'sigma_max/{k}'] = v
        if config.s2d.enabled:
          rec.update(_s2d_log(opt_state))
        last_metrics = writer.write(step, rec, echo=echo)
        t_last, step_last = time.time(), step
      if config.ckpt_every and step % int(config.ckpt_every) == 0 and step < total:
        ckpt.save(step, params, opt_state, data_meta(step))
      if on_step is not None:
        on_step(step)
    if start < total or ckpt.latest_step() != total:
      ckpt.save(total, params, opt_state, data_meta(total))
  finally:
    ckpt.close()
    writer.close()

  result = {'workdir': workdir, 'total_steps': total, 'start_step': start,
            'metrics': last_metrics, 'params': params}
  if config.export_npz and pidx == 0:
    from s2d_jax.models import siglip  # pylint: disable=g-import-not-at-top
    npz = os.path.join(workdir, 'params.npz')
    tmp = npz + '.tmp.npz'
    siglip.save(tmp, jax.device_get(params))
    os.replace(tmp, npz)
    result['npz'] = npz
  return result


def _is_refresh_step(step: int, every: int) -> bool:
  """PCDR re-selection happens before steps 0, m, 2m, ... (only step 0 if m == 0)."""
  return step == 0 if every == 0 else step % every == 0


def _s2d_log(opt_state) -> dict:
  """Active S2D components (total) and the largest tracked σ estimate."""
  from s2d_jax import optim  # pylint: disable=g-import-not-at-top
  st = optim.find_s2d_state(opt_state)
  out = {}
  active = getattr(st, 'active', None)
  if active is not None:
    out['s2d_active'] = int(sum(int(np.sum(np.asarray(jax.device_get(a))))
                                for a in jax.tree.leaves(active)))
  sig = optim.sigma_estimates(opt_state)
  if sig:
    out['s2d_sigma_max'] = float(max(float(np.max(np.asarray(jax.device_get(v))))
                                     for v in sig.values()))
  return out


def _make_pcdr_refresh(config, model, opt_sh, repl):
  """(params, opt_state, images) -> (opt_state with new active counts, active).

  capture runs as one jitted program on `pcdr_batch` images (replicated); the PCDR
  of each kernel is its own small jitted program (pcdr.select_active called outside
  jit) and set_active replaces values only, so nothing recompiles after the first
  refresh. (A single fused capture+PCDR program was seen to deadlock XLA:CPU.)
  """
  from s2d_jax import capture, optim, pcdr  # pylint: disable=g-import-not-at-top
  nb = int(config.s2d.pcdr_batch)
  exclude = tuple(config.s2d.exclude)
  pats = [re.compile(e) for e in exclude]

  @functools.partial(jax.jit, out_shardings=repl)
  def capture_fn(params, images):
    imgs = jax.lax.with_sharding_constraint(images[:nb], repl)
    params = jax.lax.with_sharding_constraint(params, repl)
    _, inputs = capture.capture_matmul_inputs(
        model.apply, {'params': params}, imgs, train=False,
        include=lambda path: not any(r.search('/'.join(path) + '/kernel')
                                     for r in pats))
    return inputs

  def refresh(params, opt_state, images):
    inputs = jax.block_until_ready(capture_fn(params, images))
    active = pcdr.select_active(params, inputs, k_max=int(config.s2d.k_max),
                                tau=float(config.s2d.tau),
                                mask=s2d_mask(params, exclude))
    active = jax.block_until_ready(active)
    return optim.set_active(opt_state, active), active
  return refresh


# ----------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------

_DIST_FLAGS = ('coordinator_address', 'num_processes', 'process_id', 'distributed')


def maybe_initialize_distributed(flags: Mapping[str, str]) -> None:
  """jax.distributed.initialize from --coordinator_address/--num_processes/
  --process_id, or with no arguments (TPU pod auto-detection) for --distributed=true."""
  if 'num_processes' in flags or 'coordinator_address' in flags:
    missing = [f for f in ('coordinator_address', 'num_processes', 'process_id')
               if f not in flags]
    if missing:
      raise ValueError(f'multi-process run: missing --{", --".join(missing)}')
    jax.distributed.initialize(
        coordinator_address=flags['coordinator_address'],
        num_processes=int(flags['num_processes']),
        process_id=int(flags['process_id']))
  elif config_utils.autotype(flags.get('distributed', 'false')) is True:
    jax.distributed.initialize()


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  config, workdir, flags = config_utils.parse_cli(argv, extra=_DIST_FLAGS)
  if flags.get('num_processes') and int(flags['num_processes']) > 1:
    # CPU multi-process collectives; harmless on TPU/GPU.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  maybe_initialize_distributed(flags)
  result = train(config, workdir)
  if config.evaluate.enabled and config.model_name == 'vit':
    run_evaluation(config, workdir, result['params'])
  return result


def run_evaluation(config, workdir: str, params) -> dict:
  """End-of-training PTQ evaluation (evaluate.py) → WORKDIR/report.json."""
  from s2d_jax import evaluate  # pylint: disable=g-import-not-at-top
  return evaluate.evaluate(config, workdir, params=params)


if __name__ == '__main__':
  main()
