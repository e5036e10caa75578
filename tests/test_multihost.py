"""Two processes on 127.0.0.1 (jax.distributed + gloo CPU collectives), 2 CPU devices
each: the trainer with S2D, FSDP spanning both processes, npz export and the
end-of-training evaluation; then the evaluator CLI on two processes with fsdp=1. Both
reports equal the single-process report of the same checkpoint."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from s2d_jax import checkpointing
from s2d_jax import config_utils
from s2d_jax import evaluate
from s2d_jax import metrics
from s2d_jax import report
from s2d_jax import spectral

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = 'float,W4A4-static'


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _two_processes(module, args, cwd):
  """Runs `python -m module args` as processes 0 and 1; returns process 0's output."""
  port = _free_port()
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  cmd = [sys.executable, '-m', module, *args,
         '--coordinator_address', f'127.0.0.1:{port}', '--num_processes', '2']
  procs = [subprocess.Popen(cmd + ['--process_id', str(i)], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=900)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f'process {i} failed:\n{out[-4000:]}'
  return outs[0]


def _close(a, b, msg, rtol=1e-5, atol=0.0):
  """allclose for numbers; equality for what report.json stores as strings ('inf')."""
  if isinstance(a, str) or isinstance(b, str):
    assert a == b, msg
  else:
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=msg)


def _same_report(got, want, what):
  assert got['accuracy'] == want['accuracy'], what
  assert got['counts'] == want['counts'], what
  assert got['settings'] == want['settings'], what
  assert got['checkpoint']['params_sha256'] == want['checkpoint']['params_sha256']
  assert got['batches'] == want['batches'] and got['data'] == want['data']
  assert got['quant_plan'] == want['quant_plan'], what
  assert got['layers'].keys() == want['layers'].keys(), what
  for k, s in want['layers'].items():
    for f in ('count', 'max_abs', 'kurtosis', 'median_abs', 'channel_range_spread'):
      _close(got['layers'][k][f], s[f], f'{what}: {k} {f}')
  for k, v in want['weights'].items():
    _close(got['weights'][k]['top_sigma'], v['top_sigma'], f'{what}: {k}')
  assert got['pcdr'].keys() == want['pcdr'].keys()
  for k, v in want['pcdr'].items():
    _close(got['pcdr'][k], v, f'{what}: pcdr {k}', rtol=1e-4, atol=1e-6)


def test_two_process_fsdp_s2d_training_export_and_evaluation(tmp_path):
  from s2d_jax.data import demo
  data_dir = str(tmp_path / 'tfds')
  demo.build(data_dir, 'tiny')
  wd = str(tmp_path / 'run')
  spec = f'demo:size=tiny,data_dir={data_dir}'
  common = ['--config', spec, f'--config.evaluate.settings={SETTINGS}',
            '--config.evaluate.calib_batches=2', '--config.evaluate.pcdr_examples=4']
  # The shipped config by name, from an empty directory; fsdp=-1: all 4 devices of
  # both processes, so every sharded param lives partly on the other process.
  empty = tmp_path / 'cwd'
  empty.mkdir()
  out = _two_processes('s2d_jax.train', common + [
      '--workdir', wd, '--config.total_steps=3', '--config.log_every=1',
      '--config.ckpt_every=0', '--config.mesh.fsdp=-1', '--config.s2d.enabled=True',
      '--config.s2d.tau=1e-6', '--config.s2d.refresh_every=2'], cwd=str(empty))
  assert 'ETA' in out and 's2d_active' in out
  recs = metrics.read_metrics(os.path.join(wd, 'metrics.jsonl'))
  assert [r['step'] for r in recs] == [1, 2, 3]          # written once (process 0)
  assert all(np.isfinite(r['loss']) for r in recs) and recs[-1]['s2d_active'] > 0
  assert any(f.startswith('events.out.tfevents')
             for f in os.listdir(os.path.join(wd, 'tensorboard')))
  ck = checkpointing.Checkpointer(wd, create=False)
  assert ck.all_steps() == [3] and ck.read_meta()['data']['process_count'] == 2
  ck.close()
  # the exported npz is exactly the checkpoint's params
  params = checkpointing.restore_params(wd)
  z = np.load(os.path.join(wd, 'params.npz'))
  flat = {'params/' + spectral.path_str(spectral.path_tuple(p)): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert sorted(z.files) == sorted(flat)
  for k, v in flat.items():
    np.testing.assert_array_equal(z[k], v, err_msg=k)

  # the evaluator CLI on two processes, fsdp=1, from the orbax checkpoint
  wd2 = str(tmp_path / 'eval')
  _two_processes('s2d_jax.evaluate', common + [
      '--workdir', wd2, f'--config.evaluate.checkpoint={wd}'], cwd=str(empty))

  # the single-process report of the same checkpoint (8 devices here)
  config = config_utils.load_config(spec)
  config_utils.apply_overrides(config, {
      'evaluate.settings': SETTINGS, 'evaluate.calib_batches': 2,
      'evaluate.pcdr_examples': 4, 'evaluate.checkpoint': wd})
  want = json.loads(json.dumps(report.jsonable(
      evaluate.evaluate(config, None, progress=False, write=False))))
  for path, what in ((os.path.join(wd, 'report.json'), 'end of training, fsdp=4'),
                     (os.path.join(wd2, 'report.json'), 'evaluate CLI, fsdp=1')):
    got = json.load(open(path))
    assert got['devices']['processes'] == 2, what
    _same_report(got, want, what)
  assert want['counts']['float']['total'] == 48         # every test example, once
