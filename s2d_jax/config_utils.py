"""big_vision-style config files and the command line of every entry point.

A config file is a Python module with `get_config(arg=None) -> ml_collections.ConfigDict`.
On the command line it is named as `FILE[:ARG]`, where FILE is a path or the name of a
config shipped with the package (`demo`, `siglip2_b16_384_i1k`, ...: the files of the
repository's `configs/`, installed as `s2d_jax.configs`); `ARG` is handed verbatim to
`get_config`, which typically parses it with `parse_arg` below (big_vision's convention):

    def get_config(arg=None):
      arg = parse_arg(arg, variant='B/16', s2d=False, res=(384, int))
      ...

Dotted overrides `--config.lr=1e-4 --config.input.batch_size=32` are applied after
`get_config` by `apply_overrides`, with the value parsed to the type already in the
config (int, float, bool, str, tuple/list via Python literals or `a,b`, None); an unknown
key is an error naming it and its siblings.

Entry points (`s2d_jax.train`, `s2d_jax.evaluate`) read their flags with absl: `--config`
is an `ml_collections.config_flags` config-file flag, `--help` lists every flag with an
example (`parse_flags`). The config schema and its validation are in
`s2d_jax.config_schema`; `default_train_config` is re-exported here for config files.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from typing import Any, Iterable, Mapping, Sequence

from absl import flags
import ml_collections as mlc
from ml_collections import config_flags

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
  """'configs/x.py:a=1,b=2' -> ('configs/x.py', 'a=1,b=2'); 'demo:s2d' -> ('demo', 's2d')."""
  if '.py:' in spec:
    path, arg = spec.split('.py:', 1)
    return path + '.py', arg
  head, sep, arg = spec.partition(':')
  if sep and head and '=' not in head and not head.endswith('.py'):
    return head, arg
  return spec, None


def shipped_config_dir() -> str:
  """The directory of the configs shipped with the package.

  Installed (`pip install .`): `site-packages/s2d_jax/configs`. From a source checkout
  (the repository root on `sys.path`): the repository's top-level `configs/`.
  """
  here = os.path.dirname(os.path.abspath(__file__))
  for d in (os.path.join(here, 'configs'), os.path.join(os.path.dirname(here), 'configs')):
    if os.path.isfile(os.path.join(d, 'demo.py')):
      return d
  raise FileNotFoundError(f'no shipped configs next to {here} (broken install?)')


def shipped_configs() -> list[str]:
  """Names of the shipped configs (`--config NAME[:ARG]`)."""
  d = shipped_config_dir()
  return sorted(f[:-3] for f in os.listdir(d)
                if f.endswith('.py') and not f.startswith('_'))


def resolve_config_path(path: str) -> str:
  """A config file path: `path` itself if it exists, else the shipped config of that name.

  `demo`, `demo.py` and `configs/demo.py` (from any directory) name the shipped
  `demo.py`. Raises FileNotFoundError naming `path` and the shipped names.
  """
  if os.path.isfile(path):
    return path
  name = os.path.basename(path)
  name = name[:-3] if name.endswith('.py') else name
  try:
    cand = os.path.join(shipped_config_dir(), name + '.py')
  except FileNotFoundError:
    cand = None
  if cand and os.path.isfile(cand) and os.path.basename(
      os.path.dirname(path)) in ('', 'configs'):
    return cand
  try:
    names = shipped_configs()
  except FileNotFoundError:
    names = []
  raise FileNotFoundError(f'config file not found: {path!r} (neither a file nor a '
                          f'shipped config; shipped: {names})')


def resolve_config_spec(spec: str) -> str:
  """`FILE[:ARG]` with FILE resolved by `resolve_config_path` (ARG unchanged)."""
  path, arg = split_spec(spec)
  path = resolve_config_path(path)
  return path if arg is None else f'{path}:{arg}'


def load_config(spec: str) -> mlc.ConfigDict:
  """Loads `FILE[:ARG]`: imports FILE and returns `get_config(ARG)` (or get_config()).

  FILE is a path or a shipped config name (see `resolve_config_path`).
  """
  path, arg = split_spec(spec)
  try:
    path = resolve_config_path(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{e} (from --config {spec!r})') from None
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




def config_as_json(config) -> Any:
  """A ConfigDict (or dict, at any depth) as plain JSON data: what `config.json` and
  checkpoint metas hold (tuples become lists, other objects their `str`), for
  comparing configs across runs."""
  if isinstance(config, (mlc.ConfigDict, mlc.FrozenConfigDict)):
    config = config.to_dict()
  if isinstance(config, Mapping):
    return {str(k): config_as_json(v) for k, v in config.items()}
  if isinstance(config, (list, tuple)):
    return [config_as_json(v) for v in config]
  if hasattr(config, 'item') and getattr(config, 'ndim', None) == 0:
    config = config.item()   # numpy scalars
  if config is None or isinstance(config, (bool, int, float, str)):
    return config
  return str(config)


def _flat(tree, prefix=''):
  out = {}
  for k, v in tree.items():
    name = f'{prefix}{k}'
    if isinstance(v, dict) and v:
      out.update(_flat(v, name + '.'))
    else:
      out[name] = v
  return out


def _show(v) -> str:
  return repr(v) if isinstance(v, str) else str(v)


def config_changes(now, then, then_name: str) -> list[str]:
  """What differs between two configs, in config terms, one phrase per key.

  `now`, `then`: ConfigDicts or their JSON data (`config_as_json`); `then_name`
  says where `then` comes from ('checkpoint 200'). Phrases, sorted by key:
  `"s2d.k_max is 2 now, 3 in checkpoint 200"`, for switches `X.enabled`:
  `"s2d is off now, on in checkpoint 200"`, for keys only one side has:
  `"x is 1 now, not set in checkpoint 200"`.
  """
  a, b = _flat(config_as_json(now)), _flat(config_as_json(then))
  out = []
  for key in sorted(set(a) | set(b)):
    if key in a and key in b and a[key] == b[key]:
      continue
    if key not in b:
      out.append(f'{key} is {_show(a[key])} now, not set in {then_name}')
    elif key not in a:
      out.append(f'{key} is not set now, {_show(b[key])} in {then_name}')
    elif key.endswith('.enabled') and isinstance(a[key], bool) and \
        isinstance(b[key], bool):
      onoff = lambda x: 'on' if x else 'off'
      out.append(f'{key[:-len(".enabled")]} is {onoff(a[key])} now, '
                 f'{onoff(b[key])} in {then_name}')
    else:
      out.append(f'{key} is {_show(a[key])} now, {_show(b[key])} in {then_name}')
  return out


def default_train_config() -> mlc.ConfigDict:
  """The trainer's config schema with defaults (see `s2d_jax.config_schema`)."""
  from s2d_jax import config_schema  # pylint: disable=g-import-not-at-top
  return config_schema.default_config()


# ----------------------------------------------------------------------------------
# Command line: absl flags + ml_collections.config_flags
# ----------------------------------------------------------------------------------

HELP_FLAGS = ('--help', '-h', '--helpshort', '--helpfull', '-?')


class UsageError(ValueError):
  """A bad command line; the message names the flag or config key at fault."""


class RunError(RuntimeError):
  """A run that cannot go on, with a complete message for the user.

  Raised for failures that are not bugs: a non-finite loss, a damaged or
  incompatible checkpoint. The message says what happened, where (step,
  directory) and what to do; `run_cli` prints it as one line and exits 1.
  """


def define_flags(fv: flags.FlagValues, *, workdir_help: str,
                 distributed: bool = True) -> None:
  """--config (config_flags), --workdir and, optionally, the multi-process flags."""
  config_flags.DEFINE_config_file(
      'config', None, 'Config FILE[:ARG]: a config file path or a shipped config name '
      f'(e.g. demo:s2d=True); ARG goes to get_config. Override any key with '
      '--config.KEY=VALUE (dotted, e.g. --config.input.batch_size=32).',
      flag_values=fv, lock_config=False, sys_argv=[])
  flags.DEFINE_string('workdir', None, workdir_help, flag_values=fv)
  if distributed:
    flags.DEFINE_string('coordinator_address', None, 'Multi-process runs: host:port of '
                        'process 0 (jax.distributed.initialize).', flag_values=fv)
    flags.DEFINE_integer('num_processes', None, 'Multi-process runs: number of '
                         'processes.', flag_values=fv)
    flags.DEFINE_integer('process_id', None, 'Multi-process runs: this process '
                         '(0 .. num_processes-1).', flag_values=fv)
    flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() with '
                      'no arguments (TPU pods / SLURM auto-detection).', flag_values=fv)


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """Separates `--config.KEY=V` / `--config.KEY V` from the other arguments."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    a = argv[i]
    if a.startswith('--config.'):
      key, sep, value = a[len('--config.'):].partition('=')
      if not sep:
        if i + 1 >= len(argv):
          raise UsageError(f'flag --config.{key} needs a value')
        value = argv[i + 1]
        i += 1
      overrides.append((key, value))
    elif a.startswith('--config=') or a == '--config':
      if a == '--config':
        if i + 1 >= len(argv):
          raise UsageError('flag --config needs a value: FILE[:ARG]')
        spec = argv[i + 1]
        i += 1
      else:
        spec = a[len('--config='):]
      rest.append('--config=' + resolve_config_spec(spec))
    else:
      rest.append(a)
    i += 1
  return rest, overrides


def parse_plain_flags(fv: flags.FlagValues, argv: Sequence[str], *, usage: str,
                      prog: str = 's2d_jax') -> None:
  """Parses `argv` (no program name) into `fv` (commands without `--config`).

  `--help` prints `usage` and every flag of `fv`, then exits 0; a flag error raises
  `UsageError` naming the flag.
  """
  argv = list(argv)
  if any(a in HELP_FLAGS for a in argv):
    print(usage.strip() + '\n\nflags:\n' + fv.get_help(include_special_flags=False))
    raise SystemExit(0)
  try:
    fv([prog] + argv)
  except flags.Error as e:
    raise UsageError(f'{e} (run with --help for the flags)') from e


def parse_flags(fv: flags.FlagValues, argv: Sequence[str], *, usage: str,
                require_workdir: bool = True) -> mlc.ConfigDict:
  """Parses `argv` (no program name) into `fv`; returns the config with overrides.

  `--help` prints `usage` and every flag of `fv`, then exits 0. Errors raise
  `UsageError` (a ValueError) whose message names the flag or the config key
  (unknown keys with their siblings, values that do not convert to the key's type);
  a config file that does not exist raises FileNotFoundError naming it.
  """
  argv = list(argv)
  if any(a in HELP_FLAGS for a in argv):
    parse_plain_flags(fv, argv, usage=usage)   # prints the help, exits 0
  rest, overrides = _split_overrides(argv)
  parse_plain_flags(fv, rest, usage=usage)
  config = fv['config'].value
  if config is None:
    raise UsageError('missing --config FILE[:ARG] (run with --help for the flags)')
  if require_workdir and not fv['workdir'].value:
    raise UsageError('missing --workdir DIR (run with --help for the flags)')
  try:
    apply_overrides(config, dict(overrides))
  except (KeyError, ValueError) as e:
    raise UsageError(e.args[0] if e.args else str(e)) from e
  return config


def maybe_initialize_distributed(fv: flags.FlagValues) -> None:
  """jax.distributed.initialize from --coordinator_address/--num_processes/
  --process_id, or with no arguments (TPU pod auto-detection) for --distributed."""
  import jax  # pylint: disable=g-import-not-at-top
  names = ('coordinator_address', 'num_processes', 'process_id')
  given = {k: fv[k].value for k in names if fv[k].value is not None}
  if given:
    missing = [k for k in names if k not in given]
    if missing:
      raise UsageError(f'multi-process run: missing --{", --".join(missing)}')
    if int(given['num_processes']) > 1:
      # CPU multi-process collectives; harmless on TPU/GPU.
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=given['coordinator_address'],
                               num_processes=int(given['num_processes']),
                               process_id=int(given['process_id']))
  elif fv['distributed'].value:
    jax.distributed.initialize()


def run_cli(main_fn, argv: Sequence[str] | None = None):
  """Runs `main_fn(argv)` as a program: a UsageError is one line on stderr, exit 2;
  a RunError (non-finite loss, damaged checkpoint, ...) likewise, exit 1."""
  try:
    return main_fn(sys.argv[1:] if argv is None else argv)
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    raise SystemExit(2) from None
  except RunError as e:
    print(f'error: {e}', file=sys.stderr)
    raise SystemExit(1) from None
