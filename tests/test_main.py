"""The main job: end to end at the reduced size (`--size tiny`), its summary helpers."""

import json
import os

import numpy as np
import pytest

from s2d_jax import comparison
from s2d_jax import config_utils
from s2d_jax import main
from s2d_jax import train

TINY_SETTINGS = ['float', 'W8A8-static', 'W4A4-static']


def _report(acc, max_abs=1.0, sigma=2.0, pcdr1=0.5):
  """A minimal report.json: one activation, one kernel, a zero head (start model)."""
  return dict(
      accuracy=acc,
      layers={'Transformer/encoderblock_0/MlpBlock_0/Dense_1/input': dict(
          max_abs=max_abs, top1_median_ratio=10 * max_abs, kurtosis=3.0)},
      weights={'Transformer/encoderblock_0/MlpBlock_0/Dense_0': dict(sigma_max=sigma),
               'head': dict(sigma_max=0.0)},
      pcdr={'Transformer/encoderblock_0/MlpBlock_0/Dense_0': [pcdr1, 0.9, 1.0]})


def test_aggregate_mean_std_delta_and_layers():
  """Hand-computed means, sample stds, drops, deltas and per-layer seed means."""
  acc = lambda f, q: {'float': f, 'W4A4-static': q}
  reports = {'AdamW': [_report(acc(0.9, 0.8), 10.0, 4.0), _report(acc(0.8, 0.6), 20.0, 6.0)],
             'AdamW+S2D': [_report(acc(0.9, 0.9), 5.0, 2.0, 0.1),
                           _report(acc(0.7, 0.6), 7.0, 3.0, 0.3)]}
  res = comparison.aggregate(_report(acc(0.1, 0.1), 30.0, 8.0, 0.7), reports,
                       ['float', 'W4A4-static'], [3, 4])
  assert res['seeds'] == [3, 4] and res['settings'] == ['float', 'W4A4-static']
  a = res['runs']['AdamW']['accuracy']['W4A4-static']
  assert a['per_seed'] == [0.8, 0.6]
  assert a['mean'] == pytest.approx(0.7) and a['std'] == pytest.approx(np.sqrt(0.02))
  d = res['runs']['AdamW']['drop']['W4A4-static']
  assert d['per_seed'] == pytest.approx([0.1, 0.2]) and d['mean'] == pytest.approx(0.15)
  assert 'float' not in res['runs']['AdamW']['drop']
  assert res['delta']['W4A4-static'] == pytest.approx(0.75 - 0.7)
  assert res['delta']['float'] == pytest.approx(0.8 - 0.85)
  lay = res['layers']['Transformer/encoderblock_0/MlpBlock_0/Dense_1/input']
  assert lay['start'] == dict(max_abs=30.0, max_median=300.0, kurtosis=3.0)
  assert lay['AdamW']['max_abs']['mean'] == pytest.approx(15.0)
  assert lay['AdamW+S2D']['max_median']['per_seed'] == [50.0, 70.0]
  k = res['kernels']['Transformer/encoderblock_0/MlpBlock_0/Dense_0']
  assert k['start'] == dict(sigma_max=8.0, pcdr1=0.7)
  assert k['AdamW+S2D']['pcdr1']['mean'] == pytest.approx(0.2)
  assert 'head' not in res['kernels']   # the start model's head is a new zero head
  head = comparison.headline(res)
  assert head['start']['sigma_max'] == 8.0 and head['AdamW']['sigma_max'] == 5.0
  assert head['AdamW+S2D']['max_abs'] == pytest.approx(6.0)
  table = comparison.format_table(res)
  assert '| W4A4-static' in table and '70.00 ± 14.14' in table and '+5.00' in table
  layers = comparison.format_layers(res)
  assert ('| Transformer/encoderblock_0/MlpBlock_0/Dense_1/input | 30.0 → 15.0 → 6.0 | '
          '300 → 150 → 60 | 3 → 3 → 3 |') in layers
  assert ('| Transformer/encoderblock_0/MlpBlock_0/Dense_0 | 8.00 → 5.00 → 2.50 | '
          '0.70 → 0.50 → 0.20 |') in layers


def test_mean_std_one_seed_has_zero_std():
  assert comparison.mean_std([0.5]) == dict(per_seed=[0.5], mean=0.5, std=0.0)


def test_default_start_is_the_shipped_npz(tmp_path):
  """Without --pretrain the default size starts from the asset, untouched."""
  out = main.start_model(str(tmp_path), 'default', False, None, '', '')
  assert out['source'] == 'shipped' and out['npz'] == main.asset(main.ASSET_NPZ)
  assert out['sha256'] == main.sha256(out['npz']) and os.path.exists(out['spm'])
  assert not os.listdir(tmp_path)


def test_main_job_tiny_end_to_end(tmp_path):
  wd = str(tmp_path / 'main')
  out = main.main(['--workdir', wd, '--size', 'tiny', '--pretrain_steps', '4',
                   '--finetune_steps', '3', '--seeds', '1', '--seed', '5'])
  res = out['results']
  assert list(res['runs']) == ['AdamW', 'AdamW+S2D'] and res['seeds'] == [5]
  assert res['settings'] == TINY_SETTINGS
  saved = json.load(open(os.path.join(wd, 'results.json')))
  assert saved['runs'] == json.loads(json.dumps(res['runs']))
  for run, sub in (('AdamW', 'adamw'), ('AdamW+S2D', 's2d')):
    reps = [json.load(open(os.path.join(wd, sub, 'seed5', 'report.json')))]
    for s in TINY_SETTINGS:
      acc = saved['runs'][run]['accuracy'][s]
      per_seed = [r['accuracy'][s] for r in reps]         # table = measured reports
      assert acc['per_seed'] == per_seed
      assert acc['mean'] == per_seed[0] and acc['std'] == 0.0   # 2 seeds: above
    layer = 'Transformer/encoderblock_1/MlpBlock_0/Dense_1/input'
    assert saved['layers'][layer][run]['max_abs']['per_seed'] == [
        r['layers'][layer]['max_abs'] for r in reps]
    assert saved['train_steps'][run] == 3
  for s in TINY_SETTINGS:
    assert saved['delta'][s] == pytest.approx(
        saved['runs']['AdamW+S2D']['accuracy'][s]['mean']
        - saved['runs']['AdamW']['accuracy'][s]['mean'])
  # the starting model: pre-trained (tiny has no shipped npz), both towers, measured
  assert saved['start_model']['source'] == 'pretrained'
  z = np.load(os.path.join(wd, 'pretrain', 'params.npz'))
  assert any(k.startswith('params/img/') for k in z.files)
  assert any(k.startswith('params/txt/') for k in z.files)
  start = json.load(open(os.path.join(wd, 'start', 'report.json')))
  assert saved['layers'][layer]['start']['max_abs'] == start['layers'][layer]['max_abs']
  assert all(saved['versions'][k] for k in ('jax', 'flax', 'optax', 'tensorflow'))
  assert saved['cpu_s'] > 0 and saved['wall_s'] > 0
  for name in ('accuracy_drop.png', 'layers.png', 'kernels.png',
               'sigma_over_steps.png'):
    assert os.path.getsize(os.path.join(wd, 'plots', name)) > 0
  table = open(os.path.join(wd, 'results.md')).read()
  assert out['table'] in table and 'W4A4-static' in table and 'σ_max' in table


def test_main_rejects_unknown_size_and_no_seeds(tmp_path):
  with pytest.raises(config_utils.UsageError, match='size'):
    main.main(['--workdir', str(tmp_path), '--size', 'huge'])
  with pytest.raises(config_utils.UsageError, match='seeds'):
    main.main(['--workdir', str(tmp_path), '--seeds', '0'])
  with pytest.raises(config_utils.UsageError, match="--ptq='RepQ,Foo'.*unknown method"):
    main.main(['--workdir', str(tmp_path), '--ptq', 'RepQ,Foo'])
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize('entry', [main, train])
def test_help_lists_flags_and_an_example(entry, capsys):
  with pytest.raises(SystemExit) as e:
    entry.main(['--help'])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert f'python -m {entry.__name__}' in out and '--workdir' in out
  if entry is train:
    assert '--config' in out and '--coordinator_address' in out
  else:
    assert '--size' in out and '--seeds' in out and '--pretrain' in out


def test_demo_config_ptq_settings():
  """RepQ-ViT/W4A4 by default; 'all' = every registered PTQ method at W4A4 (weight-only
  GPTQ at W4A16); '+'-separated lists."""
  from s2d_jax import ptq  # pylint: disable=g-import-not-at-top
  settings = config_utils.load_config('demo').evaluate.settings
  assert settings == ('float', 'W8A8-static', 'W6A6-static', 'W4A4-static', 'W4A4',
                      'RepQ-ViT/W4A4')
  settings = config_utils.load_config('demo:ptq=all').evaluate.settings
  want = [f'{m}/W4A16' if m == 'GPTQ' else f'{m}/W4A4' for m in ptq.METHODS]
  assert list(settings[5:]) == want
  assert config_utils.load_config('demo:ptq=ERQ').evaluate.settings[5:] == ('ERQ/W4A4',)
  assert config_utils.load_config('demo:ptq=ERQ+GPTQ').evaluate.settings[5:] == (
      'ERQ/W4A4', 'GPTQ/W4A16')
  assert len(config_utils.load_config('demo:ptq=').evaluate.settings) == 5
  with pytest.raises(ValueError, match="ptq='Foo'.*unknown method 'Foo'"):
    config_utils.load_config('demo:ptq=Foo')


def test_compilation_cache_is_set_for_the_job_and_restored(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  before = (jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_min_compile_time_secs)
  with main.compilation_cache(str(tmp_path / 'c')):
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'c')
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
  assert (jax.config.jax_compilation_cache_dir,
          jax.config.jax_persistent_cache_min_compile_time_secs) == before
  with main.compilation_cache(None):
    assert jax.config.jax_compilation_cache_dir == before[0]
