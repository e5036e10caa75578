"""Metrics logging: WORKDIR/metrics.jsonl, TensorBoard event files, a console line.

Each record is `{"step": int, "time": seconds since start, **scalars}`; scalars are
converted to Python floats/ints (numpy / jax scalars included). Only process 0
writes (multi-host runs log once). The JSONL file is opened in append mode and
flushed after every record, so a resumed run continues the same file and a crash
loses nothing already logged; a run that (re)starts from step N first drops the
records of steps > N (logged after the checkpoint it resumes from) and a torn last
line, so every step appears once (`keep_steps_upto`). The same scalars go to
TensorBoard event files in `tb_dir` (`flax.metrics.tensorboard`; `tensorboard
--logdir WORKDIR`), one new file per (re)start; the events of steps > N are dropped
from the earlier files in the same way (`keep_events_upto`: each file rewritten
without them, atomically), so any reader of the files sees every step once.
(TensorBoard's own remedy, a `SessionLog.START` event at step N + 1, is honoured
only by its Python loader with `--purge_orphaned_data`; readers such as
`tf.compat.v1.train.summary_iterator` or pandas exports would still see both.)

Progress (`Chrono`, as big_vision's chrono): steps/s since the previous log line and
an ETA from the average rate since the first step of this (re)start, which is left
out because it includes compilation.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import numpy as np

from s2d_jax import fileio


def _to_py(v: Any):
  if isinstance(v, (bool, np.bool_)):
    return bool(v)
  if isinstance(v, (int, np.integer)):
    return int(v)
  arr = np.asarray(v)
  if arr.ndim == 0:
    if np.issubdtype(arr.dtype, np.integer):
      return int(arr)
    return float(arr)
  return arr.tolist()


class MetricWriter:
  """Writes metrics records to JSONL and TensorBoard (process 0 only), echoes a line.

  Args:
    path: JSONL file (parent directories are created).
    enabled: False on non-zero processes: nothing is written or printed.
    stream: where the console line goes (default stdout); None = silent console.
    tb_dir: directory of the TensorBoard event files (None = no TensorBoard).
    start_step: the step this run starts from (0, or the checkpoint it resumed):
      records and TensorBoard events of later steps already written are dropped
      (`keep_steps_upto`, `keep_events_upto`).
  """

  def __init__(self, path: str, *, enabled: bool = True, stream=sys.stdout,
               tb_dir: str | None = None, start_step: int | None = None):
    self.path = path
    self.enabled = enabled
    self.stream = stream
    self._t0 = time.time()
    self._f = self._tb = None
    if enabled:
      fileio.makedirs(os.path.dirname(fileio.abspath(path)))
      if start_step is not None:
        keep_steps_upto(path, start_step)
      self._f = fileio.open(path, 'a')
      if tb_dir:
        if start_step is not None:
          keep_events_upto(tb_dir, start_step)
        from flax.metrics import tensorboard  # pylint: disable=g-import-not-at-top
        self._tb = tensorboard.SummaryWriter(tb_dir)

  def write(self, step: int, scalars: Mapping[str, Any], *, echo: bool = True) -> dict:
    record = {'step': int(step), 'time': round(time.time() - self._t0, 3)}
    record.update({k: _to_py(v) for k, v in scalars.items()})
    if self._f is not None:
      self._f.write(json.dumps(record) + '\n')
      self._f.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k != 'step' and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.scalar(k, v, int(step))
      self._tb.flush()
    if echo and self.enabled and self.stream is not None:
      self.stream.write(format_line(record) + '\n')
      self.stream.flush()
    return record

  def close(self):
    if self._f is not None:
      self._f.close()
      self._f = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


class Chrono:
  """Training progress: steps/s and ETA (big_vision's chrono, simplified).

  `start(step)` is called once the first step of this (re)start has finished (its
  compile time is excluded); `report(step)` then returns

      steps_per_sec = (step − previous step) / (now − previous time)
      eta_s         = (total − step) · (now − t_start) / (step − start_step)

  (`steps_per_sec` only before `start`). `clock` is injectable for tests.
  """

  def __init__(self, total_steps: int, clock=time.time):
    self.total = int(total_steps)
    self.clock = clock
    self._t_start = self._step_start = None
    self._t_prev = clock()
    self._step_prev = None

  def start(self, step: int) -> None:
    self._t_start = self._t_prev = self.clock()
    self._step_start = self._step_prev = int(step)

  def report(self, step: int) -> dict:
    now = self.clock()
    out = {}
    if self._step_prev is not None and step > self._step_prev:
      out['steps_per_sec'] = (step - self._step_prev) / max(now - self._t_prev, 1e-9)
    if self._step_start is not None and step > self._step_start:
      rate = (step - self._step_start) / max(now - self._t_start, 1e-9)
      out['eta_s'] = (self.total - step) / rate
    self._t_prev, self._step_prev = now, int(step)
    return out


def format_line(record: Mapping[str, Any]) -> str:
  """'step 100 | loss 2.3012 | acc 0.1250 | lr 1.00e-04 | ...' (lists, dicts and
  per-item keys containing '/' are skipped)."""
  total = record.get('total_steps')
  parts = [f"step {record.get('step')}" + (f'/{total}' if total else '')]
  for k, v in record.items():
    if k in ('step', 'time', 'total_steps') or isinstance(v, (list, dict)) or '/' in k:
      continue  # per-kernel entries ('sigma_max/<path>') only go to the file
    if k == 'eta_s':
      parts.append(f'ETA {_duration(v)}')
    elif isinstance(v, float):
      if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5) and math.isfinite(v):
        parts.append(f'{k} {v:.2e}')
      else:
        parts.append(f'{k} {v:.4f}')
    else:
      parts.append(f'{k} {v}')
  return ' | '.join(parts)


def _duration(seconds: float) -> str:
  """'1h02m03s' / '2m05s' / '7s'."""
  s = int(round(seconds))
  h, m, s = s // 3600, s // 60 % 60, s % 60
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s' if m else f'{s}s'


def keep_steps_upto(path: str, step: int) -> int:
  """Drops the records of steps > `step` (and unparsable lines: a write torn by a
  kill) from a metrics.jsonl file, atomically (temp + rename); returns how many
  were dropped. A missing file is left missing."""
  if not fileio.exists(path):
    return 0
  keep, dropped = [], 0
  with fileio.open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        ok = int(json.loads(line)['step']) <= int(step)
      except (ValueError, KeyError, TypeError):
        ok = False
      if ok:
        keep.append(line if line.endswith('\n') else line + '\n')
      else:
        dropped += 1
  if dropped:
    fileio.atomic_write_text(path, ''.join(keep))
  return dropped


def keep_events_upto(tb_dir: str, step: int) -> int:
  """Drops the events of steps > `step` from the TensorBoard event files in `tb_dir`.

  Every `*tfevents*` file (local or any `tf.io.gfile` path) that holds such an
  event, or a last record torn by a kill (TFRecord framing: length, CRC, data,
  CRC), is rewritten with the other records unchanged (a temporary file without
  'tfevents' in its name, then renamed over it, so a reader never sees half a
  file). Events without a step (the file-version header) have step 0 and stay.
  Returns how many records were dropped; a missing directory is left missing.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  if not tf.io.gfile.isdir(tb_dir):
    return 0
  dropped = 0
  for path in sorted(tf.io.gfile.glob(os.path.join(tb_dir, '*tfevents*'))):
    keep, drop = [], 0
    try:
      for record in tf.data.TFRecordDataset(path):
        raw = record.numpy()
        if event_pb2.Event.FromString(raw).step <= int(step):
          keep.append(raw)
        else:
          drop += 1
    except tf.errors.DataLossError:   # a record torn by a kill: the file's end
      drop += 1
    if drop:
      tmp = os.path.join(tb_dir, '.keep_events_upto.tmp')
      with tf.io.TFRecordWriter(tmp) as w:
        for raw in keep:
          w.write(raw)
      fileio.replace(tmp, path)
      dropped += drop
  return dropped


def read_metrics(path: str) -> list[dict]:
  """All records of a metrics.jsonl file, in order."""
  with fileio.open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
