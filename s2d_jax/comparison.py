"""Runs compared across seeds: mean ± std per setting, statistics before/after, tables.

The main job (`s2d_jax.main`) fine-tunes AdamW and AdamW + S2D for several seeds and
evaluates each run (report.json, `s2d_jax.report`); this module turns those reports
into its `results.json` / `results.md`: per setting the per-seed accuracies, their
mean and sample standard deviation (ddof = 1) and the difference of the means; per
layer / kernel the outlier statistics (max|act|, max/median, kurtosis, σ_max,
PCDR_1) of the start model and of each run (seed means); and the tables.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any


def mean_std(values: Sequence[float]) -> dict[str, Any]:
  """{'per_seed', 'mean', 'std'}: std is the sample std (ddof=1), 0 for one seed."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  v = np.asarray(values, np.float64)
  return dict(per_seed=[float(x) for x in v], mean=float(v.mean()),
              std=float(v.std(ddof=1)) if v.size > 1 else 0.0)


def layer_stats(rep: Mapping[str, Any]) -> tuple[dict, dict]:
  """({activation: {max_abs, max_median, kurtosis}}, {kernel: {sigma_max, pcdr1}})."""
  acts = {k: dict(max_abs=float(v['max_abs']),
                  max_median=float(v['top1_median_ratio']),
                  kurtosis=float(v['kurtosis']))
          for k, v in rep.get('layers', {}).items()}
  pcdr = rep.get('pcdr', {})
  kernels = {k: dict(sigma_max=float(w['sigma_max']),
                     pcdr1=float(pcdr[k][0]) if k in pcdr else None)
             for k, w in rep.get('weights', {}).items()}
  return acts, kernels


def _merge_seeds(per_seed: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict:
  """{name: {stat: mean_std over seeds}} of per-seed {name: {stat: value}} dicts."""
  out = {}
  for name in per_seed[0]:
    out[name] = {}
    for stat in per_seed[0][name]:
      vals = [s[name][stat] for s in per_seed if name in s]
      out[name][stat] = (mean_std(vals) if all(v is not None for v in vals)
                         else None)
  return out


def aggregate(start: Mapping[str, Any], reports: Mapping[str, Sequence[Mapping]],
              settings: Sequence[str], seeds: Sequence[int]) -> dict[str, Any]:
  """results.json's measured part from the start report and per-run per-seed reports.

  `reports[run][i]` is the report.json of `run` at `seeds[i]`. Accuracy: per setting
  top-1 mean ± std (and the drop vs float); `delta[setting]`: the difference of the
  two runs' means (second minus first run). Layers / kernels: the start model's value
  and each run's mean ± std over seeds.
  """
  runs = {}
  for run, reps in reports.items():
    acc = {s: mean_std([r['accuracy'][s] for r in reps]) for s in settings}
    drop = {s: mean_std([r['accuracy']['float'] - r['accuracy'][s] for r in reps])
            for s in settings if s != 'float'}
    stats = [layer_stats(r) for r in reps]
    runs[run] = dict(accuracy=acc, drop=drop,
                     layers=_merge_seeds([a for a, _ in stats]),
                     kernels=_merge_seeds([k for _, k in stats]))
  names = list(runs)
  delta = ({s: runs[names[1]]['accuracy'][s]['mean']
            - runs[names[0]]['accuracy'][s]['mean'] for s in settings}
           if len(names) == 2 else {})
  acts, kernels = layer_stats(start)
  layers = {k: {'start': v, **{r: runs[r]['layers'].get(k) for r in runs}}
            for k, v in acts.items()}
  kerns = {k: {'start': v, **{r: runs[r]['kernels'].get(k) for r in runs}}
           for k, v in kernels.items() if not k.startswith('head')}
  for r in runs:
    del runs[r]['layers'], runs[r]['kernels']
  return dict(settings=list(settings), seeds=list(seeds), runs=runs, delta=delta,
              layers=layers, kernels=kerns)


def headline(res: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """Per model (start, each run; seed means): largest max|act|, max/median, kurtosis
  over layers and largest σ_max over kernels, with where."""
  out = {}
  for who in ['start'] + list(res['runs']):
    row = {}
    for table, stats in (('layers', ('max_abs', 'max_median', 'kurtosis')),
                         ('kernels', ('sigma_max',))):
      for stat in stats:
        vals = {}
        for k, v in res[table].items():
          x = (v.get(who) or {}).get(stat)
          if x is not None:
            vals[k] = x if who == 'start' else x['mean']
        if vals:
          at = max(vals, key=vals.get)
          row[stat], row[f'{stat}_at'] = vals[at], at
    out[who] = row
  return out


def format_table(res: Mapping[str, Any]) -> str:
  """Markdown: setting | <run 1> mean ± std | <run 2> mean ± std | delta."""
  names = list(res['runs'])
  cols = ['setting'] + [f'{n} top-1 %' for n in names] + (
      [f'Δ ({names[1]} − {names[0]})'] if len(names) == 2 else [])
  rows = [cols]
  for s in res['settings']:
    row = [s]
    for n in names:
      a = res['runs'][n]['accuracy'][s]
      row.append(f'{100 * a["mean"]:.2f} ± {100 * a["std"]:.2f}')
    if len(names) == 2:
      row.append(f'{100 * res["delta"][s]:+.2f}')
    rows.append(row)
  widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
  out = ['| ' + ' | '.join(c.ljust(w) for c, w in zip(r, widths)) + ' |' for r in rows]
  out.insert(1, '|' + '|'.join('-' * (w + 2) for w in widths) + '|')
  return '\n'.join(out)


def format_headline(head: Mapping[str, Mapping[str, Any]]) -> str:
  lines = ['| model | max\\|act\\| | max/median | kurtosis | σ_max |', '|---|---|---|---|---|']
  for who, r in head.items():
    cells = [f'{r[s]:.1f} ({r[s + "_at"]})' if s in r else '-'
             for s in ('max_abs', 'max_median', 'kurtosis', 'sigma_max')]
    lines.append(f'| {who} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _fmt(v, stat_fmt):
  if v is None:
    return '-'
  return stat_fmt.format(v if isinstance(v, (int, float)) else v['mean'])


def format_layers(res: Mapping[str, Any]) -> str:
  """Markdown: per activation max|act|, max/median, kurtosis and per kernel σ_max,
  PCDR_1: start model -> each run (seed means), in layer order."""
  whos = ['start'] + list(res['runs'])
  out = []
  for table, stats in (('layers', (('max|act|', 'max_abs', '{:.1f}'),
                                   ('max/median', 'max_median', '{:.0f}'),
                                   ('kurtosis', 'kurtosis', '{:.0f}'))),
                       ('kernels', (('σ_max', 'sigma_max', '{:.2f}'),
                                    ('PCDR_1', 'pcdr1', '{:.2f}')))):
    head = ['activation' if table == 'layers' else 'kernel'] + [
        f'{label} ({" → ".join(whos)})' for label, _, _ in stats]
    out += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for name in sorted(res[table], key=_layer_order):
      v = res[table][name]
      cells = [' → '.join(_fmt((v.get(w) or {}).get(key), f) for w in whos)
               for _, key, f in stats]
      out.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    out.append('')
  return '\n'.join(out)


_SUB_ORDER = ('query', 'key', 'value', 'out', 'Dense_0', 'Dense_1', 'output')


def _layer_order(name: str):
  """embedding, encoder blocks in order (q, k, v, out, fc1, fc2, output), MAP, head."""
  m = re.search(r'encoderblock_(\d+)', name)
  block = (int(m.group(1)) if m else -1 if name.startswith('embedding') else
           1000 if name.startswith('head') else 999)
  sub = next((i for i, t in enumerate(_SUB_ORDER) if f'/{t}/' in name + '/'), 0)
  return block, sub, name


def results_markdown(res: Mapping[str, Any]) -> str:
  """results.md: header (run, machine, time, versions), accuracy table, headline and
  per-layer statistics."""
  v = res['versions']
  header = (
      f'Main job (size={res["size"]}, {len(res["seeds"])} seed(s) {res["seeds"]}, '
      f'{res["finetune"]["steps"]} fine-tuning steps per run), measured in '
      f'{res["wall_s"]:.0f} s wall / {res["cpu_s"]:.0f} s CPU on '
      f'{res["machine"]["cpu_count"]} CPU core(s) ({res["machine"]["backend"]}, '
      f'{res["machine"]["devices"]} device(s)); jax {v.get("jax")}, flax '
      f'{v.get("flax")}, optax {v.get("optax")}, tensorflow {v.get("tensorflow")}. '
      f'Starting model: {res["start_model"]["source"]} npz (sha256 '
      f'{res["start_model"]["sha256"][:12]}). Top-1 % on the s2d_demo_shapes test '
      'split (1024 images), mean ± sample std over seeds; Δ: difference of the means '
      '(points).')
  return (f'{header}\n\n{format_table(res)}\n\nLargest statistic over layers / '
          f'kernels (seed means; the start model\'s new head is zero):\n\n'
          f'{format_headline(res["headline"])}\n\nPer layer (float model, test split; '
          'PCDR_1 on the first 8 test images):\n\n' + format_layers(res))
