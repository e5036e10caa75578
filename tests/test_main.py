"""The main job end to end at the reduced size (`--size tiny`)."""

import json
import os

import numpy as np
import pytest

from s2d_jax import config_utils
from s2d_jax import main
from s2d_jax import report
from s2d_jax import train


def test_main_job_tiny_end_to_end(tmp_path):
  wd = str(tmp_path / 'main')
  out = main.main(['--workdir', wd, '--size', 'tiny', '--pretrain_steps', '6',
                   '--finetune_steps', '4'])
  rows = out['rows']
  assert list(rows) == ['AdamW', 'AdamW+S2D']
  for run, sub in (('AdamW', 'adamw'), ('AdamW+S2D', 's2d')):
    rep = json.load(open(os.path.join(wd, sub, 'report.json')))
    assert set(rep['accuracy']) == {'float', 'W8A8', 'W6A6', 'W4A4'}
    for s in rep['accuracy']:
      assert rows[run][s] == rep['accuracy'][s]          # table = measured report
    assert report.summarize(rep, list(rep['accuracy'])) == {
        k: v for k, v in rows[run].items() if k != 'train_steps'}
    assert rows[run]['max_abs_act'] == max(v['max_abs'] for v in rep['layers'].values())
    assert rows[run]['sigma_max'] == max(v['sigma_max'] for v in rep['weights'].values())
    assert rows[run]['train_steps'] == 4
  # the pre-trained model is a big_vision two-towers npz with both towers
  z = np.load(os.path.join(wd, 'pretrain', 'params.npz'))
  assert any(k.startswith('params/img/') for k in z.files)
  assert any(k.startswith('params/txt/') for k in z.files)
  for name in ('accuracy.png', 'max_act.png', 'kurtosis.png', 'sigma_max.png'):
    assert os.path.getsize(os.path.join(wd, 'plots', name)) > 0
  table = open(os.path.join(wd, 'results.md')).read()
  assert 'AdamW+S2D' in table and 'W4A4' in table and 'σ_max' in table
  assert json.load(open(os.path.join(wd, 'results.json')))['rows'] == json.loads(
      json.dumps(rows))


def test_main_rejects_unknown_size(tmp_path):
  with pytest.raises(config_utils.UsageError, match='size'):
    main.main(['--workdir', str(tmp_path), '--size', 'huge'])
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
    assert '--size' in out and '--seed' in out
