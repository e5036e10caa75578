"""Metrics logging: one JSON object per line in WORKDIR/metrics.jsonl, plus a console line.

Each record is `{"step": int, "time": seconds since start, **scalars}`; scalars are
converted to Python floats/ints (numpy / jax scalars included). Only process 0
writes (multi-host runs log once). The file is opened in append mode and flushed
after every record, so a resumed run continues the same file and a crash loses
nothing already logged.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import numpy as np


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
  """Writes metrics records to a JSONL file (process 0 only) and echoes to console.

  Args:
    path: JSONL file (parent directories are created).
    enabled: False on non-zero processes: nothing is written or printed.
    stream: where the console line goes (default stdout); None = silent console.
  """

  def __init__(self, path: str, *, enabled: bool = True, stream=sys.stdout):
    self.path = path
    self.enabled = enabled
    self.stream = stream
    self._t0 = time.time()
    self._f = None
    if enabled:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      self._f = open(path, 'a', encoding='utf-8')

  def write(self, step: int, scalars: Mapping[str, Any], *, echo: bool = True) -> dict:
    record = {'step': int(step), 'time': round(time.time() - self._t0, 3)}
    record.update({k: _to_py(v) for k, v in scalars.items()})
    if self._f is not None:
      self._f.write(json.dumps(record) + '\n')
      self._f.flush()
    if echo and self.enabled and self.stream is not None:
      self.stream.write(format_line(record) + '\n')
      self.stream.flush()
    return record

  def close(self):
    if self._f is not None:
      self._f.close()
      self._f = None


def format_line(record: Mapping[str, Any]) -> str:
  """'step 100 | loss 2.3012 | acc 0.1250 | lr 1.00e-04 | ...' (lists, dicts and
  per-item keys containing '/' are skipped)."""
  parts = [f"step {record.get('step')}"]
  for k, v in record.items():
    if k in ('step', 'time') or isinstance(v, (list, dict)) or '/' in k:
      continue  # per-kernel entries ('sigma_max/<path>') only go to the file
    if isinstance(v, float):
      if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5) and math.isfinite(v):
        parts.append(f'{k} {v:.2e}')
      else:
        parts.append(f'{k} {v:.4f}')
    else:
      parts.append(f'{k} {v}')
  return ' | '.join(parts)


def read_metrics(path: str) -> list[dict]:
  """All records of a metrics.jsonl file, in order."""
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]
