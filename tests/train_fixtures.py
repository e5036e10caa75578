"""Shared trainer configs for the trainer tests (test_train, test_resume, test_qat).

`tiny_demo_config(data_dir, overrides)`: the shipped `demo` config at size 'tiny' on
the session's demo data (tests/conftest.py `data_dir`), with evaluation and npz export
off and a log record every step, then `overrides` ({dotted key: value}, applied in
order with `config_utils.apply_overrides`). Each test file states its own step count,
checkpoint cadence, etc. as overrides.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from s2d_jax import config_utils as cu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, 'configs', 'demo.py')


def tiny_demo_config(data_dir: str, overrides: Mapping[str, Any] = ()):
  c = cu.load_config(f'{DEMO}:size=tiny,data_dir={data_dir}')
  c.evaluate.enabled = False
  c.export_npz = False
  c.log_every = 1
  for k, v in dict(overrides).items():
    cu.apply_overrides(c, {k: v})
  return c
