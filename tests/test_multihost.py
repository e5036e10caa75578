"""Two processes on 127.0.0.1 (jax.distributed + gloo CPU collectives), 2 CPU devices
each, run the trainer CLI together: one global mesh, one checkpoint, one metrics file."""

import os
import socket
import subprocess
import sys

import numpy as np

from s2d_jax import checkpointing
from s2d_jax import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_process_training_on_loopback(tmp_path):
  from s2d_jax.data import demo
  data_dir = str(tmp_path / 'tfds')
  demo.build(data_dir, 'tiny')
  wd = str(tmp_path / 'run')
  port = _free_port()
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  cmd = [sys.executable, '-m', 's2d_jax.train',
         '--config', f'{ROOT}/configs/demo.py:size=tiny,data_dir={data_dir}',
         '--config.total_steps=3', '--config.log_every=1', '--config.ckpt_every=0',
         '--config.evaluate.enabled=False', '--config.export_npz=False',
         '--workdir', wd, '--coordinator_address', f'127.0.0.1:{port}',
         '--num_processes', '2']
  procs = [subprocess.Popen(cmd + ['--process_id', str(i)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f'process {i} failed:\n{out[-3000:]}'
  recs = metrics.read_metrics(os.path.join(wd, 'metrics.jsonl'))
  assert [r['step'] for r in recs] == [1, 2, 3]          # written once (process 0)
  assert all(np.isfinite(r['loss']) for r in recs)
  ck = checkpointing.Checkpointer(wd, create=False)
  assert ck.all_steps() == [3]
  meta = ck.read_meta()
  assert meta['data']['process_count'] == 2
  ck.close()
  params = checkpointing.restore_params(wd)
  assert all(np.all(np.isfinite(x)) for x in __import__('jax').tree.leaves(params))
