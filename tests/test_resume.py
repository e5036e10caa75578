"""Trainer failure behaviour: a diverged run stops naming the step and keeps the last
good checkpoint; resume checks (optimizer fingerprint before touching the workdir,
config differences in config terms, damaged checkpoints), config.json written after
the restore, "resuming from step N", metrics.jsonl without repeated steps, and the
evaluation's inputs checked before the first step."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2d_jax import checkpointing
from s2d_jax import config_utils as cu
from s2d_jax import metrics
from s2d_jax import train

from train_fixtures import tiny_demo_config



def _config(data_dir, **kw):
  return tiny_demo_config(data_dir, {'ckpt_every': 2, 'total_steps': 4,
                                     'grad_clip_norm': 0.0, **kw})


def _snapshot(wd):
  """{relative path: bytes} of the small files a failed start must not touch."""
  out = {}
  for name in ('config.json', 'metrics.jsonl'):
    p = os.path.join(wd, name)
    if os.path.exists(p):
      out[name] = open(p, 'rb').read()
  out['ckpts'] = sorted(os.listdir(os.path.join(wd, 'checkpoints')))
  return out


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    data_dir, tmp_path, monkeypatch, capsys):
  """The loss goes NaN at step 3 (the 3rd update; simulated divergence): the run
  stops before logging or saving it, names step 3 and checkpoint 2, writes no
  params.npz, and the CLI exits 1 with that one line. On main the run went on to
  save NaN checkpoints and a NaN params.npz."""
  orig = train.train_step

  def diverging_step(params, opt_state, batch, step, **kw):
    params, opt_state, m = orig(params, opt_state, batch, step, **kw)
    bad = step >= 2
    params = jax.tree.map(lambda x: jnp.where(bad, jnp.nan, x), params)
    return params, opt_state, dict(m, loss=jnp.where(bad, jnp.nan, m['loss']))
  monkeypatch.setattr(train, 'train_step', diverging_step)
  wd = str(tmp_path / 'w')
  c = _config(data_dir, total_steps=6, export_npz=True)
  with pytest.raises(cu.RunError) as e:
    train.train(c, wd, echo=False)
  msg = str(e.value)
  assert 'non-finite loss at step 3 (loss nan' in msg, msg
  assert f'last good checkpoint is step 2 in {wd}/checkpoints' in msg, msg
  assert 're-run to resume from step 2' in msg and '\n' not in msg
  assert checkpointing.Checkpointer(wd, create=False).all_steps() == [2]
  assert not os.path.exists(os.path.join(wd, 'params.npz'))
  assert [r['step'] for r in metrics.read_metrics(f'{wd}/metrics.jsonl')] == [1, 2]
  good = checkpointing.restore_params(wd)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(good))
  # the CLI: the message as one line on stderr, exit status 1
  def fail(argv):
    raise e.value
  with pytest.raises(SystemExit) as ex:
    cu.run_cli(fail, [])
  assert ex.value.code == 1
  assert capsys.readouterr().err == f'error: {msg}\n'


def test_resume_refuses_another_optimizer_or_a_damaged_step_before_writing(
    data_dir, tmp_path):
  """Same params, other optimizer state (S2D on, gradient clipping on): refused with
  the config difference; a damaged latest step: one line naming the step to fall
  back to; the workdir untouched in both cases (on main: an orbax error deep inside
  the restore, after config.json was overwritten)."""
  wd = str(tmp_path / 'w')
  train.train(_config(data_dir, total_steps=2, ckpt_every=1), wd, echo=False)
  before = _snapshot(wd)
  for kw, change in (
      ({'s2d.enabled': True}, 's2d is on now, off in checkpoint 2'),
      ({'grad_clip_norm': 1.0}, 'grad_clip_norm is 1.0 now, 0.0 in checkpoint 2')):
    with pytest.raises(checkpointing.IncompatibleCheckpointError,
                       match=r'checkpoint .*/2 was written for another optimizer: '
                       r'.*the config differs: .*' + change):
      train.train(_config(data_dir, **kw), wd, echo=False)
    assert _snapshot(wd) == before
  open(os.path.join(wd, 'checkpoints', '2', 'meta', 'metadata'), 'w').write('garbage')
  before = _snapshot(wd)
  with pytest.raises(checkpointing.DamagedCheckpointError,
                     match=r'^checkpoint step 2 in .*checkpoints is damaged .*; to fall '
                     r'back to the previous checkpoint \(step 1\), delete .*/2$'):
    train.train(_config(data_dir), wd, echo=False)
  assert _snapshot(wd) == before


def test_resume_prints_step_and_changes_writes_config_after_restore_no_repeats(
    data_dir, tmp_path, capsys):
  """A crash after step 3 (checkpoint 2) and a resume with another lr: "resuming
  from step 2 ... lr is ... now, ... in checkpoint 2", the new config.json, and
  metrics.jsonl holding each step once (on main: step 3 twice)."""
  wd = str(tmp_path / 'w')

  def crash(step):
    if step == 3:
      raise KeyboardInterrupt()
  with pytest.raises(KeyboardInterrupt):
    train.train(_config(data_dir), wd, on_step=crash, echo=False)
  assert [r['step'] for r in metrics.read_metrics(f'{wd}/metrics.jsonl')] == [1, 2, 3]
  with open(f'{wd}/metrics.jsonl', 'a') as f:
    f.write('{"step": 4, "lo')    # a line torn by a kill
  capsys.readouterr()
  c = _config(data_dir, lr=0.5)
  res = train.train(c, wd, echo=True)
  out = capsys.readouterr().out
  old_lr = _config(data_dir).lr
  assert res['start_step'] == 2
  assert (f'resuming from step 2 of 4 ({wd}/checkpoints); the config differs: '
          f'lr is 0.5 now, {old_lr} in checkpoint 2') in out, out
  assert [r['step'] for r in metrics.read_metrics(f'{wd}/metrics.jsonl')] == [1, 2, 3, 4]
  assert json.load(open(f'{wd}/config.json'))['lr'] == 0.5
  assert checkpointing.Checkpointer(wd, create=False).read_meta()['config']['lr'] == 0.5


def test_evaluation_inputs_are_checked_before_the_first_step(data_dir, tmp_path):
  """On main a missing evaluation split was found after training."""
  c = _config(data_dir, **{'evaluate.enabled': True,
                           'evaluate.data.split': 'test[:5000]'})
  wd = str(tmp_path / 'w')
  with pytest.raises(ValueError, match=r'config.evaluate.data: .*test\[:5000\]'):
    train.train(c, wd, echo=False)
  assert not os.path.exists(wd)


def test_model_init_with_nan_is_refused_before_writing(data_dir, tmp_path):
  """A model_init npz holding NaN: refused naming the key before anything is
  written (on main the trainer had no allow_nonfinite to pass through, and
  model_load.allow_nonfinite did not exist)."""
  import warnings
  from s2d_jax import tasks
  from s2d_jax.models import checkpoint as ckpt_lib
  from s2d_jax.models import siglip
  c = _config(data_dir, total_steps=1)
  model = tasks.get(c).build(c)
  p = jax.tree.map(np.array, jax.device_get(model.init(
      jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))['params']))
  p['Transformer']['encoder_norm']['scale'][0] = np.nan
  npz = str(tmp_path / 'init.npz')
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', ckpt_lib.NonFiniteWarning)
    siglip.save(npz, {k: v for k, v in p.items() if k != 'head'})
  c.model_init = npz
  wd = str(tmp_path / 'w')
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r'encoder_norm/scale \(1 NaN, 0 Inf.*allow_nonfinite'):
    train.train(c, wd, echo=False)
  assert not os.path.exists(wd)
  c.model_load.allow_nonfinite = True
  with pytest.warns(ckpt_lib.NonFiniteWarning, match='encoder_norm/scale'):
    s = train._startup(c, wd)
  assert np.isnan(s.loaded['Transformer']['encoder_norm']['scale'][0])
  assert not os.path.exists(wd)


def tb_scalars(tb_dir):
  """[(tag, step, value)] of every scalar event in the event files of `tb_dir`, read
  back with TensorFlow's summary_iterator (in file order)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = []
  for path in sorted(tf.io.gfile.glob(os.path.join(tb_dir, '*tfevents*'))):
    for ev in tf.compat.v1.train.summary_iterator(path):
      for v in ev.summary.value:
        out.append((v.tag, ev.step, float(tf.make_ndarray(v.tensor))))
  return out


def test_tensorboard_events_after_the_restored_step_are_dropped(tmp_path):
  """A run logs steps 1-4 and is killed while writing (a torn last record); the
  restart from checkpoint 2 logs steps 3-4 again. Read back, TensorBoard's files
  hold every (tag, step) once, with the restarted run's values for 3-4 (on main:
  steps 3 and 4 twice, and a file TensorFlow could not read to its end)."""
  path, tb = str(tmp_path / 'metrics.jsonl'), str(tmp_path / 'tb')
  w = metrics.MetricWriter(path, tb_dir=tb, start_step=0, stream=None)
  for s in range(1, 5):
    w.write(s, {'loss': float(s), 'acc': 0.5})
  w.close()
  (old,) = [os.path.join(tb, f) for f in os.listdir(tb)]
  with open(old, 'ab') as f:
    f.write(b'\x30\x00\x00\x00\x00')          # a record cut after 5 bytes
  assert metrics.keep_events_upto(str(tmp_path / 'nothing'), 2) == 0
  w = metrics.MetricWriter(path, tb_dir=tb, start_step=2, stream=None)
  for s in (3, 4):
    w.write(s, {'loss': 10.0 * s, 'acc': 0.5})
  w.close()
  got = tb_scalars(tb)
  keys = [(t, s) for t, s, _ in got if t in ('loss', 'acc')]
  assert sorted(keys) == sorted({(t, s) for t in ('loss', 'acc') for s in range(1, 5)})
  assert {s: v for t, s, v in got if t == 'loss'} == {1: 1.0, 2: 2.0, 3: 30.0, 4: 40.0}
  assert len(os.listdir(tb)) == 2                # the trimmed file and the new one
  assert [r['step'] for r in metrics.read_metrics(path)] == [1, 2, 3, 4]
  # a restart at the last logged step changes nothing
  assert metrics.keep_events_upto(tb, 4) == 0
