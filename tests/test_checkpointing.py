"""orbax checkpoints: round trip (incl. NamedTuple opt state, shardings), keep-N,
latest step, crash safety, model fingerprint check, restore_params."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from s2d_jax import checkpointing as ck


def _tree(seed=0, width=4):
  r = np.random.RandomState(seed)
  return {'Dense_0': {'kernel': jnp.asarray(r.randn(8, width), jnp.float32),
                      'bias': jnp.asarray(r.randn(width), jnp.float32)},
          'scale': jnp.asarray(r.randn(), jnp.float32)}


def test_save_restore_roundtrip_with_optimizer_state_and_sharding(tmp_path):
  mesh = jax.make_mesh((8,), ('fsdp',))
  params = _tree()
  params['Dense_0']['kernel'] = jax.device_put(
      params['Dense_0']['kernel'], NamedSharding(mesh, P('fsdp', None)))
  tx = optax.adamw(1e-2)
  opt = tx.init(params)
  # one real update so moments are non-trivial
  g = jax.tree.map(jnp.ones_like, params)
  _, opt = tx.update(g, opt, params)
  c = ck.Checkpointer(str(tmp_path), max_to_keep=2)
  c.save(7, params, opt, {'data': {'batches_consumed': 7}})
  p2, o2, meta = c.restore(params, opt)
  c.close()
  assert meta['step'] == 7 and meta['data'] == {'batches_consumed': 7}
  assert jax.tree.structure(o2) == jax.tree.structure(opt)
  assert type(o2[0]).__name__ == type(opt[0]).__name__
  for a, b in zip(jax.tree.leaves((params, opt)), jax.tree.leaves((p2, o2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert p2['Dense_0']['kernel'].sharding.spec == P('fsdp', None)


def test_keep_n_latest_and_resolve(tmp_path):
  c = ck.Checkpointer(str(tmp_path), max_to_keep=2)
  assert c.latest_step() is None
  with pytest.raises(FileNotFoundError, match='no complete checkpoint'):
    c.read_meta()
  p = _tree()
  for s in (1, 2, 3):
    c.save(s, jax.tree.map(lambda x, s=s: x + s, p), {}, {})
  assert c.all_steps() == [2, 3] and c.latest_step() == 3
  assert c.read_meta()['step'] == 3
  with pytest.raises(FileNotFoundError, match='step 1.*have \\[2, 3\\]'):
    c.read_meta(1)
  c.close()
  got = ck.restore_params(str(tmp_path))
  np.testing.assert_allclose(got['scale'], np.asarray(p['scale']) + 3)
  got2 = ck.restore_params(str(tmp_path), step=2)
  np.testing.assert_allclose(got2['scale'], np.asarray(p['scale']) + 2)
  # checkpoints/ dir and a step dir also work
  np.testing.assert_allclose(
      ck.restore_params(os.path.join(tmp_path, 'checkpoints', '2'))['scale'],
      got2['scale'])
  np.testing.assert_allclose(
      ck.restore_params(os.path.join(tmp_path, 'checkpoints'))['scale'], got['scale'])
  assert isinstance(got['Dense_0']['kernel'], np.ndarray)


def test_incomplete_checkpoint_is_ignored(tmp_path):
  """A crash during a save leaves only a temporary directory: never picked up."""
  c = ck.Checkpointer(str(tmp_path))
  c.save(1, _tree(), {}, {})
  c.close()
  # What orbax leaves when killed mid-write: a tmp dir with partial content.
  tmp = os.path.join(tmp_path, 'checkpoints', '2.orbax-checkpoint-tmp-123')
  os.makedirs(os.path.join(tmp, 'params'))
  open(os.path.join(tmp, 'params', 'junk'), 'w').write('half')
  c = ck.Checkpointer(str(tmp_path))
  assert c.latest_step() == 1
  c.close()
  assert ck.restore_params(str(tmp_path))['scale'] == np.asarray(_tree()['scale'])


def test_other_model_checkpoint_is_rejected_by_name(tmp_path):
  c = ck.Checkpointer(str(tmp_path))
  c.save(1, _tree(width=4), {}, {})
  with pytest.raises(ValueError, match=r"Dense_0/bias.*\(4,\).*\(5,\)"):
    c.check_compatible(_tree(width=5))
  other = {'other': jnp.zeros(3)}
  with pytest.raises(ValueError, match='missing from it.*other'):
    c.restore(other, {})
  c.close()


def test_non_json_meta_fails_before_writing(tmp_path):
  c = ck.Checkpointer(str(tmp_path))
  with pytest.raises(TypeError):
    c.save(1, _tree(), {}, {'bad': object()})
  assert c.all_steps() == []
  c.close()


def test_restore_params_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='no such checkpoint directory'):
    ck.restore_params(str(tmp_path / 'nope'))
  with pytest.raises(FileNotFoundError, match='not a training workdir'):
    ck.restore_params(str(tmp_path))


def test_fingerprint_and_compare():
  fp = ck.fingerprint({'a': {'kernel': jnp.zeros((2, 3), jnp.bfloat16)}})
  assert fp == {'a/kernel': [2, 3, 'bfloat16']}
  ck.compare_fingerprints(fp, {'a/kernel': [2, 3, 'float32']}, 'x')  # dtype may differ
  with pytest.raises(ValueError, match="x was written for another model: 'a/kernel'"):
    ck.compare_fingerprints(fp, {'a/kernel': [3, 2, 'bfloat16']}, 'x')


def test_restore_params_onto_a_mesh(tmp_path):
  """restore_params(mesh=...) gives global arrays split by the FSDP rule (each
  process reads its shards), equal to the saved values."""
  from s2d_jax import parallel
  p = _tree(width=8)
  c = ck.Checkpointer(str(tmp_path))
  c.save(1, p, {}, {})
  c.close()
  mesh = parallel.make_mesh(4)
  got = ck.restore_params(str(tmp_path), mesh=mesh)
  assert got['Dense_0']['kernel'].sharding.spec == P('fsdp', None) or \
      got['Dense_0']['kernel'].sharding.spec == P(None, 'fsdp')
  assert got['Dense_0']['kernel'].sharding.mesh == mesh
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(p)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _adam_state(params):
  return optax.adamw(1e-2).init(params)


def test_optimizer_fingerprint_is_checked_before_restoring(tmp_path):
  """A checkpoint of another optimizer (here: gradient clipping added, as S2D on/off
  or another K_max would change the state) is refused by name before any array is
  read, with the caller's hint (on main: no optimizer fingerprint, orbax fails
  deep inside the restore)."""
  p = _tree()
  c = ck.Checkpointer(str(tmp_path))
  c.save(3, p, _adam_state(p), {})
  assert ck.fingerprint(_adam_state(p)) == c.read_meta()['opt_fingerprint']
  other = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)).init(p)
  with pytest.raises(ck.IncompatibleCheckpointError,
                     match=r'checkpoint .*3 was written for another optimizer: '
                     r'optimizer state entries missing.*; clip is on now') as e:
    c.check_compatible(p, abstract_opt_state=other, hint='clip is on now')
  assert isinstance(e.value, ValueError)
  with pytest.raises(ck.IncompatibleCheckpointError, match='another optimizer'):
    c.restore(p, other)
  p2, _, _ = c.restore(p, _adam_state(p))   # the right one still restores
  np.testing.assert_array_equal(p2['scale'], p['scale'])
  c.close()


def _damage(step_dir, how):
  if how == 'meta garbage':
    open(os.path.join(step_dir, 'meta', 'metadata'), 'w').write('{"step": 2, gar')
  else:
    d = os.path.join(step_dir, 'params', 'ocdbt.process_0', 'd')
    for f in os.listdir(d):
      if how == 'data deleted':
        os.remove(os.path.join(d, f))
      else:  # truncated
        with open(os.path.join(d, f), 'r+b') as fh:
          fh.truncate(7)


@pytest.mark.parametrize('how', ['data deleted', 'data truncated', 'meta garbage'])
def test_damaged_step_gives_one_message_with_the_fallback(tmp_path, how):
  """One line naming the step, its directory and the previous step to fall back to
  (on main: orbax's / TensorStore's multi-line error, or a KeyError)."""
  p = _tree(width=64)
  c = ck.Checkpointer(str(tmp_path))
  c.save(1, p, _adam_state(p), {})
  c.save(2, p, _adam_state(p), {})
  step_dir = os.path.join(tmp_path, 'checkpoints', '2')
  _damage(step_dir, how)
  calls = [lambda: c.restore(p, _adam_state(p)),
           lambda: ck.restore_params(str(tmp_path))]
  for call in calls:
    with pytest.raises(ck.DamagedCheckpointError) as e:
      call()
    msg = str(e.value)
    assert '\n' not in msg and len(msg) < 800, msg
    assert f'checkpoint step 2 in {os.path.join(tmp_path, "checkpoints")} is ' \
        'damaged' in msg, msg
    assert f'previous checkpoint (step 1), delete {step_dir}' in msg, msg
  c.close()
  # following the advice works
  import shutil
  shutil.rmtree(step_dir)
  np.testing.assert_array_equal(ck.restore_params(str(tmp_path))['scale'], p['scale'])


def test_damaged_only_step_says_start_again(tmp_path):
  p = _tree()
  c = ck.Checkpointer(str(tmp_path))
  c.save(5, p, _adam_state(p), {})
  _damage(os.path.join(tmp_path, 'checkpoints', '5'), 'meta garbage')
  with pytest.raises(ck.DamagedCheckpointError,
                     match='no earlier checkpoint: delete .*5 to start again'):
    c.read_meta()
  c.close()


def test_restore_params_checks_expected_before_reading(tmp_path):
  p = _tree(width=4)
  c = ck.Checkpointer(str(tmp_path))
  c.save(1, p, {}, {'config': {'w': 4}})
  c.close()
  with pytest.raises(ck.IncompatibleCheckpointError,
                     match=r"'Dense_0/bias' has shape \(4,\) there but \(5,\) in the "
                     r"model; w is 5 now"):
    ck.restore_params(str(tmp_path), expected=_tree(width=5),
                      hint=lambda meta: f'w is 5 now, {meta["config"]["w"]} there')
