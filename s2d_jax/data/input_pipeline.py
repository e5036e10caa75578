"""tfds + tf.data input pipelines: deterministic, resumable, multi-host.

Datasets are any prepared tfds dataset with image/label-like features
(``imagenet2012``, ``cifar100``, ``oxford_iiit_pet``, the embedded demo
``s2d_demo_shapes``, or your own); nothing is ever downloaded: a dataset that
is not prepared in ``data_dir`` is a :class:`DatasetNotFoundError` naming the
dataset and the directory.

Sharding. Process ``p`` of ``P`` reads only its part of the split,
``tfds.split_for_jax_process(split, process_index=p, process_count=P)``
(``tfds.even_splits``; for training with ``drop_remainder=True`` so that every
process has the same ``n`` examples). ``batch_size`` is the *per-process*
(local) batch size ``b``: each process yields ``b`` examples per step and the
global batch is ``b * P`` (big_vision's ``config.input.batch_size`` is global:
pass ``batch_size=global // jax.process_count()``).

Training order (deterministic, resumable). Records are read in file order
(tfds shuffles examples when it writes them, so files are already in random
order); process ``p``'s examples are numbered ``i = 0..n-1``. Epoch ``e`` is a
shuffle of the shard with a ``shuffle_buffer_size`` buffer seeded by
``fold_in((seed, p), e)``, so every epoch has its own order and the whole
stream is a fixed function of ``(seed, p, P)``. Batches run across epoch
boundaries (the stream is the concatenation of epochs 0, 1, 2, ...). Resuming
at step ``s`` starts at example ``s * b`` of that stream: epoch ``e =
⌊s b / n⌋`` and ``skip(s b mod n)`` inside it; the skip happens before
decoding, so it costs at most one epoch of record reads, and the batches are
identical to those of an uninterrupted run. Random augmentations are
reproducible too: every example carries the stateless seed
``'_rng' = fold_in(fold_in((seed, p), e), i)`` that
:mod:`s2d_jax.models.preprocess` random ops consume.

Evaluation. :func:`get_eval_dataset` reads the split in order; with global batch
``G = b * P``, global batch ``k`` is examples ``[k G, (k+1) G)`` and process ``p``
gets its rows ``[k G + p b, k G + (p+1) b)``, so global batch ``k`` holds the same
examples whatever the number of processes (an evaluation gives the same report on
1 or N processes). The split is padded with all-zero examples to ``K * G``,
``K = ⌈n / G⌉`` (the same number of batches on every process, as multi-host ``jit``
needs), and ``'_mask'`` marks real examples (1) and padding (0). Every process
reads (not decodes) the whole split to pick its rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Callable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from s2d_jax.data import demo as _demo  # noqa: F401  (registers s2d_demo_shapes)
from s2d_jax.models import preprocess as pp_lib

MASK_KEY = "_mask"
AUTOTUNE = tf.data.AUTOTUNE


class DatasetNotFoundError(FileNotFoundError):
  """The tfds dataset is unknown or not prepared in ``data_dir``."""


def _process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, "
                     f"process_count={process_count})")
  return int(process_index), int(process_count)


def get_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """The tfds builder of a *prepared* dataset; never downloads.

  Raises:
    DatasetNotFoundError: naming the dataset and ``data_dir``.
  """
  where = data_dir or "the default tfds data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
  try:
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotFoundError(
        f"tfds dataset {name!r} is neither registered nor found in "
        f"data_dir={where}: {str(e).splitlines()[0]}") from e
  if not builder.is_prepared():
    raise DatasetNotFoundError(
        f"tfds dataset {name!r} (version {builder.version}) is not prepared in "
        f"data_dir={where} (looked in {builder.data_dir}). s2d_jax never "
        f"downloads data: prepare it first, e.g. `tfds build {name} "
        f"--data_dir=...` (imagenet2012 needs the manual download), or point "
        "data_dir at a directory that holds it.")
  return builder


def _check_split(builder, split):
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise ValueError(f"bad split {split!r} for dataset {builder.info.full_name!r}"
                     f" (splits: {sorted(builder.info.splits)}): {e}") from e


def num_examples(name: str, split: str, *, data_dir: str | None = None,
                 process_index: int = 0, process_count: int = 1,
                 drop_remainder: bool = False) -> int:
  """Examples in process ``process_index``'s shard of ``split``."""
  builder = get_builder(name, data_dir)
  _check_split(builder, split)
  sub = tfds.split_for_jax_process(split, process_index=process_index,
                                   process_count=process_count,
                                   drop_remainder=drop_remainder)
  return builder.info.splits[sub].num_examples


def _local_batch(batch_size):
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
      or batch_size <= 0:
    raise ValueError(f"batch_size (per process) must be a positive int, got "
                     f"{batch_size!r}")
  return int(batch_size)


def _raw(builder, split, *, process_index, process_count, drop_remainder,
         features):
  """(shard size, dataset of raw examples in file order, images not decoded)."""
  _check_split(builder, split)
  sub = tfds.split_for_jax_process(split, process_index=process_index,
                                   process_count=process_count,
                                   drop_remainder=drop_remainder)
  n = builder.info.splits[sub].num_examples
  feats = builder.info.features
  # Variable-size images stay encoded until the pp `decode` op (which is a
  # no-op on decoded images); fixed-size ones are decoded by tfds, which keeps
  # their static shape.
  decoders = {k: tfds.decode.SkipDecoding() for k, f in feats.items()
              if isinstance(f, tfds.features.Image)
              and None in tuple(f.shape)}
  ds = builder.as_dataset(split=sub, shuffle_files=False, decoders=decoders,
                          read_config=tfds.ReadConfig(add_tfds_id=False))
  if features:
    missing = [k for k in features if k not in feats]
    if missing:
      raise KeyError(f"features {missing} not in dataset "
                     f"{builder.info.full_name!r} (features: {sorted(feats)})")
    ds = ds.map(lambda ex: {features.get(k, k): v for k, v in ex.items()})
  return n, ds


def _check_static_shapes(ds, what):
  for k, spec in ds.element_spec.items():
    if not spec.shape.is_fully_defined():
      raise ValueError(
          f"{what}: after preprocessing, key {k!r} has shape {spec.shape} that "
          "is not fully defined, so examples cannot be batched; add a resize/"
          "crop to a fixed size or drop it with keep(...)/drop(...)")


def _seed2(seed, process_index):
  return tf.constant([seed, process_index], tf.int64)


def get_dataset(name: str, split: str, *, preprocess: str | Callable | None,
                batch_size: int, process_index: int | None = None,
                process_count: int | None = None, shuffle: bool = True,
                seed: int = 0, data_dir: str | None = None, start_step: int = 0,
                shuffle_buffer_size: int = 10_000,
                features: Mapping[str, str] | None = None, cache: bool = False,
                num_parallel_calls: int = AUTOTUNE, prefetch: int = 2
                ) -> tf.data.Dataset:
  """Infinite, deterministic training stream of batches of this process.

  Args:
    name: tfds name (``"cifar100"``, ``"s2d_demo_shapes/tiny"``, ...).
    split: tfds split string (``"train[:99%]"``).
    preprocess: big_vision pp string (or a function on example dicts).
    batch_size: examples per batch *of this process* (global batch =
      batch_size * process_count).
    process_index, process_count: this process / all (default: jax's).
    shuffle: shuffle each epoch (otherwise file order every epoch).
    seed: data seed (order and augmentation).
    data_dir: tfds data directory.
    start_step: resume: the stream starts at step ``start_step`` exactly as an
      uninterrupted run would reach it.
    shuffle_buffer_size: examples in the shuffle buffer.
    features: optional renaming of raw features, e.g. ``{"img": "image"}``.
    cache: keep the raw (encoded) records in memory after the first epoch.
    num_parallel_calls, prefetch: tf.data performance knobs (do not change
      the results).

  Returns:
    A ``tf.data.Dataset`` of dicts with a leading ``batch_size`` axis.
  """
  process_index, process_count = _process(process_index, process_count)
  local = _local_batch(batch_size)
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  builder = get_builder(name, data_dir)
  n, raw = _raw(builder, split, process_index=process_index,
                process_count=process_count, drop_remainder=True,
                features=features)
  if n == 0:
    raise ValueError(f"{name!r} split {split!r} has no examples for process "
                     f"{process_index} of {process_count}")
  if cache:
    raw = raw.cache()
  raw = raw.enumerate()
  base = _seed2(seed, process_index)
  pp_fn = preprocess if callable(preprocess) else pp_lib.get_preprocess_fn(preprocess)

  def epoch(e):
    ekey = tf.random.experimental.stateless_fold_in(base, e)
    d = raw
    if shuffle:
      # A scalar seed that depends on the whole key (fold_in's result is
      # (H(key), e): its first entry alone does not change with e).
      shuffle_seed = tf.random.stateless_uniform(
          [], seed=ekey, dtype=tf.int64, minval=None, maxval=None)
      d = d.shuffle(shuffle_buffer_size, seed=shuffle_seed,
                    reshuffle_each_iteration=False)

    def add_rng(i, ex):
      ex = dict(ex)
      ex[pp_lib.RNG_KEY] = tf.random.experimental.stateless_fold_in(ekey, i)
      return ex
    return d.map(add_rng)

  first_epoch, offset = divmod(start_step * local, n)
  ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max)
  ds = ds.flat_map(epoch).skip(offset)
  ds = ds.map(pp_fn, num_parallel_calls=num_parallel_calls, deterministic=True)
  _check_static_shapes(ds, f"get_dataset({name!r}, {split!r})")
  ds = ds.batch(local, drop_remainder=True)
  return ds.prefetch(prefetch)


def steps_per_epoch(name: str, split: str, *, batch_size: int,
                    data_dir: str | None = None, process_count: int = 1) -> int:
  """⌊n / batch_size⌋, n = the (equal) per-process training shard size."""
  local = _local_batch(batch_size)
  n = num_examples(name, split, data_dir=data_dir, process_index=0,
                   process_count=process_count, drop_remainder=True)
  return n // local


def iterate_train(*args, **kwargs) -> Iterator[dict[str, np.ndarray]]:
  """:func:`get_dataset` as an iterator of numpy batches."""
  return get_dataset(*args, **kwargs).as_numpy_iterator()


train_iterator = iterate_train


def get_eval_dataset(name: str, split: str, *, preprocess: str | Callable | None,
                     batch_size: int, process_index: int | None = None,
                     process_count: int | None = None, seed: int = 0,
                     data_dir: str | None = None,
                     features: Mapping[str, str] | None = None,
                     num_parallel_calls: int = AUTOTUNE, prefetch: int = 2
                     ) -> tuple[tf.data.Dataset, int]:
  """One pass over this process's rows of every global batch, padded, with ``'_mask'``.

  ``batch_size`` is per process (``b``); see the module docstring for which rows
  process ``p`` gets. Random preprocessing ops get the stateless seed
  ``fold_in(seed, i)`` of the example's index ``i`` in the split (the same on any
  number of processes).

  Returns:
    ``(dataset, num_batches)``; every process gets the same ``num_batches``
    (``⌈n / (b P)⌉``, at least 1); padding examples are all zeros with
    ``_mask = 0``.
  """
  process_index, process_count = _process(process_index, process_count)
  local = _local_batch(batch_size)
  builder = get_builder(name, data_dir)
  n, raw = _raw(builder, split, process_index=0, process_count=1,
                drop_remainder=False, features=features)
  glob = local * process_count
  num_batches = max(1, math.ceil(n / glob))
  lo = process_index * local
  mine = sum(max(0, min(n - k * glob - lo, local)) for k in range(num_batches))
  pp_fn = preprocess if callable(preprocess) else pp_lib.get_preprocess_fn(preprocess)
  base = _seed2(seed, 0)

  def prep(i, ex):
    ex = dict(ex)
    ex[pp_lib.RNG_KEY] = tf.random.experimental.stateless_fold_in(base, i)
    ex = pp_fn(ex)
    if MASK_KEY in ex:
      raise ValueError(f"preprocessing must not produce the key {MASK_KEY!r}")
    ex[MASK_KEY] = tf.constant(1, tf.int32)
    return ex

  ds = raw.enumerate()
  if process_count > 1:
    ds = ds.filter(lambda i, ex: (i % glob) // local == process_index)
  ds = ds.map(prep, num_parallel_calls=num_parallel_calls, deterministic=True)
  _check_static_shapes(ds, f"get_eval_dataset({name!r}, {split!r})")
  pad = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype),
                              ds.element_spec)
  pad[MASK_KEY] = tf.constant(0, tf.int32)
  n_pad = num_batches * local - mine
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(n_pad))
  ds = ds.batch(local, drop_remainder=True)
  return ds.prefetch(prefetch), num_batches


def iterate_eval(*args, **kwargs) -> Iterator[dict[str, np.ndarray]]:
  """:func:`get_eval_dataset` as an iterator of numpy batches (with ``_mask``)."""
  ds, _ = get_eval_dataset(*args, **kwargs)
  return ds.as_numpy_iterator()


def get_info(name: str, data_dir: str | None = None) -> tfds.core.DatasetInfo:
  """``DatasetInfo`` (features, class names, split sizes) of a prepared dataset."""
  return get_builder(name, data_dir).info


def num_classes(name: str, data_dir: str | None = None, key: str = "label") -> int:
  """Classes of the ClassLabel feature ``key`` (a clear error if absent)."""
  feats = get_info(name, data_dir).features
  if key not in feats or not isinstance(feats[key], tfds.features.ClassLabel):
    raise KeyError(f"dataset {name!r} has no ClassLabel feature {key!r} "
                   f"(features: {sorted(feats)})")
  return feats[key].num_classes


__all__ = ["DatasetNotFoundError", "MASK_KEY", "get_builder", "get_dataset",
           "get_eval_dataset", "get_info", "iterate_eval", "iterate_train",
           "train_iterator",
           "num_classes", "num_examples", "steps_per_epoch"]

