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

import contextlib
import hashlib
import importlib.metadata
import importlib.resources
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import flags

from s2d_jax import comparison
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


@contextlib.contextmanager
def compilation_cache(path: str | None):
  """JAX's persistent compilation cache in `path` for the duration (None: off).

  The 2 x seeds fine-tunes and evaluations compile the same programs (same model,
  same shapes); with the cache every program after the first is loaded instead of
  compiled (measured on the demo: evaluation of a model 128 -> 54 CPU s). Caches every
  program (JAX's default skips those compiling in < 1 s, most of the demo's). A cache
  directory the user configured (`JAX_COMPILATION_CACHE_DIR`) wins. JAX reads these
  settings at its first compilation, so this acts only when the job runs first in
  its process (as `python -m s2d_jax.main` does).
  """
  import jax  # pylint: disable=g-import-not-at-top
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  old = {n: getattr(jax.config, n) for n in names}
  if path and not old['jax_compilation_cache_dir']:
    for n, v in zip(names, (path, 0.0, 0)):
      jax.config.update(n, v)
  try:
    yield
  finally:
    for n, v in old.items():
      jax.config.update(n, v)


def run(workdir: str, size: str = 'default', pretrain: bool = False,
        pretrain_steps: int = 0, finetune_steps: int = 0, seed: int = 0,
        seeds: int = 3, ptq: str = 'RepQ-ViT', cache: bool = True,
        echo: bool = True) -> dict:
  """The whole job; returns {'results', 'table', 'paths', 'wall_s', 'cpu_s'}.

  `ptq`: the PTQ methods evaluated at W4A4 (the `demo` config's `ptq` argument:
  'RepQ-ViT', 'all', '' or a list separated by ',' or '+'); `cache`: JAX's persistent
  compilation cache in WORKDIR/jax_cache (`compilation_cache`).
  """
  if size not in SIZES:
    raise ValueError(f'--size={size!r} not in {SIZES}')
  if seeds < 1:
    raise ValueError(f'--seeds={seeds}: need at least one seed')
  ptq = ptq.replace(',', '+')
  config_utils.load_config(f'demo:size={size},ptq={ptq}')  # unknown methods fail here
  with compilation_cache(os.path.join(workdir, 'jax_cache') if cache else None):
    return _run(workdir, size, pretrain, pretrain_steps, finetune_steps, seed, seeds,
                ptq, echo)


def _run(workdir, size, pretrain, pretrain_steps, finetune_steps, seed, seeds, ptq,
         echo) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from s2d_jax import plots, report, train  # pylint: disable=g-import-not-at-top
  from s2d_jax.data import demo  # pylint: disable=g-import-not-at-top
  t0, c0 = time.time(), cpu_seconds()
  _log(f'workdir {os.path.abspath(workdir)}, {jax.device_count()} device(s), '
       f'size={size}, seeds {seed}..{seed + seeds - 1}')
  data_dir = os.path.join(workdir, 'tfds')
  dataset = config_utils.load_config(f'demo:size={size}').input.data['name']
  builder = demo.build(data_dir, dataset.split('/')[1])
  _log(f'dataset {dataset} ready in {data_dir} ({time.time() - t0:.0f}s)')
  common = f'size={size},data_dir={data_dir},dataset={dataset},ptq={ptq}'

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

  results = comparison.aggregate(start_rep, reports, settings, seed_list)
  results['headline'] = comparison.headline(results)
  wall, cpu = time.time() - t0, cpu_seconds() - c0
  results.update(
      start_model=start, train_steps=steps, size=size, wall_s=wall, cpu_s=cpu,
      ptq_methods=ptq, compilation_cache=jax.config.jax_compilation_cache_dir,
      versions=versions(),
      machine=dict(platform=platform.platform(), processor=platform.processor(),
                   cpu_count=os.cpu_count(), backend=jax.default_backend(),
                   devices=jax.device_count()),
      s2d={k: v for k, v in cfg.s2d.to_dict().items() if k != 'enabled'},
      finetune=dict(lr=cfg.lr, wd=cfg.wd, steps=int(cfg.total_steps),
                    batch=int(cfg.input.batch_size)))
  table = comparison.format_table(results)
  head = comparison.format_headline(results['headline'])
  paths = plots.save_results(
      results, os.path.join(workdir, 'plots'),
      metrics={name: {s: os.path.join(workdir, sub, f'seed{s}', 'metrics.jsonl')
                      for s in seed_list} for name, sub, _ in RUNS})
  _log('plots: ' + ', '.join(paths))
  results = report.jsonable(results)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(comparison.results_markdown(results))
  print(table, flush=True)
  print(head, flush=True)
  _log(f'done in {wall:.0f}s wall, {cpu:.0f}s CPU; results in '
       f'{os.path.join(workdir, "results.json")}, plots in '
       f'{os.path.join(workdir, "plots")}')
  return dict(results=results, table=table, paths=paths, wall_s=wall, cpu_s=cpu)


USAGE = r"""The main job: S2D end to end on the embedded demo data, offline.

  python -m s2d_jax.main [--workdir DIR] [--seeds N] [--ptq all] [--pretrain]
                         [--size default|tiny] [--finetune_steps N]

Starts from the shipped demo SigLIP model (s2d_jax/assets/demo_siglip.npz, a tiny
two-towers model with grown activation outliers; --pretrain re-creates it with config
demo_pretrain, ~14-17 CPU minutes), fine-tunes a classifier from it with AdamW and with
AdamW + S2D (config demo, 100 steps) for --seeds seeds, evaluates float, static min-max
W8A8/W6A6/W4A4, dynamic W4A4 and RepQ-ViT/W4A4 (--ptq all: also PTQ4ViT, ERQ and
GPTQ), and prints one table (mean ± std over seeds) plus per-layer outlier statistics
before and after; plots in WORKDIR/plots. Measured on 2 CPU cores with the defaults:
5 min 14 s (326 CPU s; the runs share compiled programs through JAX's persistent
compilation cache in WORKDIR/jax_cache); --ptq all adds ~4 minutes of evaluation.

Examples:
  python -m s2d_jax.main
  python -m s2d_jax.main --ptq all --workdir /tmp/s2d_main_all
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
  flags.DEFINE_string('ptq', 'RepQ-ViT', "PTQ methods evaluated at W4A4: 'all', '' "
                      "(none) or a comma-separated list of s2d_jax.ptq.METHODS.",
                      flag_values=fv)
  flags.DEFINE_bool('compilation_cache', True, 'Share compiled programs between the '
                    'runs through JAX\'s persistent cache in WORKDIR/jax_cache.',
                    flag_values=fv)
  config_utils.parse_plain_flags(fv, sys.argv[1:] if argv is None else argv,
                                 usage=USAGE, prog='s2d_jax.main')
  if fv.seeds < 1:
    raise config_utils.UsageError(f'--seeds={fv.seeds}: need at least one seed')
  try:
    return run(fv.workdir, fv.size, fv.pretrain, fv.pretrain_steps, fv.finetune_steps,
               fv.seed, fv.seeds, fv.ptq, fv.compilation_cache)
  except ValueError as e:
    if 'ptq=' in str(e):
      raise config_utils.UsageError(f'--ptq={fv.ptq!r}: {e}') from e
    raise


if __name__ == '__main__':
  config_utils.run_cli(main)
