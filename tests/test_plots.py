"""The main job's plots (s2d_jax/plots.py): the plotted numbers against hand-computed
values from small synthetic results, then the figures (ticks, error bars, styles)."""

import json
import math
import os

import numpy as np
import pytest

from s2d_jax import plots

SQRT_1_3 = math.sqrt(1 / 3)


def _acc(*per_seed):
  v = np.asarray(per_seed)
  return dict(per_seed=list(per_seed), mean=float(v.mean()),
              std=float(v.std(ddof=1)) if v.size > 1 else 0.0)


def _stat(*per_seed):
  return _acc(*per_seed)


L_FC2 = 'Transformer/encoderblock_0/MlpBlock_0/Dense_1/input'
L_Q1 = 'Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/input'
L_OUT0 = 'Transformer/encoderblock_0/output'
L_MAP = 'MAPHead_0/MlpBlock_0/Dense_0/input'
K_FC1 = 'Transformer/encoderblock_0/MlpBlock_0/Dense_0'
K_FC1_B1 = 'Transformer/encoderblock_1/MlpBlock_0/Dense_0'
K_EMB = 'embedding'


def _results():
  """3 seeds; AdamW+S2D lacks RepQ-ViT/W4A4. Top-1 fractions chosen so that the
  per-seed drops are exact small integers in points."""
  layer = lambda s, a, b, c: {'start': dict(max_abs=s, max_median=10 * s, kurtosis=3.0),
                              'AdamW': dict(max_abs=_stat(*a), max_median=_stat(*b),
                                            kurtosis=_stat(3, 3, 3)),
                              'AdamW+S2D': dict(max_abs=_stat(*c),
                                                max_median=_stat(*c),
                                                kurtosis=_stat(3, 3, 3))}
  kernel = lambda s, p, a, c: {'start': dict(sigma_max=s, pcdr1=p),
                               'AdamW': dict(sigma_max=_stat(*a), pcdr1=None),
                               'AdamW+S2D': dict(sigma_max=_stat(*c),
                                                 pcdr1=_stat(0.1, 0.2, 0.3))}
  return {
      'settings': ['float', 'W8A8-static', 'W4A4-static', 'RepQ-ViT/W4A4'],
      'seeds': [0, 1, 2],
      'runs': {
          'AdamW': {'accuracy': {
              'float': _acc(0.90, 0.80, 0.85),
              'W8A8-static': _acc(0.89, 0.80, 0.86),      # -1, 0, +1
              'W4A4-static': _acc(0.70, 0.75, 0.65),      # -20, -5, -20
              'RepQ-ViT/W4A4': _acc(0.88, 0.78, 0.84)}},  # -2, -2, -1
          'AdamW+S2D': {'accuracy': {
              'float': _acc(0.88, 0.82, 0.86),
              'W8A8-static': _acc(0.88, 0.81, 0.86),      # 0, -1, 0
              'W4A4-static': _acc(0.80, 0.80, 0.80)}}},   # -8, -2, -6
      'layers': {L_MAP: layer(4.0, (5, 5, 5), (6, 6, 6), (4, 4, 4)),
                 L_OUT0: layer(100.0, (110, 120, 130), (9, 9, 9), (90, 90, 90)),
                 L_FC2: layer(12.0, (11, 12, 13), (200, 210, 220), (8, 9, 10)),
                 L_Q1: layer(1.0, (1, 1, 1), (2, 2, 2), (1, 1, 1))},
      'kernels': {K_FC1_B1: kernel(7.0, 0.6, (7, 7, 7), (4, 4, 4)),
                  K_FC1: kernel(9.0, 0.8, (9, 9.5, 10), (5, 6, 7)),
                  K_EMB: kernel(3.0, 0.2, (3, 3, 3), (2, 2, 2))},
  }


def _one_seed():
  r = _results()
  r['seeds'] = [0]
  for run in r['runs'].values():
    for s, a in run['accuracy'].items():
      run['accuracy'][s] = _acc(a['per_seed'][0])
  for row in list(r['layers'].values()) + list(r['kernels'].values()):
    for who in ('AdamW', 'AdamW+S2D'):
      for stat, v in row[who].items():
        if v is not None:
          row[who][stat] = _stat(v['per_seed'][0])
  return r


# ------------------------------------------------------------------- data --

def test_drop_series_is_per_seed_difference_then_mean_and_sample_std():
  d = plots.drop_series(_results())
  assert d.settings == ('W8A8-static', 'W4A4-static', 'RepQ-ViT/W4A4')
  assert d.n_seeds == 3
  np.testing.assert_allclose(d.mean['AdamW'], [0, -15, -5 / 3], atol=1e-9)
  # W4A4: drops (-20, -5, -20) -> sqrt(75); NOT the std of the setting's top-1 (5)
  # nor a combination of the two runs' stds.
  np.testing.assert_allclose(d.std['AdamW'], [1, math.sqrt(75), SQRT_1_3], rtol=1e-9)
  np.testing.assert_allclose(d.mean['AdamW+S2D'][:2], [-1 / 3, -16 / 3], atol=1e-9)
  np.testing.assert_allclose(d.std['AdamW+S2D'][:2], [SQRT_1_3, math.sqrt(84) / 3],
                             rtol=1e-9)
  assert np.isnan(d.mean['AdamW+S2D'][2]) and d.n['AdamW+S2D'].tolist() == [3, 3, 0]
  assert d.notes == ('AdamW+S2D RepQ-ViT/W4A4 (missing)',)


def test_drop_series_subset_one_seed_and_bad_values():
  d = plots.drop_series(_results(), settings=['W4A4-static', 'float'])
  assert d.settings == ('W4A4-static',)
  one = plots.drop_series(_one_seed())
  np.testing.assert_allclose(one.mean['AdamW'], [-1, -20, -2], atol=1e-9)
  assert np.all(np.isnan(one.std['AdamW'])) and one.n_seeds == 1
  r = _results()
  r['runs']['AdamW']['accuracy']['W4A4-static']['per_seed'][1] = float('nan')
  r['runs']['AdamW']['accuracy']['W8A8-static']['per_seed'] = [0.9, 0.8]
  del r['runs']['AdamW+S2D']['accuracy']['float']
  d = plots.drop_series(r)
  assert np.isnan(d.mean['AdamW'][:2]).all() and np.isfinite(d.mean['AdamW'][2])
  assert np.isnan(d.mean['AdamW+S2D']).all()
  assert d.notes == ('AdamW W8A8-static (2 seeds vs 3 for float)',
                     'AdamW W4A4-static (non-finite)', 'AdamW+S2D (no float top-1)')


@pytest.mark.parametrize('results,kw,match', [
    ({}, {}, "non-empty 'runs'"),
    ({'runs': {}, 'settings': ['float']}, {}, "non-empty 'runs'"),
    (None, {}, "non-empty 'runs'"),
    (_results(), {'settings': ['W4A4-static', 'W3A3']}, r"unknown setting.*W3A3"),
    (_results(), {'settings': ['float']}, 'no quantized setting'),
    ({**_results(), 'settings': ['W4A4-static']}, {}, "no 'float'"),
])
def test_drop_series_rejects_bad_input(results, kw, match):
  with pytest.raises(ValueError, match=match):
    plots.drop_series(results, **kw)


@pytest.mark.parametrize('name,label', [
    ('Transformer/encoderblock_3/MlpBlock_0/Dense_1/input', 'b3/mlp/fc2 in'),
    ('Transformer/encoderblock_0/MlpBlock_0/Dense_0/input', 'b0/mlp/fc1 in'),
    ('MAPHead_0/MlpBlock_0/Dense_0/input', 'map/mlp/fc1 in'),
    ('Transformer/encoderblock_11/MultiHeadDotProductAttention_0/query/input',
     'b11/attn/q in'),
    ('Transformer/encoderblock_2/MultiHeadDotProductAttention_0/key/input',
     'b2/attn/k in'),
    ('Transformer/encoderblock_2/MultiHeadDotProductAttention_0/value/input',
     'b2/attn/v in'),
    ('Transformer/encoderblock_2/MultiHeadDotProductAttention_0/out/input',
     'b2/attn/out in'),
    ('Transformer/encoderblock_1/output', 'b1 out'),
    ('embedding/input', 'embed in'),
    ('head/input', 'head in'),
    ('head', 'head'),
    ('MAPHead_0/MultiHeadDotProductAttention_0/query', 'map/attn/q'),
    ('Transformer/encoderblock/MlpBlock_0/Dense_1/kernel', 'b*/mlp/fc2'),
    ('params/img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel',
     'img/b0/mlp/fc1'),
    ('Transformer/encoder_norm', 'norm'),
    ('output', 'output'),
])
def test_layer_label(name, label):
  assert plots.layer_label(name) == label


def test_forward_order():
  want = ['embedding/input',
          'Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/input',
          'Transformer/encoderblock_0/MultiHeadDotProductAttention_0/key/input',
          'Transformer/encoderblock_0/MultiHeadDotProductAttention_0/value/input',
          'Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/input',
          'Transformer/encoderblock_0/MlpBlock_0/Dense_0/input',
          'Transformer/encoderblock_0/MlpBlock_0/Dense_1/input',
          'Transformer/encoderblock_0/output',
          'Transformer/encoderblock_2/MlpBlock_0/Dense_0/input',
          'Transformer/encoderblock_10/MlpBlock_0/Dense_0/input',
          'Transformer/encoder_norm',
          'MAPHead_0/MultiHeadDotProductAttention_0/query/input',
          'MAPHead_0/MlpBlock_0/Dense_1/input',
          'head/input']
  assert sorted(reversed(want), key=plots.forward_order) == want


def test_stat_series_start_seed_mean_std_and_missing():
  r = _results()
  s = plots.stat_series(r, 'layers', 'max_abs')
  assert s.names == (L_FC2, L_OUT0, L_Q1, L_MAP)
  assert s.labels == ('b0/mlp/fc2 in', 'b0 out', 'b1/attn/q in', 'map/mlp/fc1 in')
  np.testing.assert_allclose(s.mean['start'], [12, 100, 1, 4])
  np.testing.assert_allclose(s.mean['AdamW'], [12, 120, 1, 5])
  np.testing.assert_allclose(s.std['AdamW'], [1, 10, 0, 0])
  assert np.isnan(s.std['start']).all() and s.notes == ()
  k = plots.stat_series(r, 'kernels', 'pcdr1')
  assert k.names == (K_EMB, K_FC1, K_FC1_B1)
  np.testing.assert_allclose(k.mean['start'], [0.2, 0.8, 0.6])
  np.testing.assert_allclose(k.mean['AdamW+S2D'], [0.2] * 3)
  assert np.isnan(k.mean['AdamW']).all()
  assert k.notes == ('AdamW: no finite pcdr1 for 3 of 3',)
  r['layers'][L_MAP]['AdamW']['max_abs']['mean'] = float('inf')
  s = plots.stat_series(r, 'layers', 'max_abs')
  assert np.isnan(s.mean['AdamW'][3]) and s.notes == (
      'AdamW: no finite max_abs for 1 of 4',)
  one = plots.stat_series(_one_seed(), 'kernels', 'sigma_max')
  np.testing.assert_allclose(one.mean['AdamW+S2D'], [2, 5, 4])
  assert np.isnan(one.std['AdamW+S2D']).all()


def test_select_names_keeps_all_or_matmul_inputs_then_largest():
  r = _results()
  assert plots.select_names(r, 'layers', 'max_median') == (
      [L_FC2, L_OUT0, L_Q1, L_MAP], '')
  assert plots.select_names(r, 'layers', 'max_median', max_n=3) == (
      [L_FC2, L_Q1, L_MAP], 'showing 3 of 4: matmul inputs')
  # max over start / runs of max_median: fc2 220, q 10, map 40 -> fc2, map
  assert plots.select_names(r, 'layers', 'max_median', max_n=2) == (
      [L_FC2, L_MAP], 'showing 2 of 4: matmul inputs, the 2 largest by max_median')
  assert plots.select_names(r, 'kernels', 'sigma_max', max_n=1) == (
      [K_FC1], 'showing 1 of 3: the 1 largest by sigma_max')
  with pytest.raises(ValueError, match='table'):
    plots.select_names(r, 'weights', 'sigma_max')


def _write_metrics(path, records, torn=False):
  with open(path, 'w') as f:
    for rec in records:
      f.write(json.dumps(rec) + '\n')
    if torn:
      f.write('{"step": 99, "sigma_max/a')
  return str(path)


KA = 'Transformer/encoderblock/MlpBlock_0/Dense_0/kernel'
KB = 'MAPHead_0/MlpBlock_0/Dense_0/kernel'


def test_read_sigma_log(tmp_path):
  p = _write_metrics(tmp_path / 'm.jsonl', [
      {'step': 20, 'loss': 1.0, 'sigma_max': 5.0, f'sigma_max/{KA}': 5.0,
       f'sigma_max/{KB}': 4.0},
      {'step': 10, f'sigma_max/{KA}': 6.0, f'sigma_max/{KB}': 4.5},
      {'step': 30, 'loss': 0.5},
      {'step': 20, f'sigma_max/{KA}': 5.5},          # a resumed run's rewrite wins
      {'step': 40, f'sigma_max/{KA}': 4.0, 's2d_sigma_max': 9.0}], torn=True)
  log = plots.read_sigma_log(p)
  assert sorted(log) == sorted([KA, KB])
  np.testing.assert_array_equal(log[KA][0], [10, 20, 40])
  np.testing.assert_allclose(log[KA][1], [6.0, 5.5, 4.0])
  np.testing.assert_array_equal(log[KB][0], [10, 20])
  np.testing.assert_allclose(log[KB][1], [4.5, 4.0])


def _metrics(tmp_path):
  """AdamW: seeds 0, 1 (seed 1 misses step 30); AdamW+S2D: seed 0, seed 1 without a
  file, seed 2 without σ records."""
  d = tmp_path / 'runs'
  d.mkdir(exist_ok=True)
  rec = lambda s, a, b: {'step': s, f'sigma_max/{KA}': a, f'sigma_max/{KB}': b}
  return {
      'AdamW': {0: _write_metrics(d / 'a0', [rec(10, 8, 6), rec(20, 8, 6),
                                             rec(30, 8, 6)]),
                1: _write_metrics(d / 'a1', [rec(10, 10, 6), rec(20, 9, 7)])},
      'AdamW+S2D': {0: _write_metrics(d / 's0', [rec(10, 7, 5), rec(20, 6, 4)]),
                    1: str(d / 'missing.jsonl'),
                    2: _write_metrics(d / 's2', [{'step': 10, 'loss': 1.0}])}}


def test_sigma_steps_series_mean_over_seeds_at_common_steps(tmp_path):
  d = plots.sigma_steps_series(_metrics(tmp_path))
  assert d.kernels == (KA, KB) and d.n_seeds == {'AdamW': 2, 'AdamW+S2D': 1}
  a = d.runs['AdamW'][KA]
  np.testing.assert_array_equal(a.steps, [10, 20])
  np.testing.assert_allclose(a.mean, [9, 8.5])
  np.testing.assert_allclose(a.std, [math.sqrt(2), math.sqrt(0.5)])
  assert sorted(a.per_seed) == [0, 1] and len(a.per_seed[0][0]) == 3
  s = d.runs['AdamW+S2D'][KB]
  np.testing.assert_allclose(s.mean, [5, 4])
  assert np.isnan(s.std).all()
  assert d.notes == ('AdamW+S2D seed 1 (no metrics.jsonl)',
                     'AdamW+S2D seed 2 (no σ_max logged)')
  empty = plots.sigma_steps_series(None)
  assert empty.kernels == () and empty.runs == {}
  with pytest.raises(ValueError, match='metrics'):
    plots.sigma_steps_series(['a.jsonl'])
  with pytest.raises(ValueError, match=r"metrics\['AdamW'\]"):
    plots.sigma_steps_series({'AdamW': 'a.jsonl'})


def test_start_sigma_scanned_is_max_over_blocks():
  r = _results()
  assert plots.start_sigma(r, KA) == 9.0            # max over encoderblock_0, _1
  assert plots.start_sigma(r, K_FC1_B1 + '/kernel') == 7.0
  assert plots.start_sigma(r, KB) is None and plots.start_sigma(None, KA) is None


# ---------------------------------------------------------------- figures --

def _errorbars(ax):
  return {c.get_label(): c for c in ax.containers}


def test_accuracy_drop_figure_ticks_and_error_bars():
  fig = plots.fig_accuracy_drop(_results())
  ax = fig.axes[0]
  assert [t.get_text() for t in ax.get_xticklabels()] == [
      'W8A8-static', 'W4A4-static', 'RepQ-ViT/W4A4']
  assert '3 seeds' in ax.get_title() and 'RepQ-ViT/W4A4 (missing)' in ax.get_title()
  assert any(list(l.get_ydata()) == [0, 0] for l in ax.get_lines())   # zero line
  bars = _errorbars(ax)
  assert sorted(bars) == ['AdamW (float 85.00 ± 5.00 %)',
                          'AdamW+S2D (float 85.33 ± 3.06 %)']
  adamw = bars['AdamW (float 85.00 ± 5.00 %)']
  data, _, (cols,) = adamw.lines
  np.testing.assert_allclose(data.get_ydata(), [0, -15, -5 / 3], atol=1e-9)
  np.testing.assert_allclose(data.get_xdata(), [-0.18, 0.82, 1.82])
  half = [(seg[1][1] - seg[0][1]) / 2 for seg in cols.get_segments()]
  np.testing.assert_allclose(half, [1, math.sqrt(75), SQRT_1_3], rtol=1e-9)
  s2d = bars['AdamW+S2D (float 85.33 ± 3.06 %)']
  np.testing.assert_allclose(s2d.lines[0].get_xdata(), [0.18, 1.18])  # RepQ skipped
  assert len(s2d.lines[2][0].get_segments()) == 2


def test_accuracy_drop_figure_one_seed_has_no_error_bars():
  ax = plots.fig_accuracy_drop(_one_seed()).axes[0]
  assert '1 seed, no error bars' in ax.get_title()
  assert all(not c.has_yerr for c in ax.containers) and len(ax.containers) == 2


def test_layers_and_kernels_figures_name_their_axes():
  fig = plots.fig_layers(_results())
  top, bot = fig.axes
  assert [t.get_text() for t in bot.get_xticklabels()] == [
      'b0/mlp/fc2 in', 'b0 out', 'b1/attn/q in', 'map/mlp/fc1 in']
  assert top.get_yscale() == 'log'
  assert 'seed mean ± std over 3 seeds' in top.get_title()
  bars = _errorbars(top)
  half = [(s[1][1] - s[0][1]) / 2 for s in bars['AdamW'].lines[2][0].get_segments()]
  np.testing.assert_allclose(half, [1, 10, 0, 0])
  start = [l for l in top.get_lines() if l.get_label() == 'start model'][0]
  np.testing.assert_allclose(start.get_ydata(), [12, 100, 1, 4])
  sel = plots.fig_layers(_results(), max_n=2).axes
  assert [t.get_text() for t in sel[1].get_xticklabels()] == [
      'b0/mlp/fc2 in', 'map/mlp/fc1 in']
  assert 'showing 2 of 4' in sel[0].get_title()
  kfig = plots.fig_kernels(_one_seed())
  assert [t.get_text() for t in kfig.axes[1].get_xticklabels()] == [
      'embed', 'b0/mlp/fc1', 'b1/mlp/fc1']
  assert '1 seed' in kfig.axes[0].get_title()
  assert all(not c.has_yerr for c in kfig.axes[0].containers)
  assert 'AdamW: no finite pcdr1' in kfig.axes[0].get_title()


def test_sigma_over_steps_figure_styles(tmp_path):
  ax = plots.fig_sigma_over_steps(_metrics(tmp_path), _results()).axes[0]
  lines = {l.get_label(): l for l in ax.get_lines()}
  a, s = lines['AdamW: b*/mlp/fc1'], lines['AdamW+S2D: b*/mlp/fc1']
  assert a.get_linestyle() == '--' and s.get_linestyle() == '-'
  assert a.get_color() == s.get_color() != lines['AdamW: map/mlp/fc1'].get_color()
  np.testing.assert_allclose(a.get_ydata(), [9, 8.5])
  assert list(lines['start: b*/mlp/fc1'].get_ydata()) == [9.0]   # max over blocks
  assert 'start: map/mlp/fc1' not in lines                         # not in results
  assert len(ax.collections) == 2          # ± std bands: AdamW's two kernels only
  title = ax.get_title()
  assert '2 tracked kernels' in title and 'b*: scanned blocks' in title
  assert 'AdamW+S2D seed 1 (no metrics.jsonl)' in title
  legend = [t.get_text() for t in ax.get_legend().get_texts()]
  assert legend == ['b*/mlp/fc1', 'map/mlp/fc1', 'AdamW', 'AdamW+S2D',
                    'start model (step 0)']
  none = plots.fig_sigma_over_steps(None).axes[0]
  assert 'no σ_max logged' in none.get_title() and not none.get_lines()


def test_save_results_writes_pngs_and_rejects_bad_results(tmp_path):
  out = tmp_path / 'plots'
  paths = plots.save_results(_results(), str(out), metrics=_metrics(tmp_path))
  assert [os.path.basename(p) for p in paths] == [
      'accuracy_drop.png', 'layers.png', 'kernels.png', 'sigma_over_steps.png']
  for p in paths:
    with open(p, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with pytest.raises(ValueError, match='runs'):
    plots.save_results({'settings': ['float']}, str(tmp_path / 'bad'))
  assert not os.path.exists(tmp_path / 'bad')


def test_save_results_missing_data_does_not_crash(tmp_path):
  """A run without float, no per-layer / per-kernel statistics, no metrics.jsonl:
  every file is still written and says what was skipped."""
  r = _one_seed()
  del r['runs']['AdamW+S2D']['accuracy']['float']
  del r['layers']
  r['kernels'] = {}
  paths = plots.save_results(r, str(tmp_path), metrics={'AdamW': {0: 'nope.jsonl'}})
  assert all(os.path.getsize(p) > 0 for p in paths) and len(paths) == 4
  assert 'AdamW+S2D (no float top-1)' in plots.fig_accuracy_drop(r).axes[0].get_title()
  assert 'no per-layer statistics' in plots.fig_layers(r).axes[0].texts[0].get_text()
  assert 'no per-kernel statistics' in plots.fig_kernels(r).axes[0].texts[0].get_text()
