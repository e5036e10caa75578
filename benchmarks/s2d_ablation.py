r"""Ablation of S2D's knobs on the demo model (issue 11): one knob at a time.

    python -m benchmarks.s2d_ablation [--workdir DIR] [--seeds 1] [--steps 0]
        [--variants all|adamw,base,k1,...] [--settings float,W4A4-static,RepQ-ViT/W4A4]
        [--size default|tiny]

Every run fine-tunes the `demo` config (loaded at run time with
`config_utils.load_config('demo:...')`, so it follows the shipped config) from the
shipped demo SigLIP model `s2d_jax/assets/demo_siglip.npz` (`main.asset`; at
`--size tiny`, which ships no model, from a short `demo_pretrain` run as in
`s2d_jax.main`), exactly like the main job's AdamW+S2D run, with one change:

    variant             change from the base (demo with s2d=True)
    adamw               s2d off (the AdamW reference)
    base                none (demo: K_max 3, λ 5e-4, n 2, τ 0.5, coupled)
    k1, k3              s2d.k_max      ∈ {1, 3}
    lam5e-4 ... lam2e-1 s2d.strength λ ∈ {5e-4 (paper), 5e-3, 5e-2, 2e-1}
    n1, n2, n4          s2d.power n    ∈ {1, 2, 4}
    tau0.5 ... tau0.95  s2d.tau τ      ∈ {0.5, 0.8, 0.95 (paper)}
    coupled, decoupled  s2d.decoupled  ∈ {False, True} at the base λ
    decoupled_lam1      s2d.decoupled = True and λ = 1 (two knobs; see below)

A variant whose resulting S2D settings equal the base's (k3, lam5e-4, n2, tau0.5,
coupled with the demo's values) is run once, as `base` (its aliases are listed).
PCDR refresh (every total_steps / 10 steps), learning rate, weight decay, data and
seeds are the demo's in every run.

Coupled vs decoupled (`s2d_jax.optim`, `s2d_jax.train.make_optimizer`): the trainer's
`s2d.decoupled=True` chains `s2d(decoupled=True, learning_rate=sched)` *after* AdamW,
with `sched` the trainer's own learning-rate schedule (peak `config.lr`, warmup,
cosine), so no other learning rate is needed or chosen. Each step then shrinks the
top σ_i by lr_t·λ·σ_i^n, outside Adam's preconditioner. Without the task gradient
that integrates to σ_T^(1−n) = σ_0^(1−n) + (n−1)·λ·S with S = Σ_t lr_t
(`decoupled_sigma`; S = 0.05 for the demo's 100 steps at peak lr 1e-3). At the base
λ (`decoupled`, the one-knob variant) that barely moves σ_max ≈ 11.1 (to ≈ 10.8 at
λ = 5e-2, measured 10.90; less at the demo's 5e-4): a much weaker regulariser than
the coupled form at the same λ, whose gradient is amplified by Adam's 1/√v. `decoupled_lam1` uses λ = 1, the round value at which the
decoupled term alone would take σ_max ≈ 11.1 to ≈ 7.1 over that schedule, about
where the coupled base ended in the check recorded in configs/demo.py (200 steps:
10.46 → 7.11): a comparison at a similar spectral push, chosen from the spectrum,
not from accuracy (with other --steps, S and so the push change: ablation.json
records S and the predicted σ_T of each decoupled λ).

Per variant (mean ± sample std over `--seeds` seeds, 0 .. seeds-1): top-1 per
setting and the drop vs float; σ_max of the largest kernels (the trainer's
`sigma_log_top` largest, as logged in metrics.jsonl, read from report.json's exact
spectra) and σ_max over all kernels; the largest fc2-input max/median and the
largest max|act| over layers (report.json's outlier statistics, float model, test
split); the mean number of S2D-active components (`s2d_active` over the logged
steps); wall and CPU seconds of the run (fine-tune + evaluation). A `start` row gives
the starting model's statistics (`main.start_report`). Written to
WORKDIR/ablation.json and WORKDIR/ablation.md, the table also printed.

Layout: WORKDIR/tfds (the dataset), WORKDIR/start (start model report),
WORKDIR/<variant>/seed<S>/ (one `train.train_and_evaluate` run each; `run.json` when
finished). A re-run resumes: finished runs are read back, an interrupted one resumes
from its checkpoint; a run directory written with another config (e.g. other
--steps or --settings) is refused with the differences named.
"""

from __future__ import annotations

import collections
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags

from s2d_jax import comparison
from s2d_jax import config_utils
from s2d_jax import main as main_job

# name -> config overrides (dotted keys) applied to the base (demo with s2d=True).
VARIANTS = {
    'adamw': {'s2d.enabled': False},
    'base': {},
    'k1': {'s2d.k_max': 1},
    'k3': {'s2d.k_max': 3},
    'lam5e-4': {'s2d.strength': 5e-4},
    'lam5e-3': {'s2d.strength': 5e-3},
    'lam5e-2': {'s2d.strength': 5e-2},
    'lam2e-1': {'s2d.strength': 2e-1},
    'n1': {'s2d.power': 1.0},
    'n2': {'s2d.power': 2.0},
    'n4': {'s2d.power': 4.0},
    'tau0.5': {'s2d.tau': 0.5},
    'tau0.8': {'s2d.tau': 0.8},
    'tau0.95': {'s2d.tau': 0.95},
    'coupled': {'s2d.decoupled': False},
    'decoupled': {'s2d.decoupled': True},
    'decoupled_lam1': {'s2d.decoupled': True, 's2d.strength': 1.0},
}
BASE = 'base'
# Every config key a variant changes: the base's values of these decide aliases.
KNOB_KEYS = tuple(sorted({k for o in VARIANTS.values() for k in o}))
DEFAULT_SETTINGS = ('float', 'W4A4-static', 'RepQ-ViT/W4A4')
SIZES = main_job.SIZES
RUN_FILE = 'run.json'
FC2_INPUT = re.compile(r'MlpBlock_0/Dense_1/input$')


def _log(msg):
  print(f'[ablation {time.strftime("%H:%M:%S")}] {msg}', flush=True)


# ------------------------------------------------------------------ variants --

def parse_variants(spec: str) -> list[str]:
  """Variant names of `--variants` ('all' or '' = every variant), in order given.

  Raises:
    ValueError: an unknown name (the message names it and lists the known ones).
  """
  if spec.strip() in ('', 'all'):
    return list(VARIANTS)
  names = []
  for n in (x.strip() for x in spec.split(',')):
    if not n:
      continue
    if n not in VARIANTS:
      raise ValueError(f'--variants: unknown variant {n!r}; known: '
                       f'{", ".join(VARIANTS)} (or all)')
    if n not in names:
      names.append(n)
  if not names:
    raise ValueError(f'--variants={spec!r} names no variant')
  return names


def base_values(config) -> dict[str, Any]:
  """{key: value} of the base config for every key a variant changes (KNOB_KEYS)."""
  out = {}
  for key in KNOB_KEYS:
    node = config
    for part in key.split('.'):
      node = node[part]
    out[key] = node
  return out


def _norm(v):
  """Comparable value: bools stay bools, other numbers become floats."""
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return v
  return float(v)


def variant_grid(names: Sequence[str], base: Mapping[str, Any]) -> dict[str, dict]:
  """The runs for `names`: {run name: {'overrides': {key: value}, 'aliases': [...]}}.

  `base`: the base config's value of every key in KNOB_KEYS (`base_values`). A
  variant's settings are `{**base, **VARIANTS[name]}`; variants with equal settings
  are one run, named `base` if they equal the base, else by the first of them in
  `names`; `aliases` lists every requested name of that run. `overrides` holds only
  the keys whose value differs from the base. Order: first appearance in `names`.

  Raises:
    ValueError: an unknown name; KeyError: `base` lacks a key of KNOB_KEYS.
  """
  missing = [k for k in KNOB_KEYS if k not in base]
  if missing:
    raise KeyError(f'variant_grid: base values lack {missing}')
  base_key = tuple((k, _norm(base[k])) for k in KNOB_KEYS)
  runs, by_settings = {}, {}
  for name in names:
    if name not in VARIANTS:
      raise ValueError(f'unknown variant {name!r}; known: {", ".join(VARIANTS)}')
    settings = {**base, **VARIANTS[name]}
    key = tuple((k, _norm(settings[k])) for k in KNOB_KEYS)
    if key not in by_settings:
      run = BASE if key == base_key else name
      by_settings[key] = run
      runs[run] = dict(overrides={k: v for k, v in VARIANTS[name].items()
                                  if _norm(v) != _norm(base[k])}, aliases=[])
    runs[by_settings[key]]['aliases'].append(name)
  return runs


def describe(overrides: Mapping[str, Any]) -> str:
  """'s2d.strength=0.0005, s2d.tau=0.8' ('-' for none): the change from the base."""
  return ', '.join(f'{k}={v}' for k, v in sorted(overrides.items())) or '-'


def variant_config(size: str, data_dir: str, dataset: str, init: str, steps: int,
                   overrides: Mapping[str, Any], settings: Sequence[str], seed: int):
  """The `demo` config with s2d=True (the base), `overrides` applied, `settings`."""
  cfg = config_utils.load_config(
      f'demo:size={size},data_dir={data_dir},dataset={dataset},s2d=True,'
      f'init={init},steps={steps}')
  config_utils.apply_overrides(cfg, dict(overrides))
  cfg.evaluate.settings = tuple(settings)
  cfg.seed = seed
  return cfg


def decoupled_sigma(sigma0: float, strength: float, power: float,
                    lr_sum: float) -> float:
  """σ after the decoupled S2D term alone: dσ/dt = −lr_t·λ·σ^n integrated in t.

  σ_T^(1−n) = σ_0^(1−n) + (n−1)·λ·S, S = Σ_t lr_t  (n ≠ 1);  σ_T = σ_0·e^(−λS) (n = 1).
  The continuous-time limit of the per-step shrink σ ← σ − lr_t·λ·σ^n.
  """
  if power == 1:
    return sigma0 * math.exp(-strength * lr_sum)
  return (sigma0 ** (1 - power) + (power - 1) * strength * lr_sum) ** (1 / (1 - power))


# ---------------------------------------------------------------- statistics --

def _argmax(d: Mapping[str, float]) -> dict[str, Any] | None:
  if not d:
    return None
  at = max(d, key=lambda k: (d[k], k))
  return dict(value=float(d[at]), at=at)


def tracked_kernels(metrics_record: Mapping[str, Any]) -> list[str]:
  """Kernel names (report.json's `weights` keys) whose σ_max the trainer logged."""
  pre, post = 'sigma_max/', '/kernel'
  return sorted(k[len(pre):-len(post)] if k.endswith(post) else k[len(pre):]
                for k in metrics_record if k.startswith(pre))


def outlier_stats(report: Mapping[str, Any], tracked: Sequence[str]) -> dict:
  """Headline statistics of one report.json: each {'value', 'at'} (or None).

  sigma_max: largest σ_max over `tracked` (the largest kernels); sigma_max_all: over
  every kernel but the classifier head; fc2_ratio: largest max/median over fc2
  (MlpBlock_0/Dense_1) inputs; max_abs: largest max|act| over all layers.
  """
  acts, kernels = comparison.layer_stats(report)
  sig = {k: v['sigma_max'] for k, v in kernels.items()
         if not k.startswith('head')}
  return dict(
      sigma_max=_argmax({k: sig[k] for k in tracked if k in sig}),
      sigma_max_all=_argmax(sig),
      fc2_ratio=_argmax({k: v['max_median'] for k, v in acts.items()
                         if FC2_INPUT.search(k)}),
      max_abs=_argmax({k: v['max_abs'] for k, v in acts.items()}))


def run_summary(report: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
                settings: Sequence[str]) -> dict:
  """One finished run: accuracy per setting, `outlier_stats`, S2D activity.

  `records`: the run's metrics.jsonl. s2d_active: mean of the logged `s2d_active`
  (None without S2D), s2d_active_last: its last value.
  """
  if not records:
    raise ValueError('run_summary: the run logged no metrics')
  missing = [s for s in settings if s not in report['accuracy']]
  if missing:
    raise ValueError(f'run_summary: report.json lacks settings {missing}')
  active = [float(r['s2d_active']) for r in records if 's2d_active' in r]
  return dict(
      accuracy={s: float(report['accuracy'][s]) for s in settings},
      tracked=tracked_kernels(records[-1]),
      **outlier_stats(report, tracked_kernels(records[-1])),
      s2d_active=sum(active) / len(active) if active else None,
      s2d_active_last=active[-1] if active else None)


def _mode(values: Sequence[str]) -> str:
  return collections.Counter(values).most_common(1)[0][0]


def aggregate(runs: Sequence[Mapping[str, Any]], settings: Sequence[str]) -> dict:
  """Per-seed run summaries (+ wall_s, cpu_s) -> mean ± std over seeds.

  accuracy / drop (float − setting) per setting, the statistics of `outlier_stats`
  ({'value': mean_std, 'at': most frequent location}), s2d_active, wall_s, cpu_s:
  `comparison.mean_std` (sample std, 0 for one seed).
  """
  ms = comparison.mean_std
  out = dict(
      accuracy={s: ms([r['accuracy'][s] for r in runs]) for s in settings},
      drop={s: ms([r['accuracy']['float'] - r['accuracy'][s] for r in runs])
            for s in settings if s != 'float'})
  for stat in ('sigma_max', 'sigma_max_all', 'fc2_ratio', 'max_abs'):
    vals = [r[stat] for r in runs]
    out[stat] = (None if any(v is None for v in vals) else
                 dict(value=ms([v['value'] for v in vals]),
                      at=_mode([v['at'] for v in vals])))
  for stat in ('s2d_active', 'wall_s', 'cpu_s'):
    vals = [r.get(stat) for r in runs]
    out[stat] = None if any(v is None for v in vals) else ms(vals)
  return out


# -------------------------------------------------------------------- table --

_SHORT = ((r'^Transformer/encoderblock_(\d+)/', r'b\1/'),
          (r'^Transformer/encoderblock/', 'blocks/'), (r'^MAPHead_0/', 'map/'),
          (r'MlpBlock_0/Dense_0', 'fc1'), (r'MlpBlock_0/Dense_1', 'fc2'),
          (r'MultiHeadDotProductAttention_0/', 'attn/'), (r'/input$', ''))


def short_name(name: str) -> str:
  """'Transformer/encoderblock_3/MlpBlock_0/Dense_1/input' -> 'b3/fc2', etc."""
  for pat, rep in _SHORT:
    name = re.sub(pat, rep, name)
  return name


def _pm(a: Mapping[str, Any] | None, fmt: str, spread: bool, scale: float = 1.0):
  if a is None:
    return '-'
  s = fmt.format(scale * a['mean'])
  return s + (' ± ' + fmt.format(scale * a['std']) if spread else '')


def _stat(s: Mapping[str, Any] | None, fmt: str, spread: bool) -> str:
  if s is None:
    return '-'
  v = s['value']
  if isinstance(v, Mapping):
    return f'{_pm(v, fmt, spread)} ({short_name(s["at"])})'
  return f'{fmt.format(v)} ({short_name(s["at"])})'


def format_table(results: Mapping[str, Any]) -> str:
  """Markdown: one row per run (and `start`): top-1 % per setting, drop vs float
  (points), σ_max (largest kernels), fc2-input max/median, max|act|, mean active
  S2D components, wall / CPU s per run. `± std` only with more than one seed."""
  settings = list(results['settings'])
  spread = len(results['seeds']) > 1
  cols = (['variant', 'change'] + [f'{s} %' for s in settings]
          + [f'drop {s}' for s in settings if s != 'float']
          + ['σ_max (largest kernels)', 'fc2-input max/median', r'max\|act\|',
             'active', 'wall s', 'CPU s'])
  rows = [cols]
  start = results.get('start')
  if start:
    rows.append(['start', 'start model (no fine-tune)'] + ['-'] * (2 * len(settings) - 1)
                + [_stat(start.get(k), f, False) for k, f in (
                    ('sigma_max', '{:.2f}'), ('fc2_ratio', '{:.0f}'),
                    ('max_abs', '{:.1f}'))] + ['-', '-', '-'])
  for name, r in results['runs'].items():
    aliases = [a for a in r['aliases'] if a != name]
    label = name + (f' (= {", ".join(aliases)})' if aliases else '')
    rows.append(
        [label, describe(r['overrides'])]
        + [_pm(r['accuracy'][s], '{:.2f}', spread, 100) for s in settings]
        + [_pm(r['drop'][s], '{:.2f}', spread, 100) for s in settings if s != 'float']
        + [_stat(r['sigma_max'], '{:.2f}', spread), _stat(r['fc2_ratio'], '{:.0f}', spread),
           _stat(r['max_abs'], '{:.1f}', spread), _pm(r['s2d_active'], '{:.1f}', spread),
           _pm(r['wall_s'], '{:.0f}', False), _pm(r['cpu_s'], '{:.0f}', False)])
  widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
  out = ['| ' + ' | '.join(c.ljust(w) for c, w in zip(r, widths)) + ' |' for r in rows]
  out.insert(1, '|' + '|'.join('-' * (w + 2) for w in widths) + '|')
  return '\n'.join(out)


def ablation_markdown(results: Mapping[str, Any]) -> str:
  """ablation.md: what ran (base, steps, seeds, machine, versions, time), the table,
  the decoupled-form prediction and a legend."""
  v, m = results['versions'], results['machine']
  b = results['base']
  head = (
      f'S2D ablation on the demo model (size={results["size"]}, '
      f'{results["steps"]} fine-tuning steps per run, {len(results["seeds"])} seed(s) '
      f'{results["seeds"]}): the runs took {results["runs_wall_s"]:.0f} s wall / '
      f'{results["runs_cpu_s"]:.0f} s CPU in all (this invocation '
      f'{results["wall_s"]:.0f} s wall / {results["cpu_s"]:.0f} s CPU, runs read back '
      f'from earlier ones not counted) on {m["cpu_count"]} CPU core(s) '
      f'({m["backend"]}, {m["devices"]} device(s)); jax {v.get("jax")}, flax {v.get("flax")}, optax '
      f'{v.get("optax")}, tensorflow {v.get("tensorflow")}. Start: '
      f'{results["start_model"]["source"]} npz (sha256 '
      f'{results["start_model"]["sha256"][:12]}). Base = config `demo` with s2d=True: '
      + ', '.join(f'{k}={b[k]}' for k in sorted(b)) + '. Top-1 % on the test split'
      + (', mean ± sample std over seeds' if len(results['seeds']) > 1 else
         ' (one seed: no spread, differences below ~1 point are within seed noise)')
      + '; drop = float − setting (points).')
  dec = results.get('decoupled')
  note = ''
  if dec:
    note = ('\n\nDecoupled form: S2D after AdamW with the trainer\'s schedule '
            f'(Σ_t lr_t = {dec["lr_sum"]:.4f}); the decoupled term alone would take the '
            f'start σ_max {dec["sigma0"]:.2f} to ' + ', '.join(
                f'{p["sigma_T"]:.2f} at λ={p["strength"]:g}' for p in dec['predicted'])
            + ' (`decoupled_sigma`).')
  legend = (
      '\n\nσ_max (largest kernels): largest σ_max over the trainer\'s logged kernels '
      '(the largest matrices), exact SVD of the final params; fc2-input max/median, '
      'max|act|: largest over layers (float model, test split); active: mean number '
      'of S2D-penalised components over the logged steps; wall / CPU s: fine-tune + '
      'evaluation of one run (a run read back from a previous invocation keeps its '
      'own times; with the compilation cache the first run pays most of the '
      'compilation). Names: bN = encoder block N, map = MAP head, fc1/fc2 = MLP '
      'Dense_0/Dense_1, attn = attention.')
  return f'{head}\n\n{format_table(results)}{note}{legend}\n'


# ---------------------------------------------------------------------- run --

def _finished_or_check(run_dir: str, cfg) -> dict | None:
  """The saved summary of a finished run in `run_dir` (None if not finished).

  Raises:
    config_utils.UsageError: `run_dir` holds a run of a different config.
  """
  for fname in (RUN_FILE, 'config.json'):
    path = os.path.join(run_dir, fname)
    if not os.path.exists(path):
      continue
    with open(path) as f:
      saved = json.load(f)
    then = saved['config'] if fname == RUN_FILE else saved
    changes = config_utils.config_changes(cfg, then, 'the saved run')
    if changes:
      raise config_utils.UsageError(
          f'{run_dir} holds a run of another config ({"; ".join(changes[:4])}'
          f'{"; ..." if len(changes) > 4 else ""}); use another --workdir or remove '
          'that directory')
    if fname == RUN_FILE:
      return saved
  return None


def run_variant(cfg, run_dir: str, echo: bool) -> dict:
  """Trains + evaluates one (variant, seed) in `run_dir` (or reads it back)."""
  from s2d_jax import metrics, train  # pylint: disable=g-import-not-at-top
  saved = _finished_or_check(run_dir, cfg)
  if saved is not None:
    return saved
  t0, c0 = time.time(), main_job.cpu_seconds()
  res = train.train_and_evaluate(cfg, run_dir, echo=echo)
  summary = run_summary(res['report'],
                        metrics.read_metrics(os.path.join(run_dir, 'metrics.jsonl')),
                        list(cfg.evaluate.settings))
  summary.update(wall_s=time.time() - t0, cpu_s=main_job.cpu_seconds() - c0,
                 resumed_from_step=int(res['start_step']),
                 config=config_utils.config_as_json(cfg))
  tmp = os.path.join(run_dir, RUN_FILE + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(summary, f, indent=1)
  os.replace(tmp, os.path.join(run_dir, RUN_FILE))
  return summary


def run(workdir: str, size: str = 'default', seeds: int = 1, steps: int = 0,
        variants: str = 'all', settings: Sequence[str] = DEFAULT_SETTINGS,
        pretrain_steps: int = 0, cache: bool = True, echo: bool = True) -> dict:
  """The ablation; returns {'results', 'table'} (and writes ablation.json / .md).

  `cache`: JAX's persistent compilation cache in WORKDIR/jax_cache
  (`s2d_jax.main.compilation_cache`): the runs share the evaluation's programs (and
  the training step's where the S2D options are equal), so every run after the
  first compiles less; the per-run times depend on it.
  """
  from s2d_jax import config_schema  # pylint: disable=g-import-not-at-top
  if size not in SIZES:
    raise config_utils.UsageError(f'--size={size!r} not in {SIZES}')
  if seeds < 1:
    raise config_utils.UsageError(f'--seeds={seeds}: need at least one seed')
  if steps < 0:
    raise config_utils.UsageError(f'--steps={steps}: must be >= 0 (0 = demo default)')
  settings = list(settings)
  if 'float' not in settings:
    settings.insert(0, 'float')   # drops are measured against float
  try:
    config_schema.validate_settings(settings, '--settings')
    names = parse_variants(variants)
  except ValueError as e:
    raise config_utils.UsageError(str(e)) from None
  with main_job.compilation_cache(
      os.path.join(workdir, 'jax_cache') if cache else None):
    return _run(workdir, size, seeds, steps, names, settings, pretrain_steps, echo)


def _run(workdir, size, seeds, steps, names, settings, pretrain_steps, echo) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from s2d_jax import report, train  # pylint: disable=g-import-not-at-top
  from s2d_jax.data import demo  # pylint: disable=g-import-not-at-top
  t0, c0 = time.time(), main_job.cpu_seconds()
  data_dir = os.path.join(workdir, 'tfds')
  dataset = config_utils.load_config(f'demo:size={size}').input.data['name']
  builder = demo.build(data_dir, dataset.split('/')[1])
  _log(f'workdir {os.path.abspath(workdir)}, dataset {dataset} ready '
       f'({time.time() - t0:.0f}s)')
  start = main_job.start_model(workdir, size, False, builder, data_dir, dataset,
                               pretrain_steps, 0, echo)
  mk = lambda over, seed: variant_config(size, data_dir, dataset, start['npz'], steps,
                                         over, settings, seed)
  base_cfg = mk({}, 0)
  base = base_values(base_cfg)
  grid = variant_grid(names, base)
  _log(f'starting model {start["source"]} {start["npz"]}; base {base}; '
       f'{len(grid)} run(s) x {seeds} seed(s): ' + ', '.join(grid))
  start_rep = main_job.start_report(base_cfg, start['npz'],
                                    os.path.join(workdir, 'start'))

  runs, tracked = {}, []
  for name, g in grid.items():
    per_seed = []
    for seed in range(seeds):
      cfg = mk(g['overrides'], seed)
      _log(f'{name} ({describe(g["overrides"])}) seed {seed}: {cfg.total_steps} '
           f'steps, then {", ".join(settings)} ({time.time() - t0:.0f}s)')
      r = run_variant(cfg, os.path.join(workdir, name, f'seed{seed}'), echo)
      _log(f'{name} seed {seed}: ' + ', '.join(
          f'{s} {100 * r["accuracy"][s]:.2f}' for s in settings)
           + f'; {r["wall_s"]:.0f}s wall, {r["cpu_s"]:.0f}s CPU')
      per_seed.append(r)
      tracked = tracked or r['tracked']
    runs[name] = dict(aliases=g['aliases'], overrides=g['overrides'],
                      **aggregate(per_seed, settings),
                      per_seed=[{k: v for k, v in r.items() if k != 'config'}
                                for r in per_seed])

  lr_sum = float(sum(float(s) for s in jax.device_get(jax.vmap(
      train.lr_schedule(base_cfg, int(base_cfg.total_steps)))(
          jax.numpy.arange(int(base_cfg.total_steps))))))
  start_stats = outlier_stats(start_rep, tracked)
  dec = None
  if start_stats['sigma_max'] and any(
      VARIANTS[a].get('s2d.decoupled') for g in grid.values() for a in g['aliases']):
    s0 = start_stats['sigma_max']['value']
    strengths = sorted({float({**base, **VARIANTS[a]}['s2d.strength'])
                        for g in grid.values() for a in g['aliases']
                        if VARIANTS[a].get('s2d.decoupled')})
    dec = dict(lr_sum=lr_sum, sigma0=s0, power=float(base['s2d.power']), predicted=[
        dict(strength=lam, sigma_T=decoupled_sigma(s0, lam, float(base['s2d.power']),
                                                   lr_sum)) for lam in strengths])
  wall, cpu = time.time() - t0, main_job.cpu_seconds() - c0
  results = dict(
      settings=settings, seeds=list(range(seeds)), size=size,
      steps=int(base_cfg.total_steps), base=base, start=start_stats, runs=runs,
      decoupled=dec, start_model=start, wall_s=wall, cpu_s=cpu,
      runs_wall_s=sum(r['wall_s'] for g in runs.values() for r in g['per_seed']),
      runs_cpu_s=sum(r['cpu_s'] for g in runs.values() for r in g['per_seed']),
      compilation_cache=jax.config.jax_compilation_cache_dir,
      versions=main_job.versions(),
      machine=dict(platform=platform.platform(), processor=platform.processor(),
                   cpu_count=os.cpu_count(), backend=jax.default_backend(),
                   devices=jax.device_count()),
      s2d={k: v for k, v in base_cfg.s2d.to_dict().items() if k != 'enabled'},
      finetune=dict(lr=base_cfg.lr, wd=base_cfg.wd, batch=int(base_cfg.input.batch_size)))
  results = report.jsonable(results)
  table = format_table(results)
  with open(os.path.join(workdir, 'ablation.json'), 'w') as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(workdir, 'ablation.md'), 'w') as f:
    f.write(ablation_markdown(results))
  print(table, flush=True)
  _log(f'done in {wall:.0f}s wall, {cpu:.0f}s CPU; '
       f'{os.path.join(workdir, "ablation.json")}, ablation.md')
  return dict(results=results, table=table)


USAGE = r"""Ablation of S2D's knobs (k, λ, n, τ, coupled/decoupled) on the demo model.

  python -m benchmarks.s2d_ablation [--workdir DIR] [--seeds N] [--steps N]
      [--variants all|NAME,...] [--settings float,W4A4-static,RepQ-ViT/W4A4]
      [--size default|tiny]

Fine-tunes config `demo` from the shipped demo SigLIP model once per variant and seed
(one knob changed from the base = demo with s2d=True), evaluates every setting and
writes WORKDIR/ablation.json and ablation.md (top-1 per setting, drop vs float,
σ_max, fc2-input max/median, max|act|, active S2D components, time per run).
Variants: """ + ', '.join(VARIANTS) + r""".
Variants equal to the base run once. Re-running into WORKDIR resumes (finished runs
are skipped). Each run takes ~2-4 min on 2 CPU cores at the default size.

Examples:
  python -m benchmarks.s2d_ablation --workdir /tmp/ablation
  python -m benchmarks.s2d_ablation --workdir /tmp/ablation --seeds 2 --steps 100
  python -m benchmarks.s2d_ablation --workdir /tmp/ablation --variants adamw,base,lam5e-4
  python -m benchmarks.s2d_ablation --workdir /tmp/abl_tiny --size tiny \
      --variants adamw,base --settings float,W4A4-static --steps 4
"""


def main(argv: Sequence[str] | None = None) -> dict:
  fv = flags.FlagValues()
  flags.DEFINE_string('workdir', os.path.join('.', 'workdir', 'ablation'),
                      'Where everything is written; re-running resumes.', flag_values=fv)
  flags.DEFINE_integer('seeds', 1, 'Fine-tuning seeds per variant (0 .. N-1).',
                       flag_values=fv)
  flags.DEFINE_integer('steps', 0, 'Fine-tuning steps per run (0 = the demo config '
                       'default).', flag_values=fv)
  flags.DEFINE_string('variants', 'all', 'Comma-separated variant names, or all.',
                      flag_values=fv)
  flags.DEFINE_list('settings', list(DEFAULT_SETTINGS), 'Evaluation settings (float '
                    'is added if missing).', flag_values=fv)
  flags.DEFINE_bool('compilation_cache', True, 'Share compiled programs between the '
                    'runs through JAX\'s persistent compilation cache in '
                    'WORKDIR/jax_cache.', flag_values=fv)
  flags.DEFINE_enum('size', 'default', SIZES, 'Model and data size (tiny: tests; it '
                    'has no shipped model and pre-trains one).', flag_values=fv)
  config_utils.parse_plain_flags(fv, sys.argv[1:] if argv is None else argv,
                                 usage=USAGE, prog='s2d_ablation')
  return run(fv.workdir, fv.size, fv.seeds, fv.steps, fv.variants, fv.settings,
             cache=fv.compilation_cache)


if __name__ == '__main__':
  config_utils.run_cli(main)
