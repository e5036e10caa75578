r"""The main job: pre-train, export, fine-tune with AdamW and AdamW+S2D, quantize, compare.

    python -m s2d_jax.main [--workdir ./workdir/main] [--size default|tiny]
                           [--pretrain_steps N] [--finetune_steps N] [--seed S]

Offline, on CPU, in a few minutes, from any directory. Under WORKDIR:

1. `tfds/`, `captions.model`: the embedded demo dataset `s2d_demo_shapes` and a
   SentencePiece word model of its training captions (`s2d_jax.data.demo`).
2. `pretrain/`: the shipped config `demo_pretrain` (a tiny SigLIP-style two-towers
   model, sigmoid loss, high learning rate, no weight decay), exported as a big_vision
   npz (`pretrain/params.npz`).
3. `adamw/`, `s2d/`: the shipped config `demo` (image tower + new zero-init head, the
   paper's ImageNet setup at toy scale) fine-tuned from that npz with AdamW and with
   AdamW + S2D, each evaluated (`train.train_and_evaluate`: report.json + plots).
4. `results.md`, `results.json`, `plots/`: one table of both runs (`s2d_jax.report`).

Every number in the table is measured in this run; nothing is hard-coded. A second
run into the same WORKDIR reuses the dataset and resumes every stage.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Sequence

from absl import flags

from s2d_jax import config_utils

SIZES = ('default', 'tiny')
RUNS = (('AdamW', 'adamw', False), ('AdamW+S2D', 's2d', True))


def _log(msg):
  print(f'[main {time.strftime("%H:%M:%S")}] {msg}', flush=True)


def run(workdir: str, size: str = 'default', pretrain_steps: int = 0,
        finetune_steps: int = 0, seed: int = 0, echo: bool = True) -> dict:
  """The whole job; returns {'rows', 'table', 'paths', 'wall_s'}."""
  import jax  # pylint: disable=g-import-not-at-top
  from s2d_jax import report, train  # pylint: disable=g-import-not-at-top
  from s2d_jax.data import demo  # pylint: disable=g-import-not-at-top
  if size not in SIZES:
    raise ValueError(f'--size={size!r} not in {SIZES}')
  t0 = time.time()
  _log(f'workdir {os.path.abspath(workdir)}, {jax.device_count()} device(s), '
       f'size={size}')
  data_dir = os.path.join(workdir, 'tfds')
  ft = config_utils.load_config(f'demo:size={size}')
  dataset = ft.input.data['name']
  builder = demo.build(data_dir, dataset.split('/')[1])
  spm = demo.caption_tokenizer(builder, os.path.join(workdir, 'captions'))
  _log(f'dataset {dataset} ready in {data_dir} ({time.time() - t0:.0f}s)')

  common = f'size={size},data_dir={data_dir},dataset={dataset}'
  pcfg = config_utils.load_config(
      f'demo_pretrain:{common},spm={spm},steps={pretrain_steps}')
  pcfg.seed = seed
  _log(f'pre-training a two-towers SigLIP model for {pcfg.total_steps} steps')
  npz = train.train_and_evaluate(pcfg, os.path.join(workdir, 'pretrain'),
                                 echo=echo)['npz']
  _log(f'pre-trained model saved as big_vision npz {npz} ({time.time() - t0:.0f}s)')

  reports, steps = {}, {}
  for name, sub, s2d in RUNS:
    cfg = config_utils.load_config(
        f'demo:{common},s2d={s2d},init={npz},steps={finetune_steps}')
    cfg.seed = seed
    _log(f'fine-tuning {name} for {cfg.total_steps} steps, then evaluating '
         f'{", ".join(cfg.evaluate.settings)}')
    res = train.train_and_evaluate(cfg, os.path.join(workdir, sub), echo=echo)
    reports[name], steps[name] = res['report'], res['total_steps']
  settings = tuple(cfg.evaluate.settings)

  wall = time.time() - t0
  out = report.write_results(
      workdir, reports, settings,
      header=(f'Main job (size={size}, seed={seed}), measured in {wall:.0f} s on '
              f'{jax.device_count()} {jax.default_backend()} device(s).\n'
              'Accuracy: top-1 % on the s2d_demo_shapes test split; max|act|, '
              'kurtosis: largest over layers (float model); σ_max: largest over '
              'kernels.'),
      extra={'wall_s': wall, 'size': size, 'seed': seed,
             'devices': jax.device_count()},
      row_extra={name: {'train_steps': int(n)} for name, n in steps.items()})
  print(out['table'], flush=True)
  for name, r in out['rows'].items():
    print(f'{name}: largest activation at {r.get("max_abs_act_layer")}, '
          f'largest σ at {r.get("sigma_max_layer")}', flush=True)
  _log(f'done in {wall:.0f}s; table in {os.path.join(workdir, "results.md")}, plots '
       f'in {os.path.join(workdir, "plots")}')
  return {**out, 'wall_s': wall}


USAGE = r"""The main job: S2D end to end on the embedded demo data, offline.

  python -m s2d_jax.main [--workdir DIR] [--size default|tiny] [--seed S]

Pre-trains a tiny SigLIP-style model (config demo_pretrain), exports it as a
big_vision npz, fine-tunes a classifier from it with AdamW and with AdamW + S2D
(config demo), evaluates both (float, W8A8, W6A6, W4A4) and prints one table.
About 4-5 minutes on 2 CPU cores at the default size.

Examples:
  python -m s2d_jax.main
  python -m s2d_jax.main --workdir /tmp/s2d_main --size tiny
"""


def main(argv: Sequence[str] | None = None) -> dict:
  fv = flags.FlagValues()
  flags.DEFINE_string('workdir', os.path.join('.', 'workdir', 'main'),
                      'Where everything is written; re-running resumes.', flag_values=fv)
  flags.DEFINE_enum('size', 'default', SIZES, 'Model and data size (tiny: tests).',
                    flag_values=fv)
  flags.DEFINE_integer('pretrain_steps', 0, 'Pre-training steps (0 = the size '
                       'default).', flag_values=fv)
  flags.DEFINE_integer('finetune_steps', 0, 'Fine-tuning steps per run (0 = the '
                       'size default).', flag_values=fv)
  flags.DEFINE_integer('seed', 0, 'Seed of every stage (init, data order, dropout).',
                       flag_values=fv)
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a in config_utils.HELP_FLAGS for a in argv):
    print(USAGE.strip() + '\n\nflags:\n' + fv.get_help(include_special_flags=False))
    raise SystemExit(0)
  try:
    fv(['s2d_jax.main'] + argv)
  except flags.Error as e:
    raise config_utils.UsageError(f'{e} (run with --help for the flags)') from e
  return run(fv.workdir, fv.size, fv.pretrain_steps, fv.finetune_steps, fv.seed)


if __name__ == '__main__':
  config_utils.run_cli(main)
