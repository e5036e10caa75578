"""File I/O for workdir files, local or remote (`gs://`, any `tf.io.gfile` scheme).

Every file the project writes or reads in a workdir (config.json, metrics.jsonl,
params.npz, report.json, results.*, plots) goes through these helpers, so that
`--workdir gs://bucket/run` really writes to the bucket instead of a local folder
`./gs:/bucket/run/`. A path is *remote* when it contains `://`; remote paths go
through `tf.io.gfile` (TensorFlow imported lazily, on the first remote call, so
`import s2d_jax` stays TensorFlow-free); local paths through `os` and the builtin
`open` (no TensorFlow import, no overhead).

Atomic writes (`atomic_write_text`, `atomic_write_bytes`, `replace`): the data go
to `path + '.tmp'` first, then are renamed over `path`, so a reader never sees a
half-written file. Locally that is `os.replace` (atomic on POSIX). Remotely it is
`tf.io.gfile.rename(overwrite=True)`; on GCS a rename is a server-side copy
followed by a delete of the source (not one atomic operation, but the target
object only ever holds a complete upload; a crash between the two steps leaves a
stray `.tmp` object next to it).

Appending (`open(path, 'a')`): GCS objects cannot be appended to; TensorFlow's
GCS filesystem emulates it by re-uploading the whole object at every flush, so a
metrics.jsonl on gs:// costs one upload of the file per logged step.
"""

from __future__ import annotations

import builtins
import io
import os
from typing import IO


def is_remote(path: str) -> bool:
  """True for paths with a URL scheme (`gs://b/x`, `ram://x`): tf.io.gfile's."""
  return '://' in str(path)


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def abspath(path: str) -> str:
  """`os.path.abspath` for local paths; remote paths unchanged (they are absolute)."""
  return path if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
  return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
  """Creates `path` and its parents; an existing directory is fine."""
  if is_remote(path):
    _gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
  if is_remote(path):
    _gfile().remove(path)
  else:
    os.remove(path)


def open(path: str, mode: str = 'r') -> IO:  # pylint: disable=redefined-builtin
  """A file object: builtin `open` (text modes in UTF-8) or `tf.io.gfile.GFile`.

  A missing remote file read raises FileNotFoundError (as locally), not
  TensorFlow's NotFoundError.
  """
  if not is_remote(path):
    if 'b' in mode:
      return builtins.open(path, mode)
    return builtins.open(path, mode, encoding='utf-8')
  if 'r' in mode and not _gfile().exists(path):
    raise FileNotFoundError(f'No such file: {path!r}')
  return _gfile().GFile(path, mode)


def read_text(path: str) -> str:
  with open(path, 'r') as f:
    return f.read()


def read_bytes(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def replace(src: str, dst: str) -> None:
  """Renames `src` over `dst` (`os.replace`; remote: gfile rename with overwrite,
  a copy + delete on GCS, see the module docstring)."""
  if is_remote(src) != is_remote(dst):
    raise ValueError(f'replace: {src!r} and {dst!r} are not on the same filesystem')
  if is_remote(dst):
    _gfile().rename(src, dst, overwrite=True)
  else:
    os.replace(src, dst)


def atomic_write_bytes(path: str, data: bytes) -> str:
  """Writes `data` to `path + '.tmp'`, then renames it over `path`; returns `path`."""
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(data)
  replace(tmp, path)
  return path


def atomic_write_text(path: str, text: str) -> str:
  """`atomic_write_bytes` of `text` in UTF-8."""
  return atomic_write_bytes(path, text.encode('utf-8'))


def save_figure(fig, path: str, **kwargs) -> str:
  """`fig.savefig(path, **kwargs)`; remote: rendered in memory (format from the
  extension), then written with `atomic_write_bytes`. Returns `path`."""
  if not is_remote(path):
    fig.savefig(path, **kwargs)
    return path
  buf = io.BytesIO()
  fmt = kwargs.pop('format', None) or os.path.splitext(path)[1].lstrip('.') or 'png'
  fig.savefig(buf, format=fmt, **kwargs)
  return atomic_write_bytes(path, buf.getvalue())
