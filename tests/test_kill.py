"""SIGKILL of a training process (between steps, and in the middle of writing a
checkpoint), then a resume: the final params are bit-identical to an uninterrupted
run and metrics.jsonl holds every step once. Tiny demo config, a few steps."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from s2d_jax import checkpointing
from s2d_jax import config_utils as cu
from s2d_jax import metrics
from s2d_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
OVERRIDES = {'total_steps': STEPS, 'ckpt_every': 2, 'log_every': 1,
             'evaluate.enabled': False, 'export_npz': False}


def _config(data_dir):
  c = cu.load_config(f'demo:size=tiny,data_dir={data_dir}')
  cu.apply_overrides(c, OVERRIDES)
  return c


def _kill_when(cmd, cond, timeout=240):
  """Starts `cmd`, SIGKILLs it as soon as `cond()` holds; returns whether it was
  killed (False: it finished first)."""
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH',
                                                                       ''))
  p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
  t0 = time.time()
  try:
    while p.poll() is None and time.time() - t0 < timeout:
      if cond():
        p.send_signal(signal.SIGKILL)
        p.wait()
        return True
      time.sleep(0.002)
    err = p.stderr.read().decode()[-2000:] if p.poll() is not None else ''
    assert p.poll() is not None, 'the training process hung'
    assert p.returncode == 0, err
    return False
  finally:
    if p.poll() is None:
      p.kill()
      p.wait()


def _saving_step_4(wd):
  d = os.path.join(wd, 'checkpoints')
  return os.path.isdir(d) and any(n.startswith('4.orbax-checkpoint-tmp')
                                  for n in os.listdir(d))


def _logged_step_3(wd):
  p = os.path.join(wd, 'metrics.jsonl')
  return os.path.exists(p) and '"step": 3,' in open(p).read()


def test_sigkill_between_steps_and_during_a_save_then_resume_is_bit_identical(
    data_dir, tmp_path):
  """Run 1 is SIGKILLed between steps (step 3 logged, checkpoint 2 complete); run 2
  resumes from 2 and is SIGKILLed while writing checkpoint 4; run 3 resumes from 2
  again and equals an uninterrupted run bit for bit (params and logged losses)."""
  wd = str(tmp_path / 'run')
  cmd = [sys.executable, '-m', 's2d_jax.train', '--config',
         f'demo:size=tiny,data_dir={data_dir}', '--workdir', wd] + [
             f'--config.{k}={v}' for k, v in OVERRIDES.items()]
  assert _kill_when(cmd, lambda: _logged_step_3(wd)), 'finished before step 3'
  assert checkpointing.Checkpointer(wd, create=False).all_steps() == [2]
  assert _kill_when(cmd, lambda: _saving_step_4(wd)), 'finished before saving 4'
  steps = checkpointing.Checkpointer(wd, create=False).all_steps()
  assert steps == [2], steps   # the half-written step 4 is never picked up
  res = train.train(_config(data_dir), wd, echo=False)
  assert res['start_step'] == 2
  ref = train.train(_config(data_dir), str(tmp_path / 'ref'), echo=False)
  for a, b in zip(jax.tree.leaves(jax.device_get(ref['params'])),
                  jax.tree.leaves(jax.device_get(res['params']))):
    np.testing.assert_array_equal(a, b)
  logged = metrics.read_metrics(os.path.join(wd, 'metrics.jsonl'))
  assert [r['step'] for r in logged] == list(range(1, STEPS + 1))
  want = metrics.read_metrics(str(tmp_path / 'ref' / 'metrics.jsonl'))
  assert [r['loss'] for r in logged] == [r['loss'] for r in want]
