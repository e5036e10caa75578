"""Training checkpoints with orbax: params, optimizer state, data position, step.

Layout (one orbax `CheckpointManager` under `WORKDIR/checkpoints`):

    WORKDIR/checkpoints/<step>/params/      StandardSave of the params pytree
    WORKDIR/checkpoints/<step>/opt_state/   StandardSave of the optimizer state (S2D
                                            bases, Adam moments, counts, active k ...)
    WORKDIR/checkpoints/<step>/meta/        JSON: step, data position, model fingerprint

Orbax writes each step into a temporary directory and renames it when complete, so a
crash while saving never leaves a step directory that `latest_step` would pick up:
after a crash, training resumes from the last *complete* checkpoint. Saving is
synchronous (`enable_async_checkpointing=False`): when `save` returns, the step is on
disk. The `max_to_keep` newest steps are kept.

The *model fingerprint* is `{'/'.join(path): [shape..., dtype]}` of the params; on
restore it is compared against the model being trained, and a checkpoint written for a
different model raises a `ValueError` naming the first differing key and both shapes
before anything is loaded.

`restore_params(path, step=None, mesh=None)` returns only the params from a workdir,
its `checkpoints` directory, or one step directory: as host numpy arrays, or with
`mesh` as global arrays split over it by the FSDP rule (`s2d_jax.parallel`), each
process reading only its own shards (multi-host evaluation of a sharded model without
gathering it on a host); evaluate.py uses it without importing the trainer.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

CKPT_SUBDIR = 'checkpoints'
_ITEMS = ('params', 'opt_state', 'meta')


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
                         where: str) -> None:
  """Raises ValueError naming the first key that is missing, extra or reshaped."""
  missing = sorted(set(expected) - set(found))
  extra = sorted(set(found) - set(expected))
  if missing or extra:
    raise ValueError(
        f'{where} was written for another model: params missing from it: '
        f'{missing[:5]}{" ..." if len(missing) > 5 else ""}; params only in it: '
        f'{extra[:5]}{" ..." if len(extra) > 5 else ""}')
  for k in sorted(expected):
    if list(expected[k][:-1]) != list(found[k][:-1]):
      raise ValueError(
          f'{where} was written for another model: {k!r} has shape '
          f'{tuple(found[k][:-1])} there but {tuple(expected[k][:-1])} in the model')


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, CKPT_SUBDIR)


def _handlers():
  return {
      'params': ocp.StandardCheckpointHandler(),
      'opt_state': ocp.StandardCheckpointHandler(),
      'meta': ocp.JsonCheckpointHandler(),
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
    self.directory = os.path.abspath(checkpoint_dir(workdir))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=False, create=create,
        read_only=not create)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options, item_names=_ITEMS,
        item_handlers=_handlers())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, params, opt_state, meta: Mapping[str, Any] | None = None,
           ) -> None:
    """Writes step `step` (params, opt_state, JSON meta incl. the model fingerprint).

    `meta` must be JSON-serialisable (data position, rng seed, config ...). Returns
    when the checkpoint is complete on disk.
    """
    meta = dict(meta or {})
    meta['step'] = int(step)
    meta['fingerprint'] = fingerprint(params)
    json.dumps(meta)  # fail early (before writing) on non-JSON meta
    self._mngr.save(int(step), args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(_wrap(opt_state)),
        meta=ocp.args.JsonSave(meta)), force=True)
    self._mngr.wait_until_finished()

  def read_meta(self, step: int | None = None) -> dict:
    step = self._resolve(step)
    return self._mngr.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']

  def check_compatible(self, abstract_params, step: int | None = None) -> dict:
    """Checks the checkpoint's fingerprint against `abstract_params`; returns meta."""
    meta = self.read_meta(step)
    compare_fingerprints(fingerprint(abstract_params), meta.get('fingerprint', {}),
                         f'checkpoint {self.directory}/{meta["step"]}')
    return meta

  def restore(self, abstract_params, abstract_opt_state, step: int | None = None):
    """Restores (params, opt_state, meta) onto the shardings of the abstract trees.

    The abstract trees are pytrees of `jax.ShapeDtypeStruct` with `.sharding` (e.g.
    from `jax.eval_shape` + shardings), or concrete arrays; NamedTuple optimizer state
    comes back with its original classes.
    """
    step = self._resolve(step)
    self.check_compatible(abstract_params, step)
    to_abs = lambda t: jax.tree.map(ocp.utils.to_shape_dtype_struct, t)
    out = self._mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(to_abs(abstract_params)),
        opt_state=ocp.args.StandardRestore(to_abs(_wrap(abstract_opt_state))),
        meta=ocp.args.JsonRestore()))
    return out['params'], out['opt_state']['state'], out['meta']

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


def _find_ckpt_root(path: str) -> tuple[str, int | None]:
  """Maps a workdir / checkpoints dir / step dir to (workdir-like root, step or None)."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'no such checkpoint directory: {path}')
  if os.path.isdir(os.path.join(path, CKPT_SUBDIR)):
    return path, None
  if os.path.basename(path) == CKPT_SUBDIR:
    return os.path.dirname(path), None
  if os.path.isdir(os.path.join(path, 'params')) and re.fullmatch(
      r'\d+', os.path.basename(path)):
    parent = os.path.dirname(path)
    if os.path.basename(parent) == CKPT_SUBDIR:
      return os.path.dirname(parent), int(os.path.basename(path))
  raise FileNotFoundError(
      f'{path} is not a training workdir (no {CKPT_SUBDIR}/ inside), a checkpoints '
      'directory, or a checkpoint step directory')


def restore_params(workdir_or_dir: str, step: int | None = None, mesh=None) -> dict:
  """Returns the params of a training checkpoint (host numpy, or global arrays).

  `workdir_or_dir` is a training workdir, its `checkpoints/` directory, or a step
  directory `checkpoints/<step>`; `step=None` takes the latest complete step (or the
  step named by the directory). With `mesh` (a `parallel.make_mesh` mesh), the params
  come back as global arrays sharded over it by `parallel.tree_shardings`.
  """
  root, dir_step = _find_ckpt_root(workdir_or_dir)
  if step is not None and dir_step is not None and int(step) != dir_step:
    raise ValueError(f'step={step} conflicts with step directory {workdir_or_dir}')
  ckpt = Checkpointer(root, create=False)
  try:
    step = ckpt._resolve(step if step is not None else dir_step)
    meta = ckpt.read_meta(step)
    fp = meta.get('fingerprint', {})
    mngr = ckpt._mngr
    md = mngr.item_metadata(step)['params']
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
    out = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract)))['params']
  finally:
    ckpt.close()
  got = fingerprint(out)
  if fp:
    compare_fingerprints(fp, got, f'checkpoint {root}/{CKPT_SUBDIR}/{step}')
  return out if mesh is not None else jax.tree.map(np.asarray, out)
