r"""The main job: fine-tune a model with outliers with AdamW and AdamW+S2D, quantize, compare.

    python -m s2d_jax.main [--workdir ./workdir/main] [--seeds 3] [--pretrain]
                           [--size default|tiny] [--finetune_steps N] [--seed S]

Offline, on CPU, from any directory. Under WORKDIR:

1. `tfds/`: the embedded demo dataset `s2d_demo_shapes` (`s2d_jax.data.demo`).
2. The starting model, as a user starts from a released SigLIP checkpoint: the shipped
   big_vision npz `s2d_jax/assets/demo_siglip.npz` (a tiny SigLIP two-towers model
   whose training grew activation outliers; see `s2d_jax/assets/README.md`), or with
   `--pretrain` (and always at `--size tiny`, which has no shipped model) a fresh
   pre-training with config `demo_pretrain` in `pretrain/` (+ `captions.model`).
   `start/report.json`: its image tower's outlier statistics on the test split.
3. `adamw/seed<S>/`, `s2d/seed<S>/` for each of `--seeds` seeds: the shipped config
   `demo` (image tower + new zero-init head) fine-tuned from that npz with AdamW and
   with AdamW + S2D, then evaluated (float, static min-max W8A8 / W6A6 / W4A4, dynamic
   W4A4 and the paper's PTQ methods: `train.train_and_evaluate`, report.json + plots).
4. `results.json`, `results.md`, `plots/`: per setting the top-1 mean ± std over seeds
   of both runs and their difference, per layer max|act|, max/median, kurtosis and
   per kernel σ_max, PCDR_1 before and after fine-tuning, versions, machine, time.

Every number is measured in this run; nothing is hard-coded. A second run into the
same WORKDIR reuses the dataset and resumes every stage.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import json
import os
import platform
import re
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags

from s2d_jax import config_utils

SIZES = ('default', 'tiny')
RUNS = (('AdamW', 'adamw', False), ('AdamW+S2D', 's2d', True))
# The shipped starting model (size 'default') and its caption SentencePiece model.
ASSET_NPZ, ASSET_SPM = 'demo_siglip.npz', 'demo_captions.model'
# Reported versions: name -> distributions that provide it (first installed wins).
VERSIONS = {'jax': ('jax',), 'jaxlib': ('jaxlib',), 'flax': ('flax',),
            'optax': ('optax',), 'orbax-checkpoint': ('orbax-checkpoint',),
            'tensorflow': ('tensorflow', 'tensorflow-cpu', 'tf-nightly'),
            'tensorflow-datasets': ('tensorflow-datasets',), 'numpy': ('numpy',)}


def _log(msg):
  print(f'[main {time.strftime("%H:%M:%S")}] {msg}', flush=True)


def asset(name: str) -> str:
  """Path of a file shipped in `s2d_jax/assets`."""
  return str(importlib.resources.files('s2d_jax').joinpath('assets', name))


def sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def cpu_seconds() -> float:
  """User + system CPU time of this process and its waited-for children."""
  s, c = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                          resource.RUSAGE_CHILDREN))
  return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def versions() -> dict[str, str | None]:
  """{package: installed version or None}, plus python."""
  out = {'python': platform.python_version()}
  for name, dists in VERSIONS.items():
    out[name] = None
    for dist in dists:
      try:
        out[name] = importlib.metadata.version(dist)
        break
      except importlib.metadata.PackageNotFoundError:
        continue
  return out


# ------------------------------------------------------------- aggregation --

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


# --------------------------------------------------------------------- job --

def start_model(workdir: str, size: str, pretrain: bool, builder, data_dir: str,
                dataset: str, pretrain_steps: int = 0, seed: int = 0,
                echo: bool = True) -> dict[str, Any]:
  """The npz the fine-tunes start from: {'npz', 'spm', 'source', 'sha256', ...}."""
  from s2d_jax import train  # pylint: disable=g-import-not-at-top
  from s2d_jax.data import demo  # pylint: disable=g-import-not-at-top
  shipped = asset(ASSET_NPZ) if size == 'default' else None
  if shipped and not pretrain:
    return dict(npz=shipped, spm=asset(ASSET_SPM), source='shipped',
                sha256=sha256(shipped))
  spm = demo.caption_tokenizer(builder, os.path.join(workdir, 'captions'))
  pcfg = config_utils.load_config(
      f'demo_pretrain:size={size},data_dir={data_dir},dataset={dataset},spm={spm},'
      f'steps={pretrain_steps}')
  pcfg.seed = seed
  _log(f'pre-training a two-towers SigLIP model for {pcfg.total_steps} steps '
       '(config demo_pretrain)')
  c0 = cpu_seconds()
  npz = train.train_and_evaluate(pcfg, os.path.join(workdir, 'pretrain'),
                                 echo=echo)['npz']
  out = dict(npz=npz, spm=spm, source='pretrained', sha256=sha256(npz),
             pretrain_steps=int(pcfg.total_steps), pretrain_cpu_s=cpu_seconds() - c0)
  if shipped:
    out['shipped_sha256'] = sha256(shipped)
    out['matches_shipped'] = out['sha256'] == out['shipped_sha256']
    _log(f'pre-trained npz {"==" if out["matches_shipped"] else "!="} the shipped '
         f'{ASSET_NPZ} (sha256 {out["sha256"][:12]} vs {out["shipped_sha256"][:12]})')
  return out


def start_report(cfg, npz: str, workdir: str) -> dict[str, Any]:
  """Outlier statistics of the starting image tower (the `demo` config's evaluation
  data, float only; its new head is zero, so its accuracy is meaningless)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from s2d_jax import evaluate, report  # pylint: disable=g-import-not-at-top
  from s2d_jax.models import siglip  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, report.REPORT)
  if os.path.exists(path):
    return report.read_report(path)
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.evaluate.settings = ('float',)
  _, params = siglip.load_classifier(npz, int(cfg.num_classes), **dict(cfg.model))
  return evaluate.evaluate(cfg, workdir, params=params, progress=False)


def run(workdir: str, size: str = 'default', pretrain: bool = False,
        pretrain_steps: int = 0, finetune_steps: int = 0, seed: int = 0,
        seeds: int = 3, echo: bool = True) -> dict:
  """The whole job; returns {'results', 'table', 'paths', 'wall_s', 'cpu_s'}."""
  import jax  # pylint: disable=g-import-not-at-top
  from s2d_jax import plots, report, train  # pylint: disable=g-import-not-at-top
  from s2d_jax.data import demo  # pylint: disable=g-import-not-at-top
  if size not in SIZES:
    raise ValueError(f'--size={size!r} not in {SIZES}')
  if seeds < 1:
    raise ValueError(f'--seeds={seeds}: need at least one seed')
  t0, c0 = time.time(), cpu_seconds()
  _log(f'workdir {os.path.abspath(workdir)}, {jax.device_count()} device(s), '
       f'size={size}, seeds {seed}..{seed + seeds - 1}')
  data_dir = os.path.join(workdir, 'tfds')
  dataset = config_utils.load_config(f'demo:size={size}').input.data['name']
  builder = demo.build(data_dir, dataset.split('/')[1])
  _log(f'dataset {dataset} ready in {data_dir} ({time.time() - t0:.0f}s)')
  common = f'size={size},data_dir={data_dir},dataset={dataset}'

  start = start_model(workdir, size, pretrain, builder, data_dir, dataset,
                      pretrain_steps, seed, echo)
  _log(f'starting model: {start["source"]} {start["npz"]} '
       f'(sha256 {start["sha256"][:12]}, {time.time() - t0:.0f}s)')
  cfg = config_utils.load_config(f'demo:{common},init={start["npz"]},'
                                 f'steps={finetune_steps}')
  start_rep = start_report(cfg, start['npz'], os.path.join(workdir, 'start'))

  seed_list = list(range(seed, seed + seeds))
  reports = {name: [] for name, _, _ in RUNS}
  steps = {}
  for s in seed_list:
    for name, sub, s2d in RUNS:
      cfg = config_utils.load_config(
          f'demo:{common},s2d={s2d},init={start["npz"]},steps={finetune_steps}')
      cfg.seed = s
      _log(f'seed {s}: fine-tuning {name} for {cfg.total_steps} steps, then '
           f'evaluating {", ".join(cfg.evaluate.settings)} ({time.time() - t0:.0f}s)')
      res = train.train_and_evaluate(cfg, os.path.join(workdir, sub, f'seed{s}'),
                                     echo=echo)
      reports[name].append(res['report'])
      steps[name] = int(res['total_steps'])
  settings = tuple(cfg.evaluate.settings)

  results = aggregate(start_rep, reports, settings, seed_list)
  results['headline'] = headline(results)
  wall, cpu = time.time() - t0, cpu_seconds() - c0
  results.update(
      start_model=start, train_steps=steps, size=size, wall_s=wall, cpu_s=cpu,
      versions=versions(),
      machine=dict(platform=platform.platform(), processor=platform.processor(),
                   cpu_count=os.cpu_count(), backend=jax.default_backend(),
                   devices=jax.device_count()),
      s2d={k: v for k, v in cfg.s2d.to_dict().items() if k != 'enabled'},
      finetune=dict(lr=cfg.lr, wd=cfg.wd, steps=int(cfg.total_steps),
                    batch=int(cfg.input.batch_size)))
  table = format_table(results)
  head = format_headline(results['headline'])
  paths = plots.save_comparison(
      {n: r[0] for n, r in reports.items()},
      {n: {s: a['mean'] for s, a in results['runs'][n]['accuracy'].items()}
       for n in results['runs']}, settings, os.path.join(workdir, 'plots'))
  results = report.jsonable(results)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(results_markdown(results))
  print(table, flush=True)
  print(head, flush=True)
  _log(f'done in {wall:.0f}s wall, {cpu:.0f}s CPU; results in '
       f'{os.path.join(workdir, "results.json")}, plots in '
       f'{os.path.join(workdir, "plots")}')
  return dict(results=results, table=table, paths=paths, wall_s=wall, cpu_s=cpu)


USAGE = r"""The main job: S2D end to end on the embedded demo data, offline.

  python -m s2d_jax.main [--workdir DIR] [--seeds N] [--pretrain] [--size default|tiny]

Starts from the shipped demo SigLIP model (s2d_jax/assets/demo_siglip.npz, a tiny
two-towers model with grown activation outliers; --pretrain re-creates it with config
demo_pretrain, ~14-17 CPU minutes), fine-tunes a classifier from it with AdamW and with
AdamW + S2D (config demo) for --seeds seeds, evaluates float, static min-max
W8A8/W6A6/W4A4, dynamic W4A4 and the paper's PTQ methods, and prints one table
(mean ± std over seeds) plus per-layer outlier statistics before and after.
Measured at the default size on 2 CPU cores: 1322 CPU s, 30 min wall with 3 seeds
(~5 min per fine-tune + evaluation, of which ~2 min are the PTQ methods); --seeds 1
takes a third of that.

Examples:
  python -m s2d_jax.main
  python -m s2d_jax.main --seeds 1 --workdir /tmp/s2d_main
  python -m s2d_jax.main --pretrain --workdir /tmp/s2d_main_pretrain
  python -m s2d_jax.main --workdir /tmp/s2d_tiny --size tiny
"""


def main(argv: Sequence[str] | None = None) -> dict:
  fv = flags.FlagValues()
  flags.DEFINE_string('workdir', os.path.join('.', 'workdir', 'main'),
                      'Where everything is written; re-running resumes.', flag_values=fv)
  flags.DEFINE_enum('size', 'default', SIZES, 'Model and data size (tiny: tests; it '
                    'has no shipped model and always pre-trains).', flag_values=fv)
  flags.DEFINE_bool('pretrain', False, 'Re-create the starting model with config '
                    'demo_pretrain instead of using the shipped npz.', flag_values=fv)
  flags.DEFINE_integer('pretrain_steps', 0, 'Pre-training steps (0 = the config '
                       'default).', flag_values=fv)
  flags.DEFINE_integer('finetune_steps', 0, 'Fine-tuning steps per run (0 = the '
                       'config default).', flag_values=fv)
  flags.DEFINE_integer('seeds', 3, 'Number of fine-tuning seeds (seed, seed+1, ...).',
                       flag_values=fv)
  flags.DEFINE_integer('seed', 0, 'First seed (fine-tuning init, data order; also '
                       'the pre-training seed).', flag_values=fv)
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a in config_utils.HELP_FLAGS for a in argv):
    print(USAGE.strip() + '\n\nflags:\n' + fv.get_help(include_special_flags=False))
    raise SystemExit(0)
  try:
    fv(['s2d_jax.main'] + argv)
  except flags.Error as e:
    raise config_utils.UsageError(f'{e} (run with --help for the flags)') from e
  if fv.seeds < 1:
    raise config_utils.UsageError(f'--seeds={fv.seeds}: need at least one seed')
  return run(fv.workdir, fv.size, fv.pretrain, fv.pretrain_steps, fv.finetune_steps,
             fv.seed, fv.seeds)


if __name__ == '__main__':
  config_utils.run_cli(main)
