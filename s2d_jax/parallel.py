"""One device mesh for training and evaluation, on one CPU or a multi-host TPU pod.

A 2-D mesh ('data', 'fsdp') over all devices of all processes. Batches are split over
both axes (`batch_sharding`); params and optimizer state are replicated over 'data'
and, with fsdp > 1, split along their largest dimension that the fsdp size divides
(big_vision's FSDP rule, `fsdp_spec`). Every process feeds its own rows of each global
batch (`global_batch`: `jax.make_array_from_process_local_data`); host values that
every process holds in full (an npz read by each process) become global arrays with
`put` without any collective.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


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


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """This process's rows of a batch -> global arrays split over the mesh.

  Process p's `b` rows become rows [p·b, (p+1)·b) of the global batch (devices are
  ordered by process in `make_mesh`'s mesh), so a global batch does not depend on
  how many processes read it.
  """
  sharding = batch_sharding(mesh)
  pcount = jax.process_count()
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    gshape = (v.shape[0] * pcount,) + v.shape[1:]
    out[k] = jax.make_array_from_process_local_data(sharding, v, gshape)
  return out


def put(tree, shardings):
  """Host values (identical on every process) -> global arrays on `shardings`.

  Leaves that already are global arrays with that sharding are kept as they are;
  others are resharded (jax arrays) or placed from host memory (numpy), each process
  placing only its own shards.
  """
  return jax.tree.map(put_leaf, tree, shardings)


def to_host(tree):
  """Global arrays (possibly split over processes) -> numpy on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def put_leaf(x, sharding):
  """One host value (identical on every process) -> a global array on `sharding`."""
  if isinstance(x, jax.Array):
    return x if x.sharding == sharding else jax.device_put(x, sharding)
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def local_copy(tree):
  """Fully replicated global arrays -> this process's copy on its first device.

  For host-side work on replicated values (PCDR selection, report statistics): the
  eager ops then run on one local device, not as programs over every process's
  devices. Other leaves are returned unchanged.
  """
  def one(x):
    if isinstance(x, jax.Array) and x.sharding.is_fully_replicated:
      return x.addressable_data(0)
    return x
  return jax.tree.map(one, tree)
