"""Trainer: loss decreases, S2D lowers σ_max, QAT runs, exact resume after a crash,
model_init from a big_vision npz, start-up errors that write nothing."""

import json
import os

import jax
import numpy as np
import pytest

from s2d_jax import checkpointing
from s2d_jax import config_utils as cu
from s2d_jax import metrics
from s2d_jax import parallel
from s2d_jax import spectral
from s2d_jax import tasks
from s2d_jax import train

from train_fixtures import tiny_demo_config



def _config(data_dir, **kw):
  return tiny_demo_config(data_dir, {'ckpt_every': 0, 'total_steps': 8, **kw})


def _sigmas(params):
  fn = train.sigma_max_fn(train.largest_kernels(params, 100))
  return {k: float(v) for k, v in jax.device_get(jax.jit(fn)(params)).items()}


def test_loss_goes_down_and_metrics_are_logged(data_dir, tmp_path):
  c = _config(data_dir, total_steps=24, lr=3e-3, warmup_frac=0.1)
  res = train.train(c, str(tmp_path), echo=False)
  recs = metrics.read_metrics(os.path.join(tmp_path, 'metrics.jsonl'))
  assert [r['step'] for r in recs] == list(range(1, 25))
  loss = np.array([r['loss'] for r in recs])
  assert np.all(np.isfinite(loss))
  assert loss[-6:].mean() < loss[:6].mean() - 0.05, loss
  # the logged lr of step s is the closed form at t = s - 1 (T = 24, T_w = 2.4 -> 2)
  t = np.arange(24.0)
  f = c.min_lr_frac
  want = np.where(t < 2, 3e-3 * t / 2, 3e-3 * (
      f + (1 - f) * 0.5 * (1 + np.cos(np.pi * (t - 2) / 22))))
  # (float32 schedule: a few ulps of the peak lr, 2**-20 · lr)
  np.testing.assert_allclose([r['lr'] for r in recs], want, rtol=1e-6,
                             atol=3e-3 * 2 ** -20)
  for key in ('acc', 'grad_norm', 'steps_per_sec', 'sigma_max'):
    assert key in recs[-1]
  # σ_max logged = exact σ_max of the final params' largest kernels
  sig = _sigmas(res['params'])
  logged = {k[len('sigma_max/'):]: v for k, v in recs[-1].items()
            if k.startswith('sigma_max/')}
  assert logged and set(logged) <= set(sig)
  for k, v in logged.items():
    np.testing.assert_allclose(v, sig[k], rtol=1e-4)
  # the final checkpoint holds the returned params
  got = checkpointing.restore_params(str(tmp_path))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(jax.device_get(res['params']))):
    np.testing.assert_array_equal(a, b)
  assert json.load(open(os.path.join(tmp_path, 'config.json')))['total_steps'] == 24


def test_s2d_lowers_sigma_max(data_dir, tmp_path):
  kw = dict(total_steps=10, lr=1e-3, wd=0.0)
  base = train.train(_config(data_dir, **kw), str(tmp_path / 'base'), echo=False)
  s2d = train.train(
      _config(data_dir, **kw, **{'s2d.enabled': True, 's2d.strength': 0.5,
                                 's2d.tau': 1e-6, 's2d.refresh_every': 5}),
      str(tmp_path / 's2d'), echo=False)
  sb, ss = _sigmas(base['params']), _sigmas(s2d['params'])
  enc = [k for k in sb if k.startswith('Transformer/')]
  assert enc
  lower = [ss[k] < sb[k] for k in enc]
  assert all(lower), {k: (sb[k], ss[k]) for k in enc}
  recs = metrics.read_metrics(os.path.join(tmp_path, 's2d', 'metrics.jsonl'))
  assert recs[-1]['s2d_active'] > 0          # tau ~ 0: k = 1 for every kernel
  # decoupled S2D through the trainer: chain(adamw, s2d(decoupled, lr schedule)); each
  # step shrinks sigma_i by about lr_t * strength * sigma_i^2 after Adam
  dec = train.train(
      _config(data_dir, **kw, **{'s2d.enabled': True, 's2d.decoupled': True,
                                 's2d.strength': 50.0, 's2d.tau': 1e-6,
                                 's2d.refresh_every': 5}),
      str(tmp_path / 'dec'), echo=False)
  sd = _sigmas(dec['params'])
  assert all(sd[k] < sb[k] for k in enc), {k: (sb[k], sd[k]) for k in enc}


def test_qat_runs_and_changes_the_forward(data_dir, tmp_path):
  kw = dict(total_steps=3)
  f = train.train(_config(data_dir, **kw), str(tmp_path / 'f'), echo=False)
  q = train.train(_config(data_dir, **kw, **{'qat.enabled': True,
                                             'qat.setting': 'W4A4'}),
                  str(tmp_path / 'q'), echo=False)
  rf = metrics.read_metrics(os.path.join(tmp_path, 'f', 'metrics.jsonl'))
  rq = metrics.read_metrics(os.path.join(tmp_path, 'q', 'metrics.jsonl'))
  assert all(np.isfinite(r['loss']) for r in rq)
  # same data, same init: different losses after the first update (fake-quant fwd)
  assert rq[-1]['loss'] != rf[-1]['loss']


class Crash(Exception):
  pass


def test_resume_after_crash_is_exact(data_dir, tmp_path):
  kw = {'total_steps': 8, 'ckpt_every': 4, 's2d.enabled': True, 's2d.tau': 1e-6,
        's2d.refresh_every': 3, 'input.shuffle_buffer_size': 64}
  full = train.train(_config(data_dir, **kw), str(tmp_path / 'full'), echo=False)

  def crash(step):
    if step == 6:
      raise Crash()
  wd = str(tmp_path / 'crashed')
  with pytest.raises(Crash):
    train.train(_config(data_dir, **kw), wd, on_step=crash, echo=False)
  assert checkpointing.Checkpointer(wd, create=False).all_steps() == [4]
  res = train.train(_config(data_dir, **kw), wd, echo=False)
  assert res['start_step'] == 4
  for a, b in zip(jax.tree.leaves(jax.device_get(full['params'])),
                  jax.tree.leaves(jax.device_get(res['params']))):
    np.testing.assert_array_equal(a, b)


def test_model_init_from_big_vision_npz(data_dir, tmp_path):
  from s2d_jax.models import siglip
  c = _config(data_dir, total_steps=1, lr=1e-9)
  model = tasks.get(c).build(c)
  p = model.init(jax.random.PRNGKey(7), np.zeros((1, 16, 16, 3), np.float32))['params']
  p = jax.tree.map(lambda x: np.asarray(x) + 0.01, p)
  npz = str(tmp_path / 'init.npz')
  siglip.save(npz, {k: v for k, v in p.items() if k != 'head'})
  c.model_init = npz
  c.lr = 1e-12
  res = train.train(c, str(tmp_path / 'run'), echo=False)
  got = jax.device_get(res['params'])
  np.testing.assert_allclose(got['Transformer']['encoder_norm']['scale'],
                             p['Transformer']['encoder_norm']['scale'], atol=1e-6)
  # a checkpoint of another model: clear error naming a key, nothing written
  c2 = _config(data_dir, total_steps=1, **{'model.width': 48})
  c2.model_init = npz
  wd = str(tmp_path / 'other')
  with pytest.raises(ValueError, match="another model|shape mismatch for 'MAPHead_0"):
    train.train(c2, wd, echo=False)
  assert not os.path.exists(wd)


def test_startup_errors_write_nothing(data_dir, tmp_path):
  wd = str(tmp_path / 'w')
  c = _config(data_dir)
  c.bogus = 1
  with pytest.raises(ValueError, match='bogus'):
    train.train(c, wd, echo=False)
  c = _config(str(tmp_path / 'empty_tfds'))
  with pytest.raises(FileNotFoundError, match='s2d_demo_shapes'):
    train.train(c, wd, echo=False)
  c = _config(data_dir, **{'input.batch_size': 12})
  with pytest.raises(ValueError, match='divisible'):
    train.train(c, wd, echo=False)
  c = _config(data_dir, model_init=str(tmp_path / 'missing.npz'))
  with pytest.raises(FileNotFoundError, match='missing.npz'):
    train.train(c, wd, echo=False)
  assert not os.path.exists(wd)
  # resuming a workdir whose checkpoint is from another model
  train.train(_config(data_dir, total_steps=1), wd, echo=False)
  before = sorted(os.listdir(wd))
  with pytest.raises(ValueError, match='another model'):
    train.train(_config(data_dir, total_steps=2, **{'model.mlp_dim': 32}), wd,
                echo=False)
  assert sorted(os.listdir(wd)) == before


def test_fsdp_spec_and_mesh():
  assert parallel.fsdp_spec((8, 6), 2) == jax.sharding.PartitionSpec('fsdp', None)
  assert parallel.fsdp_spec((6, 8), 2) == jax.sharding.PartitionSpec(None, 'fsdp')
  assert parallel.fsdp_spec((8, 6), 4) == jax.sharding.PartitionSpec('fsdp', None)
  assert parallel.fsdp_spec((3, 5), 2) == jax.sharding.PartitionSpec()
  assert parallel.fsdp_spec((), 2) == jax.sharding.PartitionSpec()
  m = parallel.make_mesh(2)
  assert dict(m.shape) == {'data': jax.device_count() // 2, 'fsdp': 2}
  with pytest.raises(ValueError, match='mesh.fsdp=3'):
    parallel.make_mesh(3)


def test_weight_decay_mask_and_losses():
  p = {'Dense_0': {'kernel': np.zeros((2, 3)), 'bias': np.zeros(3)},
       'LayerNorm_0': {'scale': np.zeros(3)}, 'pos_embedding': np.zeros((1, 4, 3))}
  m = spectral.kernel_mask(p)
  assert m == {'Dense_0': {'kernel': True, 'bias': False},
               'LayerNorm_0': {'scale': False}, 'pos_embedding': False}
  logits = np.array([[2.0, 0.0, -1.0]], np.float32)
  lab = np.array([0])
  ls = np.log(np.exp(logits).sum())
  np.testing.assert_allclose(tasks.softmax_xent(logits, lab, 3), ls - 2.0, rtol=1e-6)
  y = np.array([[1., 0., 0.]])
  ref = -np.sum(y * np.log(1 / (1 + np.exp(-logits))) +
                (1 - y) * np.log(1 / (1 + np.exp(logits))))
  np.testing.assert_allclose(tasks.sigmoid_xent(logits, lab, 3), ref, rtol=1e-6)
  sm = 0.1
  ysm = np.array([[1 - sm + sm / 3, sm / 3, sm / 3]])
  ref2 = -np.sum(ysm * (logits - ls))
  np.testing.assert_allclose(tasks.softmax_xent(logits, lab, 3, sm), ref2, rtol=1e-6)


def test_train_step_is_one_exact_optimizer_step():
  """Module-level train_step on a linear model with SGD: the update, loss and
  grad_norm are the closed forms."""
  import jax.numpy as jnp
  import optax
  w = np.array([[1.0, -2.0], [0.5, 3.0]], np.float32)
  x = np.array([[1.0, 2.0], [-1.0, 0.5], [0.0, 1.0]], np.float32)
  t = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0]], np.float32)

  def apply_fn(variables, xb, train, rngs):
    assert train and 'dropout' in rngs
    return (xb @ variables['params']['kernel'],)

  def loss_fn(out, batch):
    return jnp.mean((out[0] - batch['target']) ** 2), {'acc': jnp.float32(0.5)}

  lr = 0.1
  params, opt, m = jax.jit(lambda p, o, b, s: train.train_step(
      p, o, b, s, apply_fn=apply_fn, loss_fn=loss_fn, inputs=('image',),
      tx=optax.sgd(lr), rng=jax.random.PRNGKey(0)))(
          {'kernel': w}, optax.sgd(lr).init({'kernel': w}),
          {'image': x, 'target': t}, jnp.int32(3))
  r = x @ w - t
  grad = 2 * x.T @ r / r.size
  np.testing.assert_allclose(m['loss'], np.mean(r ** 2), rtol=1e-6)
  np.testing.assert_allclose(m['grad_norm'], np.linalg.norm(grad), rtol=1e-6)
  np.testing.assert_allclose(params['kernel'], w - lr * grad, rtol=1e-6)
  assert float(m['acc']) == 0.5


def test_chrono_steps_per_second_and_eta():
  times = iter([0.0, 10.0, 12.0, 16.0])
  c = metrics.Chrono(total_steps=100, clock=lambda: next(times))   # t=0
  c.start(1)                                  # t=10: step 1 done (compile excluded)
  assert c.report(5) == {'steps_per_sec': 2.0, 'eta_s': 95 / 2.0}   # t=12
  r = c.report(9)                                                    # t=16
  assert r['steps_per_sec'] == 1.0 and r['eta_s'] == 91 / (8 / 6)
  line = metrics.format_line({'step': 9, 'total_steps': 100, 'loss': 0.5,
                              'eta_s': 3725.0})
  assert line == 'step 9/100 | loss 0.5000 | ETA 1h02m05s'


def test_metric_writer_writes_tensorboard_events(tmp_path):
  import tensorflow as tf
  w = metrics.MetricWriter(str(tmp_path / 'm.jsonl'), stream=None,
                           tb_dir=str(tmp_path / 'tb'))
  w.write(3, {'loss': 1.5, 'note': [1, 2]})
  w.write(4, {'loss': 0.25})
  w.close()
  got = []
  for f in os.listdir(tmp_path / 'tb'):
    for e in tf.compat.v1.train.summary_iterator(str(tmp_path / 'tb' / f)):
      for v in e.summary.value:
        if v.tag == 'loss':
          got.append((e.step, float(tf.make_ndarray(v.tensor))))
  assert got == [(3, 1.5), (4, 0.25)]
  assert [r['loss'] for r in metrics.read_metrics(str(tmp_path / 'm.jsonl'))] == [1.5, 0.25]


def test_export_npz_equals_the_params(tmp_path):
  mesh = parallel.make_mesh(2)
  p = {'a': {'kernel': np.arange(24, dtype=np.float32).reshape(4, 6)},
       'b': np.float32(3.0) * np.ones((3,), np.float32)}
  g = parallel.put(p, parallel.tree_shardings(p, mesh))
  assert not g['a']['kernel'].sharding.is_fully_replicated
  path = train.export_npz(g, str(tmp_path / 'p.npz'))
  z = np.load(path)
  assert sorted(z.files) == ['params/a/kernel', 'params/b']
  np.testing.assert_array_equal(z['params/a/kernel'], p['a']['kernel'])
  np.testing.assert_array_equal(z['params/b'], p['b'])


@pytest.mark.parametrize('warmup_steps,min_frac,want', [
    # lr=1, T=10, warmup_frac=0.2 -> T_w=2; cosine over the 8 steps after it:
    # lr_t = f + (1-f)·½(1 + cos(π (t-2)/8)), hand-evaluated at t = 2, 4, 6, 8, 10
    (0, 0.1, [0.0, 0.5, 1.0, 0.1 + 0.9 * (2 + 2 ** 0.5) / 4, 0.55,
              0.1 + 0.9 * (2 - 2 ** 0.5) / 4, 0.1]),
    # warmup_steps overrides warmup_frac: T_w=4, f=0 -> cosine over 6 steps
    (4, 0.0, [0.0, 0.25, 0.5, 0.75, 1.0, 0.5, 0.0]),
])
def test_lr_schedule_closed_form(warmup_steps, min_frac, want):
  """Linear warmup then cosine to lr·min_lr_frac, against hand-computed values."""
  c = cu.default_train_config()
  c.lr, c.warmup_frac, c.warmup_steps, c.min_lr_frac = 1.0, 0.2, warmup_steps, min_frac
  sched = train.lr_schedule(c, 10)
  ts = [0, 1, 2, 4, 6, 8, 10] if warmup_steps == 0 else [0, 1, 2, 3, 4, 7, 10]
  np.testing.assert_allclose([float(sched(t)) for t in ts], want, rtol=0, atol=1e-7)


def test_total_epochs_gives_ceil_epochs_times_examples_over_batch(data_dir, tmp_path):
  """total_epochs (what every paper config sets): T = ceil(E · N / B), here through
  the trainer's start-up on the demo data (nothing is written)."""
  from s2d_jax.data import input_pipeline
  c = _config(data_dir, total_steps=0, total_epochs=2.3)
  n = input_pipeline.num_examples(c.input.data['name'], c.input.data['split'],
                                  data_dir=data_dir)
  b = int(c.input.batch_size)
  assert (n * 23) % (10 * b) != 0        # a partial last step: ceil matters
  want = -(-n * 23 // (10 * b))
  assert train._startup(c, str(tmp_path / 'w')).total == want
  assert train.total_steps_of(c, 100) == -(-230 // b)
  c.total_steps = 7
  assert train.total_steps_of(c, 100) == 7
  assert not os.path.exists(tmp_path / 'w')


def test_task_losses_against_numpy_references():
  """config.loss='sigmoid_xent' and the SigLIP loss, as the trainer calls them
  (tasks.get(config).loss), against float64 numpy with log σ(z) = −log(1 + e^{−z})
  (np.logaddexp: exact also for |z| = 40, where σ rounds to 0 or 1)."""
  rs = np.random.RandomState(0)
  logits = rs.randn(4, 5).astype(np.float32) * 3
  logits[0, 1], logits[2, 3] = 40.0, -40.0
  labels = np.array([1, 0, 3, 4])
  c = cu.default_train_config()
  c.model_name, c.num_classes, c.loss = 'vit', 5, 'sigmoid_xent'
  loss, aux = tasks.get(c).loss(c, (logits,), {'label': labels})
  z = logits.astype(np.float64)
  y = np.eye(5)[labels]
  want = np.mean(np.sum(y * np.logaddexp(0, -z) + (1 - y) * np.logaddexp(0, z), -1))
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  assert float(aux['acc']) == np.float32(np.mean(z.argmax(-1) == labels))
  # SigLIP: −(1/B) Σ_ij log σ(s_ij (t·zi·zj + b)), s = +1 on the diagonal, −1 off it
  zi = rs.randn(3, 4).astype(np.float32)
  zt = rs.randn(3, 4).astype(np.float32)
  c2 = cu.load_config('demo_pretrain:size=tiny')
  t, b = np.float32(10.0), np.float32(-10.0)
  loss, aux = tasks.get(c2).loss(c2, (zi, zt, {'t': t, 'b': b}), {})
  s = 2 * np.eye(3) - 1
  lg = 10.0 * zi.astype(np.float64) @ zt.T.astype(np.float64) - 10.0
  np.testing.assert_allclose(float(loss), np.sum(np.logaddexp(0, -s * lg)) / 3,
                             rtol=1e-5)
  assert float(aux['acc']) == np.float32(np.mean((zi @ zt.T).argmax(-1) ==
                                                 np.arange(3)))


def test_s2d_log_counts_every_kernel_and_layer():
  """s2d_log's total equals the sum of the counts set per kernel (scan stacks count
  each layer), and its σ_max equals the largest tracked σ."""
  import optax  # pylint: disable=g-import-not-at-top
  from s2d_jax import optim  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  params = {'a': {'kernel': rng.normal(size=(6, 4)).astype(np.float32)},
            'b': {'kernel': rng.normal(size=(6, 4)).astype(np.float32)},
            'encoderblock': {'c': {'kernel': rng.normal(size=(3, 5, 7)).astype(np.float32)}}}
  tx = optax.chain(optim.s2d(k=3, k_max=3), optax.adam(1e-3))
  state = optim.set_active(tx.init(params), {'a/kernel': 1, 'b/kernel': 3,
                                             'encoderblock/c/kernel': np.array([0, 2, 3])})
  log = jax.jit(train.s2d_log)(state)
  assert int(log['s2d_active']) == 1 + 3 + (0 + 2 + 3)
  sig = max(float(np.linalg.svd(params['a']['kernel'], compute_uv=False)[0]),
            float(np.linalg.svd(params['b']['kernel'], compute_uv=False)[0]),
            *[float(np.linalg.svd(m, compute_uv=False)[0])
              for m in params['encoderblock']['c']['kernel']])
  np.testing.assert_allclose(float(log['s2d_sigma_max']), sig, rtol=1e-4)
