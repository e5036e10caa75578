"""The config schema of the trainer and evaluator, and its validation (one place).

`default_config()` holds every key `train.py` / `evaluate.py` read, with defaults;
config files start from it (`config_utils.default_train_config()`) and set what differs.
`validate(config)` runs before anything is read or written and raises a ValueError
naming the full dotted key for

* a key that is not in the schema, at any depth (`config.s2d.stength`), with the known
  keys beside it; `config.model` is checked against the model's own fields (the task
  table, `s2d_jax.tasks`), `config.evaluate.tokenizer` is free-form (Tokenizer kwargs);
* a value out of range or of the wrong kind (`config.lr: must be > 0`);
* a float that is not finite anywhere in the config (`--config.lr=inf`,
  `config.s2d.strength = float('nan')`, inside lists and free-form sections too);
* an evaluation setting that does not parse (`W4A4-statik`, `RepQ-ViT/W4X4`), so a
  typo is found before training, not after it.

Checks that need the data or the file system (the evaluation split exists, enough
calibration images, the tokenizer file) are `s2d_jax.evaluate.prepare_inputs`; the
trainer runs them with these before its first step.

Schema (defaults in `default_config`):

    seed                      PRNG seed (init, dropout, data order)
    model_name                a task of `s2d_jax.tasks.TASKS`: 'vit' (classifier) or
                              'two_towers' (SigLIP pre-training / zero-shot)
    model                     kwargs of the model module's `Model` (variant, pool_type,
                              scan, ...; two_towers: image=..., text=..., out_dim, ...)
    num_classes               classifier head size (vit)
    model_init                big_vision npz to start from ('' = random init)
    model_load.dont_load      regexes of params not loaded (re-initialised), e.g. head
    model_load.allow_nonfinite  load model_init / evaluate.checkpoint params that hold
                              NaN / Inf (default False: refused, naming the keys)
    input.data.{name,split}   tfds dataset and split; input.data_dir: tfds data_dir
    input.pp                  big_vision preprocessing string for training
    input.batch_size          *global* batch size (split over processes and devices)
    input.shuffle_buffer_size tf.data shuffle buffer per process
    total_epochs|total_steps  training length (exactly one > 0)
    lr, wd                    peak learning rate; AdamW decoupled weight decay
                              (optax: update -= lr·wd·w, applied to kernels only)
    warmup_steps|warmup_frac  linear warmup, then cosine decay to lr·min_lr_frac
    b1, b2, eps               AdamW moments
    grad_clip_norm            clip the task gradient to this global norm (0 = off)
    loss                      'softmax_xent' or 'sigmoid_xent' (vit); sigmoid (towers)
    label_smoothing           for softmax_xent
    s2d.*                     S2D: enabled, strength λ, power n, k_max, tau, refresh_every
                              m (PCDR), pcdr_batch (images used for PCDR), iters,
                              decoupled, exclude (regexes of kernels left alone;
                              default: the classifier head)
    qat.*                     quantization-aware training: enabled, setting ('W4A4')
    mesh.fsdp                 size of the 'fsdp' mesh axis (params/opt-state sharded
                              over it); 1 = pure data parallel, -1 = all devices
    log_every, ckpt_every, keep_ckpts, sigma_log_top (σ_max logged for this many of
    the largest kernels), export_npz (write final params as big_vision npz)
    evaluate.*                the evaluation (`s2d_jax.evaluate`): enabled (after
                              training), data.{name,split}, data_dir, pp, batch_size
                              (global), kind ('classification' | 'zeroshot'), settings
                              ('float', uniform 'W4A4[-static...]' and PTQ
                              'METHOD/WxAy' names), calib_batches (static uniform
                              settings), calib_images (PTQ methods: the first N images
                              of input.data's split with evaluate.pp), max_batches,
                              checkpoint (npz or orbax dir; '' = the workdir),
                              pcdr_examples, collect_stats, classnames / templates /
                              tokenizer (zero-shot)
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import ml_collections as mlc

LOSSES = ('softmax_xent', 'sigmoid_xent')
EVAL_KINDS = ('classification', 'zeroshot')
# Sub-dicts whose keys are not fixed by the schema: checked elsewhere (model: by the
# task's model fields) or free-form (tokenizer kwargs).
FREE_FORM = ('model', 'evaluate.tokenizer')


def default_config() -> mlc.ConfigDict:
  """Every key the trainer and evaluator read, with defaults (see module docstring)."""
  c = mlc.ConfigDict()
  c.seed = 0
  c.model_name = 'vit'
  c.model = mlc.ConfigDict(dict(variant='B/16', pool_type='map', scan=True))
  c.num_classes = 1000
  c.model_init = ''
  c.model_load = mlc.ConfigDict(dict(dont_load=['head/.*'], allow_nonfinite=False))
  c.input = mlc.ConfigDict(dict(
      data=dict(name='imagenet2012', split='train[:99%]'),
      pp='decode|inception_crop(224)|flip_lr|value_range(-1,1)|keep("image","label")',
      batch_size=512, shuffle_buffer_size=250_000, data_dir=None))
  c.total_epochs = 0.0
  c.total_steps = 0
  c.lr = 3e-5
  c.wd = 0.05
  c.warmup_steps = 0
  c.warmup_frac = 0.05
  c.min_lr_frac = 0.0
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.grad_clip_norm = 1.0
  c.loss = 'softmax_xent'
  c.label_smoothing = 0.0
  c.s2d = mlc.ConfigDict(dict(
      enabled=False, strength=5e-4, power=2.0, k_max=3, tau=0.95,
      refresh_every=100, pcdr_batch=8, iters=1, decoupled=False,
      exclude=('(^|/)head/',)))
  c.qat = mlc.ConfigDict(dict(enabled=False, setting='W4A4'))
  c.mesh = mlc.ConfigDict(dict(fsdp=1))
  c.log_every = 50
  c.ckpt_every = 1000
  c.keep_ckpts = 3
  c.sigma_log_top = 4
  c.export_npz = True
  c.evaluate = mlc.ConfigDict(dict(
      enabled=True,
      data=dict(name='imagenet2012', split='validation'),
      pp='decode|resize_small(256)|central_crop(224)|value_range(-1,1)|keep("image","label")',
      batch_size=256, kind='classification', data_dir=None,
      settings=('float', 'W8A8', 'W6A6', 'W4A4'),
      calib_batches=4, calib_images=32, max_batches=None, checkpoint='',
      pcdr_examples=8, collect_stats=True, classnames=None, templates=None,
      tokenizer=None))
  return c


def _as_dict(node) -> dict | None:
  if isinstance(node, mlc.ConfigDict):
    return dict(node.items())
  if isinstance(node, dict):
    return node
  return None


def check_keys(config, schema, prefix: str = 'config') -> None:
  """Raises ValueError for the first key of `config` not in `schema`, at any depth.

  The message has the full dotted name and the keys known at that level. Nodes listed
  in FREE_FORM and schema values that are not dicts (a dict replacing None, e.g.
  `evaluate.tokenizer`) are not descended into.
  """
  cfg, sch = _as_dict(config), _as_dict(schema)
  if cfg is None or sch is None:
    return
  for key in sorted(cfg):
    name = f'{prefix}.{key}'
    if key not in sch:
      raise ValueError(f'{name}: unknown key; known keys of {prefix}: {sorted(sch)}')
    if name[len('config.'):] in FREE_FORM:
      continue
    check_keys(cfg[key], sch[key], name)


def _need(cond: bool, key: str, msg: str) -> None:
  if not cond:
    raise ValueError(f'config.{key}: {msg}')


def _number(config, key: str) -> float:
  node = config
  for part in key.split('.'):
    node = node[part]
  _need(isinstance(node, (int, float)) and not isinstance(node, bool), key,
        f'must be a number, got {node!r}')
  return node


def check_finite_values(config, prefix: str = 'config') -> None:
  """Raises ValueError naming the first non-finite float at any depth.

  Descends into ConfigDicts, dicts, lists and tuples (free-form sections too); the
  name is the dotted key, with `[i]` for list items (`config.evaluate.x[1]`).
  """
  node = _as_dict(config)
  if node is not None:
    for key in sorted(node, key=str):
      check_finite_values(node[key], f'{prefix}.{key}')
  elif isinstance(config, (list, tuple)):
    for i, v in enumerate(config):
      check_finite_values(v, f'{prefix}[{i}]')
  elif (isinstance(config, numbers.Real) and not isinstance(config, numbers.Integral)
        and not math.isfinite(config)):
    raise ValueError(f'{prefix}: must be finite, got {config}')


def validate_settings(settings, where: str = 'config.evaluate.settings') -> list:
  """Parses every evaluation setting name early; returns the parsed list.

  `'float'`, uniform settings (`s2d_jax.quant.get_setting`) and PTQ settings
  `METHOD/WxAy` (`s2d_jax.ptq.parse_name`). Raises ValueError naming the setting.
  """
  from s2d_jax import ptq, quant  # pylint: disable=g-import-not-at-top
  if isinstance(settings, str):
    settings = [s for s in settings.split(',') if s]
  out, seen = [], set()
  for n in settings:
    if n is None or n == 'float':
      s, key = None, 'float'
    elif isinstance(n, ptq.PTQSetting):
      s, key = n, n.name
    else:
      try:
        s = ptq.parse_name(n) if ptq.is_ptq_name(n) else quant.get_setting(n)
      except (KeyError, ValueError) as e:
        msg = e.args[0] if e.args else str(e)
        raise ValueError(f'{where}: {msg}') from e
      key = s.name
    if key in seen:
      raise ValueError(f'{where}: quant setting {key!r} listed twice')
    seen.add(key)
    out.append(s)
  if not out:
    raise ValueError(f'{where}: no settings to evaluate')
  return out


def validate(config: mlc.ConfigDict, *, training: bool = True) -> None:
  """Checks keys at every depth and every value; raises ValueError naming the key.

  `training=False` (the evaluator alone) skips the training-only checks (length,
  optimizer, S2D, QAT).
  """
  from s2d_jax import tasks  # pylint: disable=g-import-not-at-top
  check_keys(config, default_config())
  check_finite_values(config)
  _need(isinstance(config.model_load.get('allow_nonfinite', False), bool),
        'model_load.allow_nonfinite',
        f'must be True or False, got {config.model_load.get("allow_nonfinite")!r}')
  name = config.get('model_name')
  _need(name in tasks.TASKS, 'model_name',
        f'{name!r} is not one of {sorted(tasks.TASKS)}')
  task = tasks.TASKS[name]
  task.check_model_config(config.get('model') or {})
  if task.classifier:
    _need(int(config.num_classes) > 0, 'num_classes', 'must be > 0 for a classifier')
  ev = config.evaluate
  _need(ev.kind in EVAL_KINDS, 'evaluate.kind', f'{ev.kind!r} is not one of {EVAL_KINDS}')
  if ev.enabled or not training:
    validate_settings(ev.settings)
    _need(int(ev.batch_size) > 0, 'evaluate.batch_size', 'must be > 0')
    _need(int(ev.calib_batches) >= 1, 'evaluate.calib_batches', 'must be >= 1')
    _need(int(ev.calib_images) >= 1, 'evaluate.calib_images', 'must be >= 1')
    _need(ev.max_batches is None or int(ev.max_batches) >= 1, 'evaluate.max_batches',
          'must be >= 1 or None (all)')
    _need(int(ev.pcdr_examples) >= 0, 'evaluate.pcdr_examples', 'must be >= 0')
    if ev.kind != task.eval_kind:
      raise ValueError(f'config.evaluate.kind={ev.kind!r} needs model_name='
                       f'{_model_for_kind(ev.kind)!r}, got {name!r}')
  if not training:
    return
  steps, epochs = int(config.get('total_steps') or 0), float(
      config.get('total_epochs') or 0)
  _need((steps > 0) != (epochs > 0), 'total_steps',
        f'set exactly one of total_steps ({steps}) / total_epochs ({epochs}) > 0')
  if task.classifier:
    _need(config.loss in LOSSES, 'loss', f'{config.loss!r} is not one of {LOSSES}')
  for key, ok, msg in (
      ('lr', lambda v: v > 0, 'must be > 0'),
      ('wd', lambda v: v >= 0, 'must be >= 0'),
      ('warmup_frac', lambda v: 0 <= v < 1, 'must be in [0, 1)'),
      ('warmup_steps', lambda v: v >= 0, 'must be >= 0'),
      ('min_lr_frac', lambda v: 0 <= v <= 1, 'must be in [0, 1]'),
      ('grad_clip_norm', lambda v: v >= 0, 'must be >= 0 (0 = off)'),
      ('input.batch_size', lambda v: v > 0, 'must be > 0'),
      ('log_every', lambda v: v > 0, 'must be > 0'),
      ('ckpt_every', lambda v: v >= 0, 'must be >= 0 (0 = only at the end)'),
      ('keep_ckpts', lambda v: v >= 1, 'must be >= 1')):
    v = _number(config, key)
    _need(math.isfinite(v) and ok(v), key, f'{msg}, got {v}')
  fsdp = int(config.mesh.fsdp)
  _need(fsdp == -1 or fsdp >= 1, 'mesh.fsdp', f'must be >= 1 or -1 (all devices), got '
        f'{config.mesh.fsdp}')
  s = config.s2d
  if s.enabled:
    _need(s.strength >= 0, 's2d.strength', 'must be >= 0')
    _need(s.power > 0, 's2d.power', 'must be > 0')
    _need(int(s.k_max) >= 1, 's2d.k_max', 'must be >= 1')
    _need(0 < s.tau <= 1, 's2d.tau', 'must be in (0, 1]')
    _need(int(s.refresh_every) >= 0, 's2d.refresh_every',
          'must be >= 0 (0 = select once at the start)')
    _need(int(s.pcdr_batch) >= 1, 's2d.pcdr_batch', 'must be >= 1')
  if config.qat.enabled:
    _need(task.qat, 'qat.enabled', f'QAT is not implemented for model_name={name!r}')
    from s2d_jax import quant  # pylint: disable=g-import-not-at-top
    try:
      quant.get_setting(config.qat.setting)
    except (KeyError, ValueError) as e:
      raise ValueError(f'config.qat.setting: {e}') from e


def _model_for_kind(kind: str) -> Any:
  from s2d_jax import tasks  # pylint: disable=g-import-not-at-top
  return next((n for n, t in tasks.TASKS.items() if t.eval_kind == kind), None)
