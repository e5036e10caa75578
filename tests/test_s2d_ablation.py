"""benchmarks/s2d_ablation.py: the variant grid, the statistics, the table, the CLI.

No end-to-end run here: one tiny-size ablation (pre-training + 2 fine-tunes +
evaluation) costs minutes on 2 cores, far over this file's budget; the overrides
are checked on the loaded `demo` config instead.
"""

import json
import math
import os
import sys

import pytest

# benchmarks/ is a top-level folder of the checkout, not part of the installed package.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)
from benchmarks import s2d_ablation as abl  # pylint: disable=g-import-not-at-top  # noqa: E402
from s2d_jax import config_schema  # noqa: E402
from s2d_jax import config_utils  # noqa: E402

# A base for the grid tests (the demo's knobs with λ = 5e-2, the demo's value when
# the ablation was first measured), and the demo config's own (λ = 5e-4, the paper's).
DEMO_BASE = {'s2d.decoupled': False, 's2d.enabled': True, 's2d.k_max': 3,
             's2d.power': 2.0, 's2d.strength': 5e-2, 's2d.tau': 0.5}
SHIPPED_BASE = dict(DEMO_BASE, **{'s2d.strength': 5e-4})


def _cfg(overrides=None, settings=abl.DEFAULT_SETTINGS, seed=0, steps=0):
  return abl.variant_config('default', '/data', 's2d_demo_shapes/default', '/m.npz',
                            steps, overrides or {}, settings, seed)


# ------------------------------------------------------------------ variants --

def test_parse_variants_order_duplicates_and_all():
  assert abl.parse_variants('all') == list(abl.VARIANTS)
  assert abl.parse_variants('') == list(abl.VARIANTS)
  assert abl.parse_variants('n4, adamw,n4,') == ['n4', 'adamw']


def test_unknown_variant_names_it_and_lists_the_known():
  with pytest.raises(ValueError) as e:
    abl.parse_variants('adamw,lam1e-3')
  msg = str(e.value)
  assert "'lam1e-3'" in msg and 'adamw, base, k1, k3, lam5e-4' in msg
  with pytest.raises(ValueError, match="'bogus'.*known: adamw"):
    abl.variant_grid(['bogus'], DEMO_BASE)
  with pytest.raises(ValueError, match='names no variant'):
    abl.parse_variants(',,')


def test_grid_on_the_demo_base_runs_base_aliases_once():
  grid = abl.variant_grid(abl.parse_variants('all'), DEMO_BASE)
  assert grid == {
      'adamw': dict(overrides={'s2d.enabled': False}, aliases=['adamw']),
      'base': dict(overrides={}, aliases=['base', 'k3', 'lam5e-2', 'n2', 'tau0.5',
                                          'coupled']),
      'k1': dict(overrides={'s2d.k_max': 1}, aliases=['k1']),
      'lam5e-4': dict(overrides={'s2d.strength': 5e-4}, aliases=['lam5e-4']),
      'lam5e-3': dict(overrides={'s2d.strength': 5e-3}, aliases=['lam5e-3']),
      'lam2e-1': dict(overrides={'s2d.strength': 2e-1}, aliases=['lam2e-1']),
      'n1': dict(overrides={'s2d.power': 1.0}, aliases=['n1']),
      'n4': dict(overrides={'s2d.power': 4.0}, aliases=['n4']),
      'tau0.8': dict(overrides={'s2d.tau': 0.8}, aliases=['tau0.8']),
      'tau0.95': dict(overrides={'s2d.tau': 0.95}, aliases=['tau0.95']),
      'decoupled': dict(overrides={'s2d.decoupled': True}, aliases=['decoupled']),
      'decoupled_lam1': dict(overrides={'s2d.decoupled': True, 's2d.strength': 1.0},
                             aliases=['decoupled_lam1']),
  }
  assert list(grid)[:3] == ['adamw', 'base', 'k1']


def test_grid_follows_a_changed_base():
  """Aliases are decided by value: with base λ = 5e-3, lam5e-3 is the base and
  lam5e-2 a variant; an int k_max equals a float one; a lone alias runs as base."""
  base = dict(DEMO_BASE, **{'s2d.strength': 5e-3, 's2d.k_max': 3.0})
  grid = abl.variant_grid(['lam5e-2', 'lam5e-3', 'k3'], base)
  assert grid == {'lam5e-2': dict(overrides={'s2d.strength': 5e-2}, aliases=['lam5e-2']),
                  'base': dict(overrides={}, aliases=['lam5e-3', 'k3'])}
  # decoupled_lam1 keeps only the key that differs when the base is decoupled
  dec = dict(DEMO_BASE, **{'s2d.decoupled': True})
  assert abl.variant_grid(['decoupled_lam1', 'coupled'], dec) == {
      'decoupled_lam1': dict(overrides={'s2d.strength': 1.0}, aliases=['decoupled_lam1']),
      'coupled': dict(overrides={'s2d.decoupled': False}, aliases=['coupled'])}
  with pytest.raises(KeyError, match='s2d.tau'):
    abl.variant_grid(['base'], {k: v for k, v in DEMO_BASE.items() if k != 's2d.tau'})


def test_overrides_land_on_the_loaded_demo_config():
  base_cfg = _cfg()
  assert abl.base_values(base_cfg) == SHIPPED_BASE   # configs/demo.py with s2d=True
  grid = abl.variant_grid(abl.parse_variants('all'), abl.base_values(base_cfg))
  for name, g in grid.items():
    cfg = _cfg(g['overrides'], settings=('float', 'W4A4-static'), seed=2)
    config_schema.validate(cfg)
    got = abl.base_values(cfg)
    for key in abl.KNOB_KEYS:
      want = g['overrides'].get(key, SHIPPED_BASE[key])
      assert got[key] == want, (name, key)
    assert tuple(cfg.evaluate.settings) == ('float', 'W4A4-static') and cfg.seed == 2
    # the rest is the demo's: steps, refresh, lr, data, start model
    assert cfg.total_steps == base_cfg.total_steps and cfg.lr == base_cfg.lr
    assert cfg.s2d.refresh_every == base_cfg.s2d.refresh_every
    assert cfg.model_init == '/m.npz' and cfg.input.data_dir == '/data'
  assert _cfg(steps=7).total_steps == 7


def test_decoupled_sigma_matches_small_step_integration():
  """Closed form vs σ ← σ − lr·λ·σ^n with 20000 tiny steps of equal lr."""
  for n, lam in ((2.0, 0.5), (4.0, 1e-3), (1.0, 3.0)):
    s, lr_sum, steps = 11.0, 0.1, 20000
    for _ in range(steps):
      s -= (lr_sum / steps) * lam * s ** n
    assert abl.decoupled_sigma(11.0, lam, n, lr_sum) == pytest.approx(s, rel=1e-3)
  assert abl.decoupled_sigma(11.05, 0.5, 2.0, 0.1) == pytest.approx(
      1 / (1 / 11.05 + 0.05))
  assert abl.decoupled_sigma(2.0, 0.7, 1.0, 0.5) == pytest.approx(2 * math.exp(-0.35))


# --------------------------------------------------------- statistics, table --

B3_FC2 = 'Transformer/encoderblock_3/MlpBlock_0/Dense_1/input'
MAP_FC2 = 'MAPHead_0/MlpBlock_0/Dense_1/input'
B3_OUT = 'Transformer/encoderblock_3/output'
MAP_FC1 = 'MAPHead_0/MlpBlock_0/Dense_0'
BLK_FC1 = 'Transformer/encoderblock/MlpBlock_0/Dense_0'
QUERY = 'Transformer/encoderblock/MultiHeadDotProductAttention_0/query'


def _report(acc, fc2=(100.0, 150.0), out_abs=130.0, sig=(11.0, 9.0, 12.0)):
  lay = lambda a, r: dict(max_abs=a, top1_median_ratio=r, kurtosis=3.0)
  return dict(
      accuracy=acc,
      layers={B3_FC2: lay(10.0, fc2[0]), MAP_FC2: lay(9.0, fc2[1]),
              B3_OUT: lay(out_abs, 500.0)},   # not an fc2 input: not in fc2_ratio
      weights={MAP_FC1: dict(sigma_max=sig[0]), BLK_FC1: dict(sigma_max=sig[1]),
               QUERY: dict(sigma_max=sig[2]), 'head': dict(sigma_max=99.0)},
      pcdr={})


def _records(active):
  rec = lambda a: {'step': 1, 'sigma_max': 1.0, f'sigma_max/{MAP_FC1}/kernel': 1.0,
                   f'sigma_max/{BLK_FC1}/kernel': 1.0,
                   **({} if a is None else {'s2d_active': a})}
  return [rec(a) for a in active]


def test_run_summary_reads_report_and_metrics():
  s = abl.run_summary(_report({'float': 0.9, 'W4A4-static': 0.8, 'W8A8': 0.85}),
                      _records([10, 20, 33]), ['float', 'W4A4-static'])
  assert s['accuracy'] == {'float': 0.9, 'W4A4-static': 0.8}
  assert s['tracked'] == sorted([MAP_FC1, BLK_FC1])
  # σ_max over the logged (largest) kernels only; all kernels but the head
  assert s['sigma_max'] == dict(value=11.0, at=MAP_FC1)
  assert s['sigma_max_all'] == dict(value=12.0, at=QUERY)
  assert s['fc2_ratio'] == dict(value=150.0, at=MAP_FC2)
  assert s['max_abs'] == dict(value=130.0, at=B3_OUT)
  assert s['s2d_active'] == pytest.approx(21.0) and s['s2d_active_last'] == 33
  adamw = abl.run_summary(_report({'float': 0.9}), _records([None, None]), ['float'])
  assert adamw['s2d_active'] is None and adamw['s2d_active_last'] is None
  with pytest.raises(ValueError, match='RepQ-ViT/W4A4'):
    abl.run_summary(_report({'float': 0.9}), _records([1]), ['float', 'RepQ-ViT/W4A4'])


def _results(seeds):
  settings = ['float', 'W4A4-static']
  acc = lambda f, q: {'float': f, 'W4A4-static': q}
  per = {'adamw': [(_report(acc(0.93, 0.87), fc2=(100.0, 200.0)), [None]),
                   (_report(acc(0.91, 0.87), fc2=(100.0, 220.0)), [None])],
         'base': [(_report(acc(0.92, 0.90), sig=(7.0, 6.0, 8.0)), [30, 40]),
                  (_report(acc(0.90, 0.90), sig=(8.0, 9.0, 8.0)), [50, 60])]}
  runs = {}
  for name, reps in per.items():
    summaries = [dict(abl.run_summary(r, _records(a), settings), wall_s=100.0 + i,
                      cpu_s=150.0 + i) for i, (r, a) in enumerate(reps[:seeds])]
    runs[name] = dict(aliases=[name] + (['k3', 'n2'] if name == 'base' else []),
                      overrides={'s2d.enabled': False} if name == 'adamw' else {},
                      **abl.aggregate(summaries, settings))
  start = abl.outlier_stats(_report({}, sig=(11.05, 9.0, 12.0)), [MAP_FC1, BLK_FC1])
  return dict(settings=settings, seeds=list(range(seeds)), start=start, runs=runs)


def test_aggregate_means_stds_drops():
  r = _results(2)['runs']
  a = r['adamw']
  assert a['accuracy']['float']['per_seed'] == [0.93, 0.91]
  assert a['accuracy']['float']['mean'] == pytest.approx(0.92)
  assert a['accuracy']['float']['std'] == pytest.approx(math.sqrt(2e-4))
  assert a['drop']['W4A4-static']['per_seed'] == pytest.approx([0.06, 0.04])
  assert 'float' not in a['drop'] and a['s2d_active'] is None
  assert a['fc2_ratio'] == dict(value=dict(per_seed=[200.0, 220.0], mean=210.0,
                                           std=pytest.approx(math.sqrt(200.0))),
                                at=MAP_FC2)
  b = r['base']
  assert b['s2d_active']['per_seed'] == [35.0, 55.0]
  # σ_max: seed 0 at MAP fc1 (7.0), seed 1 at the blocks' fc1 (9.0); tie -> first
  assert b['sigma_max']['value']['per_seed'] == [7.0, 9.0]
  assert b['sigma_max']['at'] == MAP_FC1
  assert b['wall_s']['mean'] == pytest.approx(100.5)


def test_format_table_one_seed_has_no_spread():
  table = abl.format_table(_results(1))
  lines = table.splitlines()
  cells = lambda line: [c.strip() for c in line.split(' | ')]
  assert cells(lines[0][1:-1]) == [
      'variant', 'change', 'float %', 'W4A4-static %', 'drop W4A4-static',
      'σ_max (largest kernels)', 'fc2-input max/median', r'max\|act\|', 'active',
      'wall s', 'CPU s']
  assert set(lines[1]) == {'|', '-'} and lines[1].count('|') == 12
  cells = lambda line: [c.strip() for c in line.split('|')[1:-1]]
  assert cells(lines[2]) == ['start', 'start model (no fine-tune)', '-', '-', '-',
                             '11.05 (map/fc1)', '150 (map/fc2)', '130.0 (b3/output)',
                             '-', '-', '-']
  assert cells(lines[3]) == ['adamw', 's2d.enabled=False', '93.00', '87.00', '6.00',
                             '11.00 (map/fc1)', '200 (map/fc2)', '130.0 (b3/output)',
                             '-', '100', '150']
  assert cells(lines[4]) == ['base (= k3, n2)', '-', '92.00', '90.00', '2.00',
                             '7.00 (map/fc1)', '150 (map/fc2)', '130.0 (b3/output)',
                             '35.0', '100', '150']
  assert '±' not in table and len(lines) == 5
  assert len({len(line) for line in lines}) == 1   # aligned columns


def test_format_table_with_seeds_shows_mean_and_std():
  cells = [c.strip() for c in abl.format_table(_results(2)).splitlines()[3].split('|')]
  assert cells[3:6] == ['92.00 ± 1.41', '87.00 ± 0.00', '5.00 ± 1.41']
  assert cells[7] == '210 ± 14 (map/fc2)' and cells[10:12] == ['100', '150']


def test_short_names():
  assert abl.short_name(B3_FC2) == 'b3/fc2'
  assert abl.short_name(BLK_FC1) == 'blocks/fc1'
  assert abl.short_name(QUERY) == 'blocks/attn/query'
  assert abl.short_name('MAPHead_0/MultiHeadDotProductAttention_0/out/input') == \
      'map/attn/out'
  assert abl.short_name('embedding/input') == 'embedding'


def test_ablation_markdown_header_and_decoupled_note():
  res = dict(_results(1), size='default', steps=200, wall_s=61.0, cpu_s=99.0,
             runs_wall_s=500.0, runs_cpu_s=400.0,
             base=DEMO_BASE, start_model=dict(source='shipped', sha256='ab' * 32),
             versions=dict(jax='1', flax='2', optax='3', tensorflow='4'),
             machine=dict(cpu_count=2, backend='cpu', devices=1),
             decoupled=dict(lr_sum=0.1, sigma0=11.05, power=2.0, predicted=[
                 dict(strength=0.05, sigma_T=10.47), dict(strength=0.5, sigma_T=7.12)]))
  md = abl.ablation_markdown(res)
  assert md.startswith('S2D ablation on the demo model (size=default, 200 fine-tuning '
                       'steps per run, 1 seed(s) [0]): the runs took 500 s wall / 400 s '
                       'CPU in all (this invocation 61 s wall / 99 s CPU, runs read back '
                       'from earlier ones not counted) on 2 CPU core(s)')
  assert 'one seed: no spread' in md and 's2d.strength=0.05' in md
  assert abl.format_table(res) in md
  assert ('start σ_max 11.05 to 10.47 at λ=0.05, 7.12 at λ=0.5') in md


# --------------------------------------------------------------- resume, CLI --

def test_finished_runs_are_read_back_and_other_configs_refused(tmp_path):
  run_dir = str(tmp_path / 'base' / 'seed0')
  os.makedirs(run_dir)
  cfg = _cfg()
  assert abl._finished_or_check(run_dir, cfg) is None
  # an interrupted run: the trainer's config.json of the same config is accepted
  with open(os.path.join(run_dir, 'config.json'), 'w') as f:
    f.write(cfg.to_json_best_effort(indent=2))
  assert abl._finished_or_check(run_dir, cfg) is None
  with pytest.raises(config_utils.UsageError,
                     match=f'total_steps is 7 now, {cfg.total_steps} in the saved run'):
    abl._finished_or_check(run_dir, _cfg(steps=7))
  saved = dict(accuracy={'float': 0.5}, config=config_utils.config_as_json(cfg))
  with open(os.path.join(run_dir, abl.RUN_FILE), 'w') as f:
    json.dump(saved, f)
  assert abl._finished_or_check(run_dir, cfg) == saved
  with pytest.raises(config_utils.UsageError, match="evaluate.settings.*another --workdir"):
    abl._finished_or_check(run_dir, _cfg(settings=('float',)))


def test_help_exits_zero_and_lists_variants(capsys):
  with pytest.raises(SystemExit) as e:
    abl.main(['--help'])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert 'Examples:' in out and '--variants' in out and 'decoupled_lam1' in out


@pytest.mark.parametrize('argv, match', [
    (['--variants', 'adamw,foo'], "unknown variant 'foo'"),
    (['--settings', 'float,W3A9-bogus'], '--settings'),
    (['--seeds', '0'], '--seeds=0'),
    (['--size', 'huge'], 'size'),
])
def test_bad_flags_fail_before_any_work(tmp_path, argv, match):
  wd = str(tmp_path / 'w')
  with pytest.raises(config_utils.UsageError, match=match):
    abl.main(['--workdir', wd] + argv)
  assert not os.path.exists(wd)
