"""big_vision-style config files: `--config file.py:key=value,...` and `--config.x=v`.

A config file is a Python module with `get_config(arg=None) -> ml_collections.ConfigDict`.
On the command line it is named as `FILE[:ARG]`; `ARG` is handed verbatim to
`get_config`, which typically parses it with `parse_arg` below (big_vision's
convention):

    def get_config(arg=None):
      arg = parse_arg(arg, variant='B/16', s2d=False, res=(384, int))
      ...

Dotted flag overrides `--config.lr=1e-4 --config.input.batch_size=32` are applied after
`get_config` by `apply_overrides`, with the value parsed to the type already in the
config (int, float, bool, str, tuple/list via Python literals, None).

`parse_cli(argv)` splits an argv into (config, workdir, remaining args) for the
trainer's and evaluator's entry points; every failure names the key or file at fault.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any, Iterable, Sequence

import ml_collections as mlc

_TRUE = ('true', 'yes', '1', 'on')
_FALSE = ('false', 'no', '0', 'off')


def _parse_bool(s: str) -> bool:
  low = s.strip().lower()
  if low in _TRUE:
    return True
  if low in _FALSE:
    return False
  raise ValueError(f'cannot parse {s!r} as a bool (use one of {_TRUE + _FALSE})')


def autotype(s: str) -> Any:
  """Parses a string into a Python literal when it is one, else keeps the string.

  'True' -> True, '3' -> 3, '1e-4' -> 1e-4, '(1,2)' -> (1, 2), 'None' -> None,
  'B/16' -> 'B/16'.
  """
  if not isinstance(s, str):
    return s
  low = s.strip().lower()
  if low in ('true', 'false'):
    return low == 'true'
  try:
    return ast.literal_eval(s)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return s


def _spec_entry(name: str, value: Any):
  """A spec value is `default` or `(default, type_fn)`; returns (default, type_fn)."""
  if isinstance(value, tuple) and len(value) == 2 and callable(value[1]):
    return value
  if isinstance(value, bool):
    return value, _parse_bool
  if value is None:
    return None, autotype
  if isinstance(value, (int, float, str)):
    return value, type(value)
  raise ValueError(
      f'parse_arg spec for {name!r}: give a default of type bool/int/float/str/None '
      f'or a (default, type_fn) pair, got {value!r}')


def _split_top_level(s: str) -> list[str]:
  """Splits on commas outside (), [], {} and quotes: 'a=(1,2),b=3' -> 2 items."""
  items, depth, quote, cur = [], 0, None, []
  for ch in s:
    if quote:
      quote = None if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch == ',' and depth == 0:
      items.append(''.join(cur))
      cur = []
      continue
    cur.append(ch)
  items.append(''.join(cur))
  return items


def parse_arg(arg: str | None, lazy: bool = False, **spec) -> mlc.ConfigDict:
  """Parses the single string argument of `get_config(arg)` (big_vision convention).

  `arg` is `"key=value,key2=value2"`; every key must be in `spec` (unless `lazy`, in
  which case unknown keys are kept with `autotype`). A value of the spec is a default
  (its type converts the string) or a `(default, type_fn)` pair. Conveniences: a bare
  `"name"` that is a spec key means `name=True`; a bare `"value"` that is not a key is
  the value of the first spec entry.

  Returns a ConfigDict (not type-safe) with every spec key set.
  """
  arg = arg or ''
  parsed = {k: _spec_entry(k, v) for k, v in spec.items()}
  result = mlc.ConfigDict(type_safe=False)
  if arg and ',' not in arg and '=' not in arg:
    if arg in parsed or not parsed:
      arg = f'{arg}=True'
    else:
      arg = f'{next(iter(parsed))}={arg}'
  raw = {}
  for item in _split_top_level(arg):
    if not item:
      continue
    key, sep, value = item.partition('=')
    key = key.strip()
    if not key:
      raise ValueError(f'config arg {arg!r}: empty key in item {item!r}')
    if key in raw:
      raise ValueError(f'config arg {arg!r}: key {key!r} given twice')
    raw[key] = value if sep else 'True'
  for name, (default, type_fn) in parsed.items():
    if name in raw:
      value = raw.pop(name)
      try:
        result[name] = type_fn(value)
      except (ValueError, TypeError) as e:
        raise ValueError(
            f'config arg {name}={value!r}: cannot convert with {type_fn}: {e}') from e
    else:
      result[name] = default
  if raw:
    if not lazy:
      raise ValueError(
          f'unknown config arg(s) {sorted(raw)}; known: {sorted(parsed)}')
    for k, v in raw.items():
      result[k] = autotype(v)
  return result


def split_spec(spec: str) -> tuple[str, str | None]:
  """'configs/x.py:a=1,b=2' -> ('configs/x.py', 'a=1,b=2'); 'x.py' -> ('x.py', None)."""
  if '.py:' in spec:
    path, arg = spec.split('.py:', 1)
    return path + '.py', arg
  return spec, None


def load_config(spec: str) -> mlc.ConfigDict:
  """Loads `FILE[:ARG]`: imports FILE and returns `get_config(ARG)` (or get_config())."""
  path, arg = split_spec(spec)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file not found: {path!r} (from --config {spec!r})')
  name = '_s2d_config_' + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  if module_spec is None or module_spec.loader is None:
    raise ValueError(f'cannot import config file {path!r}')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'config file {path!r} defines no get_config(arg=None)')
  config = module.get_config(arg) if arg is not None else module.get_config()
  if not isinstance(config, mlc.ConfigDict):
    raise ValueError(
        f'{path}: get_config returned {type(config).__name__}, expected a ConfigDict')
  return config


def _convert_like(key: str, old: Any, value: str) -> Any:
  """Converts the string `value` to the type of the existing config value `old`."""
  if isinstance(old, bool):
    return _parse_bool(value)
  if isinstance(old, int):
    parsed = autotype(value)
    if isinstance(parsed, bool) or not isinstance(parsed, int):
      if isinstance(parsed, float) and float(parsed).is_integer():
        return int(parsed)
      raise ValueError(f'--config.{key}={value!r}: expected an int')
    return parsed
  if isinstance(old, float):
    try:
      return float(value)
    except ValueError as e:
      raise ValueError(f'--config.{key}={value!r}: expected a float') from e
  if isinstance(old, str):
    return value
  if isinstance(old, (tuple, list)):
    parsed = autotype(value)
    if isinstance(parsed, str):  # 'a,b' shorthand
      parsed = tuple(autotype(p) for p in parsed.split(',') if p)
    if not isinstance(parsed, (tuple, list)):
      parsed = (parsed,)
    return type(old)(parsed)
  return autotype(value)


def apply_overrides(config: mlc.ConfigDict,
                    overrides: dict[str, Any] | Iterable[str]) -> mlc.ConfigDict:
  """Applies dotted overrides in place and returns `config`.

  `overrides` is a dict {'input.batch_size': '32', ...} (string values are converted to
  the type of the current value; non-strings are set as is) or an iterable of
  'key=value' strings. Unknown keys raise KeyError naming the key and its parent's keys.
  """
  items = overrides.items() if isinstance(overrides, dict) else (
      _split_kv(o) for o in overrides)
  for key, value in items:
    parts = key.split('.')
    node = config
    for i, part in enumerate(parts[:-1]):
      if not isinstance(node, (mlc.ConfigDict, dict)) or part not in node:
        have = sorted(node.keys()) if isinstance(node, (mlc.ConfigDict, dict)) else []
        raise KeyError(
            f'--config.{key}: no key {".".join(parts[:i + 1])!r} in the config '
            f'(has {have})')
      node = node[part]
    leaf = parts[-1]
    if not isinstance(node, (mlc.ConfigDict, dict)):
      raise KeyError(f'--config.{key}: {".".join(parts[:-1])!r} is not a ConfigDict')
    if leaf not in node:
      raise KeyError(
          f'--config.{key}: no key {key!r} in the config (siblings: {sorted(node.keys())})')
    old = node[leaf]
    new = _convert_like(key, old, value) if isinstance(value, str) else value
    if isinstance(node, mlc.ConfigDict):
      with node.ignore_type():
        node[leaf] = new
    else:
      node[leaf] = new
  return config


def _split_kv(item: str) -> tuple[str, str]:
  key, sep, value = item.partition('=')
  if not sep or not key:
    raise ValueError(f'override {item!r} is not of the form key=value')
  return key, value


def parse_cli(argv: Sequence[str], *, require_workdir: bool = True,
              extra: Sequence[str] = ()) -> tuple[mlc.ConfigDict, str | None, dict]:
  """Parses `--config FILE[:ARG] [--config.x=v ...] --workdir DIR [--extra=v]`.

  Returns (config with overrides applied, workdir, {extra flag: value}). Accepts both
  `--flag=value` and `--flag value`. Flags not in ('config', 'workdir', *extra) raise.
  """
  argv = list(argv)
  spec = workdir = None
  overrides: list[tuple[str, str]] = []
  rest: dict[str, str] = {}
  i = 0
  while i < len(argv):
    a = argv[i]
    if not a.startswith('--'):
      raise ValueError(f'unexpected positional argument {a!r}')
    name, sep, value = a[2:].partition('=')
    if not sep:
      if i + 1 >= len(argv):
        raise ValueError(f'flag --{name} needs a value')
      value = argv[i + 1]
      i += 1
    i += 1
    if name == 'config':
      spec = value
    elif name.startswith('config.'):
      overrides.append((name[len('config.'):], value))
    elif name == 'workdir':
      workdir = value
    elif name in extra:
      rest[name] = value
    else:
      raise ValueError(
          f'unknown flag --{name}; known: --config, --config.KEY, --workdir'
          + ''.join(f', --{e}' for e in extra))
  if spec is None:
    raise ValueError('missing --config FILE[:ARGS]')
  if require_workdir and not workdir:
    raise ValueError('missing --workdir DIR')
  config = load_config(spec)
  apply_overrides(config, dict(overrides))
  return config, workdir, rest


def default_train_config() -> mlc.ConfigDict:
  """The trainer's config schema with defaults (every key train.py reads).

  Config files start from this and set what differs; `apply_overrides` refuses keys
  that are not here, so a typo in `--config.x=` fails at start-up.

    seed                      PRNG seed (init, dropout, data order)
    model_name                'vit' (classifier) or 'two_towers' (SigLIP pre-training)
    model                     kwargs of vit.Model / two_towers.Model (variant, pool_type,
                              scan, ...)
    num_classes               classifier head size (vit)
    model_init                big_vision npz to start from ('' = random init)
    model_load.dont_load      regexes of params not loaded (re-initialised), e.g. head
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
    evaluate.*                end-of-training PTQ evaluation (evaluate.py's schema)
  """
  c = mlc.ConfigDict()
  c.seed = 0
  c.model_name = 'vit'
  c.model = mlc.ConfigDict(dict(variant='B/16', pool_type='map', scan=True))
  c.num_classes = 1000
  c.model_init = ''
  c.model_load = mlc.ConfigDict(dict(dont_load=['head/.*']))
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
      calib_batches=4, max_batches=None, checkpoint=''))
  return c
