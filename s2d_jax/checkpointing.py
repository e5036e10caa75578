"""Training checkpoints with orbax: params, optimizer state, data position, step.

Layout (one orbax `CheckpointManager` under `WORKDIR/checkpoints`):

    WORKDIR/checkpoints/<step>/params/      StandardSave of the params pytree
    WORKDIR/checkpoints/<step>/opt_state/   StandardSave of the optimizer state (S2D
                                            bases, Adam moments, counts, active k ...)
    WORKDIR/checkpoints/<step>/extra/       StandardSave of the rest of the training
                                            state, when the run has one (the trainer:
                                            static-QAT activation ranges)
    WORKDIR/checkpoints/<step>/meta/        JSON: step, data position, fingerprints

Orbax writes each step into a temporary directory and renames it when complete, so a
crash while saving never leaves a step directory that `latest_step` would pick up:
after a crash, training resumes from the last *complete* checkpoint. Saving is
synchronous (`enable_async_checkpointing=False`): when `save` returns, the step is on
disk. The `max_to_keep` newest steps are kept.

The *fingerprints* are `{'/'.join(path): [shape..., dtype]}` of the params, of the
optimizer state and of the extra state (when saved), stored in the meta of every
step; before anything is restored they are compared with the model, optimizer and
extra state being set up, and a checkpoint written for another model or optimizer
(S2D on/off, another K_max, gradient clipping on/off ...) or with another extra state
(static-QAT ranges present in one and not the other) raises
`IncompatibleCheckpointError` (a ValueError) naming the first differing key and both
shapes (plus the caller's `hint`: the trainer says which config keys changed).

A *damaged* step (a data file deleted or truncated, garbage in a meta file, a
half-copied directory) raises `DamagedCheckpointError` with one message naming the
step and its directory and how to fall back to the previous step (delete the damaged
step's folder), instead of orbax's / TensorStore's multi-hundred-line error. Both
errors are `config_utils.RunError`s: the command-line tools print the message as one
line and exit 1.

`restore_params(path, step=None, mesh=None)` returns only the params from a workdir,
its `checkpoints` directory, or one step directory: as host numpy arrays, or with
`mesh` as global arrays split over it by the FSDP rule (`s2d_jax.parallel`), each
process reading only its own shards (multi-host evaluation of a sharded model without
gathering it on a host); eval_setup.py uses it without importing the trainer.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from s2d_jax import config_utils
from s2d_jax import fileio

CKPT_SUBDIR = 'checkpoints'
_ITEMS = ('params', 'opt_state', 'meta', 'extra')


class DamagedCheckpointError(config_utils.RunError):
  """A checkpoint step whose files cannot be read (deleted, truncated, garbage)."""


class IncompatibleCheckpointError(config_utils.RunError, ValueError):
  """A checkpoint written for another model or optimizer."""


def _path_str(path) -> str:
  parts = []
  for p in path:
    if isinstance(p, jax.tree_util.DictKey):
      parts.append(str(p.key))
    elif isinstance(p, jax.tree_util.GetAttrKey):
      parts.append(p.name)
    elif isinstance(p, jax.tree_util.SequenceKey):
      parts.append(str(p.idx))
    else:
      parts.append(str(p))
  return '/'.join(parts)


def fingerprint(params) -> dict[str, list]:
  """{'a/b/kernel': [*shape, dtype_name]} for every leaf (arrays or ShapeDtypeStructs)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {_path_str(p): [*map(int, np.shape(x)), np.dtype(x.dtype).name]
          for p, x in flat}


def compare_fingerprints(expected: Mapping[str, list], found: Mapping[str, list],
                         where: str, *, what: str = 'model', hint: str = '') -> None:
  """Raises IncompatibleCheckpointError (a ValueError) naming the first key that is
  missing, extra or reshaped; `what` names the tree ('model', 'optimizer',
  'training state'), `hint` is appended to the message after '; '. Dtypes may
  differ (a cast on restore)."""
  missing = sorted(set(expected) - set(found))
  extra = sorted(set(found) - set(expected))
  tail = f'; {hint}' if hint else ''
  noun = {'model': 'params', 'optimizer': 'optimizer state entries'}.get(
      what, f'{what} entries')
  if missing or extra:
    raise IncompatibleCheckpointError(
        f'{where} was written for another {what}: {noun} missing from it: '
        f'{missing[:5]}{" ..." if len(missing) > 5 else ""}; {noun} only in it: '
        f'{extra[:5]}{" ..." if len(extra) > 5 else ""}{tail}')
  for k in sorted(expected):
    if list(expected[k][:-1]) != list(found[k][:-1]):
      raise IncompatibleCheckpointError(
          f'{where} was written for another {what}: {k!r} has shape '
          f'{tuple(found[k][:-1])} there but {tuple(expected[k][:-1])} in the '
          f'{what}{tail}')


def _reason(e: BaseException, limit: int = 300) -> str:
  """A short form of a (TensorStore / orbax / json) error: the innermost cause (e.g.
  TensorStore's 'OUT_OF_RANGE: Error reading "kernel/0.0" in ...'), one line, without
  TensorStore's JSON specs, at most `limit` characters."""
  seen = []
  while e is not None and e not in seen and len(seen) < 20:
    seen.append(e)
    e = e.__cause__ or e.__context__
  inner = seen[-1]
  text = str(inner)
  for cut in ('[tensorstore_spec', 'See full TensorStore', '[source locations'):
    text = text.split(cut)[0]
  text = ' '.join(text.split())
  if len(text) > limit:  # the status at the start, the file at the end
    text = text[:limit - limit // 4] + ' ... ' + text[-(limit // 4):]
  return f'{type(inner).__name__}: {text}' if text else type(inner).__name__


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, CKPT_SUBDIR)


def _handlers():
  return {
      'params': ocp.StandardCheckpointHandler(),
      'opt_state': ocp.StandardCheckpointHandler(),
      'meta': ocp.JsonCheckpointHandler(),
      'extra': ocp.StandardCheckpointHandler(),
  }


def _wrap(opt_state):
  """{'state': opt_state, 'n': 0}: orbax refuses leaf-less trees (e.g. plain SGD)."""
  return {'state': opt_state, 'n': np.zeros((), np.int32)}


class Checkpointer:
  """Periodic, synchronous, crash-safe orbax checkpoints of one training run.

  Args:
    workdir: run directory; checkpoints go to `workdir/checkpoints`.
    max_to_keep: how many of the newest steps are kept on disk.
    create: create the directory (False for read-only use, e.g. evaluation).
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 3, create: bool = True):
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f'max_to_keep must be >= 1, got {max_to_keep}')
    self.directory = fileio.abspath(checkpoint_dir(workdir))  # gs:// stays gs://
    # (read-only: the options orbax would otherwise warn about resetting)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep if create else None,
        save_interval_steps=1 if create else 0,
        enable_async_checkpointing=False, create=create, read_only=not create)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options, item_names=_ITEMS,
        item_handlers=_handlers())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, params, opt_state, meta: Mapping[str, Any] | None = None,
           *, extra=None) -> None:
    """Writes step `step` (params, opt_state, JSON meta incl. the fingerprints).

    `meta` must be JSON-serialisable (data position, rng seed, config ...). `extra`
    (a pytree of arrays, or None) is the rest of the training state that a resumed
    run needs bit for bit (the trainer: the static-QAT activation ranges). Returns
    when the checkpoint is complete on disk.
    """
    meta = dict(meta or {})
    meta['step'] = int(step)
    meta['fingerprint'] = fingerprint(params)
    meta['opt_fingerprint'] = fingerprint(opt_state)
    items = dict(params=ocp.args.StandardSave(params),
                 opt_state=ocp.args.StandardSave(_wrap(opt_state)))
    if extra is not None:
      meta['extra_fingerprint'] = fingerprint(extra)
      items['extra'] = ocp.args.StandardSave(extra)
    json.dumps(meta)  # fail early (before writing) on non-JSON meta
    self._mngr.save(int(step), args=ocp.args.Composite(
        meta=ocp.args.JsonSave(meta), **items), force=True)
    self._mngr.wait_until_finished()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

  def damaged(self, step: int, error: BaseException) -> DamagedCheckpointError:
    """The one message for an unreadable step: which step, where, how to fall back."""
    earlier = [s for s in self.all_steps() if s < int(step)]
    if earlier:
      fallback = (f'to fall back to the previous checkpoint (step {max(earlier)}), '
                  f'delete {self.step_dir(step)}')
    else:
      fallback = (f'there is no earlier checkpoint: delete {self.step_dir(step)} to '
                  'start again from step 0 (or use a new workdir)')
    return DamagedCheckpointError(
        f'checkpoint step {step} in {self.directory} is damaged and cannot be read '
        f'({_reason(error)}); {fallback}')

  def read_meta(self, step: int | None = None) -> dict:
    """The JSON meta of a step (latest by default); DamagedCheckpointError if it
    cannot be read."""
    step = self._resolve(step)
    try:
      meta = self._mngr.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))['meta']
      if not isinstance(meta, dict) or int(meta.get('step', -1)) != step:
        raise ValueError(f'meta does not describe step {step}: {str(meta)[:100]}')
    except Exception as e:  # pylint: disable=broad-except
      raise self.damaged(step, e) from None
    return meta

  def check_compatible(self, abstract_params, step: int | None = None, *,
                       abstract_opt_state=None, abstract_extra=None,
                       check_extra: bool = False, hint: str = '',
                       meta: Mapping[str, Any] | None = None) -> dict:
    """Checks a step's fingerprints against `abstract_params` (and, when given,
    `abstract_opt_state`; with `check_extra`, `abstract_extra`, None meaning the
    run has no extra state) before anything is restored; returns its meta.

    `hint` is added to the error message (e.g. which config keys changed); `meta`
    skips reading it again.
    """
    meta = dict(meta) if meta is not None else self.read_meta(step)
    where = f'checkpoint {self.step_dir(meta["step"])}'
    check_fingerprints(meta, abstract_params, abstract_opt_state, where=where,
                       hint=hint, abstract_extra=abstract_extra,
                       check_extra=check_extra)
    return meta

  def restore(self, abstract_params, abstract_opt_state, step: int | None = None,
              *, abstract_extra=None):
    """Restores (params, opt_state, meta) onto the shardings of the abstract trees;
    with `abstract_extra` (the run has extra state, see `save`), (params,
    opt_state, meta, extra).

    The abstract trees are pytrees of `jax.ShapeDtypeStruct` with `.sharding` (e.g.
    from `jax.eval_shape` + shardings), or concrete arrays; NamedTuple optimizer state
    comes back with its original classes. All fingerprints are checked first
    (IncompatibleCheckpointError: also when the step has extra state and
    `abstract_extra` is None, or the other way round); unreadable files raise
    DamagedCheckpointError.
    """
    step = self._resolve(step)
    self.check_compatible(abstract_params, step, abstract_opt_state=abstract_opt_state,
                          abstract_extra=abstract_extra, check_extra=True)
    to_abs = lambda t: jax.tree.map(ocp.utils.to_shape_dtype_struct, t)
    items = dict(params=ocp.args.StandardRestore(to_abs(abstract_params)),
                 opt_state=ocp.args.StandardRestore(to_abs(_wrap(abstract_opt_state))),
                 meta=ocp.args.JsonRestore())
    if abstract_extra is not None:
      items['extra'] = ocp.args.StandardRestore(to_abs(abstract_extra))
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      raise self.damaged(step, e) from None
    if abstract_extra is None:
      return out['params'], out['opt_state']['state'], out['meta']
    return out['params'], out['opt_state']['state'], out['meta'], out['extra']

  def _resolve(self, step):
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f'no complete checkpoint in {self.directory}')
      return max(steps)
    if int(step) not in steps:
      raise FileNotFoundError(
          f'no checkpoint for step {step} in {self.directory}; have {sorted(steps)}')
    return int(step)

  def close(self):
    self._mngr.close()


def check_fingerprints(meta: Mapping[str, Any], abstract_params,
                       abstract_opt_state=None, *, where: str, hint: str = '',
                       abstract_extra=None, check_extra: bool = False) -> None:
  """Compares a step's stored fingerprints with the trees about to be restored.

  The optimizer state is compared when given and the meta has its fingerprint
  (checkpoints written before it was stored have none). With `check_extra` the
  extra state is compared too, `abstract_extra=None` meaning "none" (a step
  without extra state has the empty fingerprint). Raises
  IncompatibleCheckpointError naming the first differing key, plus `hint`.
  """
  compare_fingerprints(fingerprint(abstract_params), meta.get('fingerprint', {}),
                       where, hint=hint)
  if abstract_opt_state is not None and 'opt_fingerprint' in meta:
    compare_fingerprints(fingerprint(abstract_opt_state), meta['opt_fingerprint'],
                         where, what='optimizer', hint=hint)
  if check_extra:
    compare_fingerprints(
        fingerprint(abstract_extra) if abstract_extra is not None else {},
        meta.get('extra_fingerprint', {}), where, what='training state', hint=hint)


def _find_ckpt_root(path: str) -> tuple[str, int | None]:
  """Maps a workdir / checkpoints dir / step dir to (workdir-like root, step or None)."""
  path = fileio.abspath(path)
  if not fileio.isdir(path):
    raise FileNotFoundError(f'no such checkpoint directory: {path}')
  if fileio.isdir(os.path.join(path, CKPT_SUBDIR)):
    return path, None
  if os.path.basename(path) == CKPT_SUBDIR:
    return os.path.dirname(path), None
  if fileio.isdir(os.path.join(path, 'params')) and re.fullmatch(
      r'\d+', os.path.basename(path)):
    parent = os.path.dirname(path)
    if os.path.basename(parent) == CKPT_SUBDIR:
      return os.path.dirname(parent), int(os.path.basename(path))
  raise FileNotFoundError(
      f'{path} is not a training workdir (no {CKPT_SUBDIR}/ inside), a checkpoints '
      'directory, or a checkpoint step directory')


def restore_params(workdir_or_dir: str, step: int | None = None, mesh=None, *,
                   expected=None,
                   hint: str | Callable[[Mapping[str, Any]], str] = '') -> dict:
  """Returns the params of a training checkpoint (host numpy, or global arrays).

  `workdir_or_dir` is a training workdir, its `checkpoints/` directory, or a step
  directory `checkpoints/<step>`; `step=None` takes the latest complete step (or the
  step named by the directory). With `mesh` (a `parallel.make_mesh` mesh), the params
  come back as global arrays sharded over it by `parallel.tree_shardings`.
  `expected` (the params, or their shapes, of the model they are for) is compared
  with the stored fingerprint before anything is read (IncompatibleCheckpointError
  naming the key, plus `hint`, or `hint(meta)` when it is a function); unreadable
  files raise DamagedCheckpointError.
  """
  root, dir_step = _find_ckpt_root(workdir_or_dir)
  if step is not None and dir_step is not None and int(step) != dir_step:
    raise ValueError(f'step={step} conflicts with step directory {workdir_or_dir}')
  ckpt = Checkpointer(root, create=False)
  try:
    step = ckpt._resolve(step if step is not None else dir_step)
    meta = ckpt.read_meta(step)
    fp = meta.get('fingerprint', {})
    if expected is not None:
      compare_fingerprints(fingerprint(expected), fp,
                           f'checkpoint {ckpt.step_dir(step)}',
                           hint=hint(meta) if callable(hint) else hint)
    mngr = ckpt._mngr
    try:
      md = mngr.item_metadata(step)['params']
    except Exception as e:  # pylint: disable=broad-except
      raise ckpt.damaged(step, e) from None
    tree = md.tree if hasattr(md, 'tree') else md
    if mesh is None:
      dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      shardings = jax.tree.map(lambda m: dev, tree)
    else:
      from s2d_jax import parallel  # pylint: disable=g-import-not-at-top
      shardings = parallel.tree_shardings(
          jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree),
          mesh)
    abstract = jax.tree.map(
        lambda m, sh: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sh), tree,
        shardings)
    try:
      out = mngr.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract)))['params']
    except Exception as e:  # pylint: disable=broad-except
      raise ckpt.damaged(step, e) from None
  finally:
    ckpt.close()
  got = fingerprint(out)
  if fp:
    compare_fingerprints(fp, got, f'checkpoint {root}/{CKPT_SUBDIR}/{step}')
  return out if mesh is not None else jax.tree.map(np.asarray, out)
