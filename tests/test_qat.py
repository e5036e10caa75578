"""Quantization-aware training through the trainer (issue 14): static QAT trains,
its gradients go through the quantizers (straight-through), its activation ranges
are the min-max of training batch 0 under the initial params, and a run stopped
after step k and resumed equals the uninterrupted run bit for bit (static and
dynamic settings); resuming with another `qat.setting` is refused before the
workdir is touched.

Cost: the four trainer runs share one tiny ViT (width 16, depth 1, 16 px) and a
persistent XLA compilation cache for this module only: a resumed run compiles the
very programs of the run it resumes, so they are compiled once.
"""

import json
import os
import shutil

import flax.linen as nn
import jax
from jax.experimental.compilation_cache import compilation_cache
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from s2d_jax import capture
from s2d_jax import checkpointing
from s2d_jax import config_utils as cu
from s2d_jax import intercept
from s2d_jax import metrics
from s2d_jax import quant_model as qm
from s2d_jax import tasks
from s2d_jax import train
from s2d_jax.models import siglip

from test_exact_references import _first_clear_seed, _qat_case
from test_resume import tb_scalars
from train_fixtures import tiny_demo_config

STATIC, DYNAMIC = 'W4A4-static', 'W4A4'
LOGGED = ('loss', 'grad_norm', 'acc', 'lr')   # the scalars a resume must reproduce


def _config(data_dir, setting, **kw):
  c = tiny_demo_config(data_dir, {
      'ckpt_every': 2, 'keep_ckpts': 2, 'total_steps': 4,
      'warmup_frac': 0.0,          # step 1 already moves the params
      'sigma_log_top': 0, 'input.shuffle_buffer_size': 64,
      'qat.enabled': True, 'qat.setting': setting})
  c.model.update(width=16, depth=1, mlp_dim=32, num_heads=1, pool_type='gap')
  c.model_load.dont_load = []   # model_init holds every param (θ₀ known exactly)
  for k, v in kw.items():
    cu.apply_overrides(c, {k: v})
  return c


# ------------------------------------------------------------ one train step --

class _MlpTrain(nn.Module):
  """test_exact_references._Mlp (same params) with the trainer's `train` flag."""

  @nn.compact
  def __call__(self, x, train=False):  # pylint: disable=redefined-outer-name
    del train
    return nn.Dense(3, name='Dense_1')(nn.relu(nn.Dense(5, name='Dense_0')(x)))


def test_train_step_update_is_the_hand_written_ste_gradient():
  """`train.train_step` with the trainer's static-QAT forward (`qat_apply_fn`) and
  SGD(1): the update is minus the hand-written straight-through gradient of
  Dense_0 -> relu -> Dense_1 (numpy, test_exact_references.np_mlp_ste_grads), with
  ranges calibrated on 0.5·x so that some values are clipped (zero gradient). A
  step whose gradient bypassed the quantizers (the float gradient) is far off."""
  _, case = _first_clear_seed(lambda s: _qat_case(s, static=True))
  model = _MlpTrain()
  params = jax.tree.map(jnp.asarray, case['p'])
  calib = qm.calibrate(model.apply, STATIC, {'params': params},
                       [(jnp.asarray(case['x_cal']),)])
  cfg = cu.default_train_config()
  cfg.qat.update(enabled=True, setting=STATIC)
  tx = optax.sgd(1.0)
  step = jax.jit(lambda p, o, b: train.train_step(
      p, o, b, jnp.int32(0), apply_fn=train.qat_apply_fn(cfg, model, calib),
      loss_fn=lambda out, b: (jnp.sum(out * b['c']), {}), inputs=('x',), tx=tx,
      rng=jax.random.PRNGKey(0)))
  batch = {'x': jnp.asarray(case['x']), 'c': jnp.asarray(case['c'], jnp.float32)}
  new, _, m = step(params, tx.init(params), batch)
  want = case['want']
  assert want['clipped'] >= 2
  norm2 = 0.0
  for layer in ('Dense_0', 'Dense_1'):
    for leaf in ('kernel', 'bias'):
      update = np.asarray(params[layer][leaf]) - np.asarray(new[layer][leaf])
      np.testing.assert_allclose(update, want[layer][leaf], rtol=1e-5, atol=1e-5,
                                 err_msg=f'{layer}/{leaf}')
      norm2 += np.sum(np.square(want[layer][leaf]))
  np.testing.assert_allclose(float(m['grad_norm']), np.sqrt(norm2), rtol=1e-5)
  g_float = jax.grad(lambda p: jnp.sum(model.apply({'params': p}, batch['x'])
                                       * batch['c']))(params)
  assert np.abs(np.asarray(g_float['Dense_0']['kernel'])
                - want['Dense_0']['kernel']).max() > 1e-2


# ---------------------------------------------------------- the trainer runs --

@pytest.fixture(scope='module')
def compile_cache(tmp_path_factory):
  """A persistent compilation cache for this module (restored afterwards)."""
  old = (jax.config.jax_compilation_cache_dir,
         jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update('jax_compilation_cache_dir',
                    str(tmp_path_factory.mktemp('jax_cache')))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  compilation_cache.reset_cache()
  yield
  jax.config.update('jax_compilation_cache_dir', old[0])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', old[1])
  compilation_cache.reset_cache()


@pytest.fixture(scope='module')
def init_npz(data_dir, tmp_path_factory):
  """(path, params): random params of the whole classifier (head included), so
  that the initial params θ₀ of every run are known exactly (config.model_init)."""
  c = _config(data_dir, STATIC)
  model = tasks.get(c).build(c)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 16, 16, 3)))['params']
  rs = np.random.RandomState(0)
  params = jax.tree_util.tree_map_with_path(
      lambda p, s: ((1.0 if p[-1].key == 'scale' else 0.0)
                    + 0.3 * rs.standard_normal(s.shape)).astype(np.float32),
      shapes)
  path = str(tmp_path_factory.mktemp('init') / 'init.npz')
  siglip.save(path, params)
  return path, params


def _stop_after_2_and_resume(data_dir, tmp_path, setting, init):
  """(uninterrupted run, resumed run, resumed workdir): the run's workdir as it is
  when stopped after step 2 (checkpoint 2 is the latest; the records of later
  steps stay in metrics.jsonl and TensorBoard, as after a crash) is resumed."""
  full_wd, wd = str(tmp_path / 'full'), str(tmp_path / 'resumed')
  full = train.train(_config(data_dir, setting, model_init=init), full_wd, echo=False)
  assert checkpointing.Checkpointer(full_wd, create=False).all_steps() == [2, 4]
  shutil.copytree(full_wd, wd)
  shutil.rmtree(os.path.join(wd, 'checkpoints', '4'))
  os.remove(os.path.join(wd, 'config.json'))
  resumed = train.train(_config(data_dir, setting, model_init=init), wd, echo=False)
  assert resumed['start_step'] == 2
  return full, resumed, wd


@pytest.fixture(scope='module')
def static_runs(data_dir, tmp_path_factory, compile_cache, init_npz):
  del compile_cache
  return _stop_after_2_and_resume(data_dir, tmp_path_factory.mktemp('static'),
                                  STATIC, init_npz[0])


def _assert_same_run(full, resumed, wd):
  """Params bit for bit; each step logged once with the uninterrupted values, in
  metrics.jsonl and in TensorBoard's event files."""
  for a, b in zip(jax.tree.leaves(jax.device_get(full['params'])),
                  jax.tree.leaves(jax.device_get(resumed['params']))):
    np.testing.assert_array_equal(a, b)
  want = metrics.read_metrics(os.path.join(full['workdir'], 'metrics.jsonl'))
  got = metrics.read_metrics(os.path.join(wd, 'metrics.jsonl'))
  assert [r['step'] for r in got] == [1, 2, 3, 4]
  for r, w in zip(got, want):
    assert {k: r[k] for k in LOGGED} == {k: w[k] for k in LOGGED}, r['step']
  tb = [(t, s, v) for t, s, v in tb_scalars(os.path.join(wd, 'tensorboard'))
        if t in LOGGED]
  assert len(tb) == len({(t, s) for t, s, _ in tb}) == 4 * len(LOGGED)
  assert sorted(tb) == sorted(
      (t, s, v) for t, s, v in tb_scalars(os.path.join(full['workdir'], 'tensorboard'))
      if t in LOGGED)


def test_static_qat_ranges_are_the_min_max_of_batch_0(data_dir, static_runs,
                                                      init_npz):
  """The trained-with ranges equal an independent min / max (numpy) of every
  quantized layer's input (captured by s2d_jax.capture, per scanned layer) for
  training batch 0 under the initial params θ₀, up to float32 rounding of the
  activations (another compiled program: 8 ulp); the ranges of batch 1 are far
  from them. The resume test checks that checkpoint 2 holds them."""
  full, _, _ = static_runs
  c = _config(data_dir, STATIC)
  model = tasks.get(c).build(c)
  it = iter(train.train_iterator(c, 0, 0, 1))
  capture_fn = jax.jit(lambda x: capture.capture_matmul_inputs(
      model.apply, {'params': init_npz[1]}, x, train=False)[1])

  def min_max(images):
    out = {}
    for path, x in intercept.flatten(capture_fn(images)).items():
      x = np.asarray(x)
      axes = tuple(range(1 if path[0] == 'Transformer' else 0, x.ndim))
      out[path[:-1]] = np.stack([x.min(axes), x.max(axes)], -1)
    return out
  want, other = min_max(next(it)['image']), min_max(next(it)['image'])
  flat = intercept.flatten(jax.device_get(full['qat_calibration']))
  assert {p[-1] for p in flat} == {'quant_calib_input'}
  got = {p[:-1]: np.asarray(v) for p, v in flat.items()}
  assert sorted(got) == sorted(want)
  assert ('Transformer', 'encoderblock', 'MlpBlock_0', 'Dense_1') in got
  for path, w in want.items():
    np.testing.assert_allclose(got[path], w, rtol=1e-6, atol=1e-7, err_msg=str(path))
  assert max(np.abs(got[k] - other[k]).max() / np.abs(other[k]).max()
             for k in got) > 1e-2


def test_static_qat_gradients_go_through_the_quantizers(data_dir, static_runs,
                                                        init_npz):
  """Step 1's logged gradient norm (before clipping) is that of the
  straight-through gradient of the fake-quantized model with the ranges of batch 0
  and θ₀ (computed here on one device; the STE itself is checked exactly by the
  train_step test above), and the run trains (finite losses, every param moves).
  The alternatives are far outside rtol 1e-4 (measured when this test was
  written: float model 2.507, dynamic W4A4 2.503, this 2.459; zero without a
  gradient through the quantizers)."""
  full, _, _ = static_runs
  c = _config(data_dir, STATIC)
  task = tasks.get(c)
  model = task.build(c)
  batch0 = {k: np.asarray(v) for k, v in
            next(iter(train.train_iterator(c, 0, 0, 1))).items()}
  apply_fn = qm.quantized_apply(model.apply, STATIC, ste=True,
                                calibration=jax.device_get(full['qat_calibration']))

  def loss(p):
    out = apply_fn({'params': p}, batch0['image'], train=True,
                   rngs={'dropout': jax.random.PRNGKey(0)})
    return task.loss(c, out, batch0)[0]
  ste = float(optax.tree.norm(jax.jit(jax.grad(loss))(
      jax.tree.map(jnp.asarray, init_npz[1]))))
  recs = metrics.read_metrics(os.path.join(full['workdir'], 'metrics.jsonl'))
  assert all(np.isfinite(r['loss']) for r in recs)
  np.testing.assert_allclose(recs[0]['grad_norm'], ste, rtol=1e-4)
  moved = [np.abs(np.asarray(a) - b).max() for a, b in zip(
      jax.tree.leaves(jax.device_get(full['params'])), jax.tree.leaves(init_npz[1]))]
  assert min(moved) > 0


def test_static_qat_resume_equals_the_uninterrupted_run(static_runs):
  """On main a resumed static-QAT run re-calibrated on batch 0 with the *restored*
  params (other ranges, other params; it also crashed tracing `train=False`)."""
  full, resumed, wd = static_runs
  _assert_same_run(full, resumed, wd)
  want = intercept.flatten(jax.device_get(full['qat_calibration']))
  got = intercept.flatten(jax.device_get(resumed['qat_calibration']))
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg=str(k))


def test_dynamic_qat_resume_equals_the_uninterrupted_run(data_dir, tmp_path,
                                                         compile_cache, init_npz):
  del compile_cache
  full, resumed, wd = _stop_after_2_and_resume(data_dir, tmp_path, DYNAMIC,
                                               init_npz[0])
  assert 'qat_calibration' not in full
  _assert_same_run(full, resumed, wd)


def _snapshot(wd):
  out = {n: open(os.path.join(wd, n), 'rb').read()
         for n in ('config.json', 'metrics.jsonl')}
  out['ckpts'] = sorted(os.listdir(os.path.join(wd, 'checkpoints')))
  out['tb'] = sorted(os.listdir(os.path.join(wd, 'tensorboard')))
  return out


@pytest.mark.parametrize('change, said', [
    ({'qat.setting': 'W8A8-static'},
     "qat.setting is 'W8A8-static' now, 'W4A4-static' in checkpoint 4"),
    ({'qat.setting': 'W4A4'}, "qat.setting is 'W4A4' now, 'W4A4-static' in checkpoint 4"),
    ({'qat.enabled': False}, 'qat is off now, on in checkpoint 4'),
])
def test_resume_with_another_qat_setting_is_refused_before_writing(
    data_dir, static_runs, init_npz, change, said):
  """The quantizer is training state: another qat.setting (even one with the same
  range shapes) or QAT switched off is refused, naming the key, and nothing in the
  workdir changes (the fingerprints alone would accept W8A8-static)."""
  full, _, _ = static_runs
  wd = full['workdir']
  before = _snapshot(wd)
  c = _config(data_dir, STATIC, model_init=init_npz[0], **change)
  with pytest.raises(checkpointing.IncompatibleCheckpointError) as e:
    train.train(c, wd, echo=False)
  msg = str(e.value)
  assert 'was written with another QAT quantizer' in msg and said in msg, msg
  assert _snapshot(wd) == before
  assert json.load(open(os.path.join(wd, 'config.json')))['qat']['setting'] == STATIC
