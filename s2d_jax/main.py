r"""The main job: pre-train, export, fine-tune with AdamW and AdamW+S2D, quantize, compare.

    python -m s2d_jax.main [--workdir ./workdir/main] [--size default|tiny]
                           [--pretrain_steps N] [--finetune_steps N] [--seed S]

Offline, on CPU, in a few minutes. Steps (all under WORKDIR):

1. `tfds/`: builds the embedded demo dataset `s2d_demo_shapes` (procedurally drawn
   shapes on textured backgrounds, with captions; a real tfds builder), and trains a
   small SentencePiece word model on the training captions (`captions.model`).
2. `pretrain/`: pre-trains a tiny SigLIP-style two-towers model (ViT image tower +
   text transformer, sigmoid loss) on image/caption pairs with a high learning rate
   and no weight decay, which grows dominant singular values and activation outliers
   as long pre-training does; exports it as a big_vision npz (`params.npz`).
3. `adamw/`, `s2d/`: fine-tunes a classifier (image tower + new zero-init head, the
   paper's ImageNet setup at toy scale, `configs/demo.py`: 12-way colour of the
   shape, which the captions name) from that npz twice, with AdamW and with
   AdamW + S2D (PCDR-selected k per kernel).
4. Evaluates both on the test split: float and fake-quant W8A8, W6A6, W4A4 (dynamic
   per-token activations, per-channel weights); each run gets `report.json` + plots.
5. Prints one table (accuracy per setting, max |activation|, kurtosis, σ_max) and
   writes it to `results.md` / `results.json`, with comparison plots in `plots/`.

Every number in the table is measured in this run; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(_REPO, 'configs', 'demo.py')

PRETRAIN = {
    # steps, lr, batch, dataset config, text dims
    'default': dict(steps=500, lr=5e-3, batch=64, data='default', text_width=64,
                    text_depth=2, text_heads=4, text_mlp=256, max_len=16),
    'tiny': dict(steps=16, lr=3e-3, batch=16, data='tiny', text_width=32,
                 text_depth=1, text_heads=2, text_mlp=64, max_len=12),
}
SETTINGS = ('float', 'W8A8', 'W6A6', 'W4A4')


def _log(msg):
  print(f'[main {time.strftime("%H:%M:%S")}] {msg}', flush=True)


def build_data(workdir: str, size: str) -> tuple[str, str, str]:
  """Builds the demo tfds dataset; returns (data_dir, tfds name, spm model path)."""
  from s2d_jax.data import demo  # pylint: disable=g-import-not-at-top
  data_dir = os.path.join(workdir, 'tfds')
  cfg_name = PRETRAIN[size]['data']
  builder = demo.build(data_dir, cfg_name)
  name = f'{demo.NAME}/{cfg_name}'
  spm_path = os.path.join(workdir, 'captions.model')
  if not os.path.exists(spm_path):
    train_caption_tokenizer(builder, os.path.join(workdir, 'captions'))
  return data_dir, name, spm_path


def train_caption_tokenizer(builder, prefix: str) -> str:
  """A SentencePiece word model over the training captions (pad 0, unk 1, eos 2)."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  captions = [ex['caption'].decode() for ex in tfds.as_numpy(
      builder.as_dataset(split='train'))]
  words = sorted({w for c in captions for w in c.lower().split()})
  tmp = prefix + '.tmp'
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(captions), model_prefix=tmp, model_type='word',
      vocab_size=len(words) + 3, pad_id=0, unk_id=1, eos_id=2, bos_id=-1,
      normalization_rule_name='nmt_nfkc_cf', minloglevel=2)
  for ext in ('.model', '.vocab'):
    os.replace(tmp + ext, prefix + ext)
  return prefix + '.model'


def pretrain_config(size: str, data_dir: str, name: str, spm_path: str, steps: int,
                    seed: int):
  """Two-towers SigLIP pre-training config; the image tower = configs/demo.py's."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from s2d_jax import config_utils  # pylint: disable=g-import-not-at-top
  p = PRETRAIN[size]
  ft = config_utils.load_config(f'{DEMO_CONFIG}:size={size}')
  # The image size of the demo config's evaluation `resize(S)` (S x S inputs).
  res = int(re.search(r'resize\((\d+)\)', ft.evaluate.pp).group(1))
  vocab = spm.SentencePieceProcessor(model_file=spm_path).get_piece_size()
  c = config_utils.default_train_config()
  c.seed = seed
  c.model_name = 'two_towers'
  image = {k: v for k, v in dict(ft.model).items()}
  c.model = dict(
      image=image,
      text=dict(width=p['text_width'], depth=p['text_depth'],
                num_heads=p['text_heads'], mlp_dim=p['text_mlp'], vocab_size=vocab,
                scan=True),
      out_dim=(None, image['width']), temperature_init=10.0, bias_init=-10.0)
  c.num_classes = 0
  c.model_init = ''
  c.input.data = dict(name=name, split='train')
  c.input.data_dir = data_dir
  c.input.pp = (f'decode|resize({res})|value_range(-1,1)'
                f'|tokenize(max_len={p["max_len"]}, eos="sticky", model="{spm_path}", '
                'pad_value=0, inkey="caption")|keep("image","labels")')
  c.input.batch_size = p['batch']
  c.input.shuffle_buffer_size = 1024
  c.total_steps = steps
  # Aggressive pre-training grows dominant singular values: high lr, no wd; 500 steps
  # at 5e-3 so that the whole job fits in ~5 minutes on 2 CPU cores.
  c.lr = p['lr']
  c.wd = 0.0
  # 20% warmup: with 5% the sigmoid loss stayed at its initial value (~5.15) for
  # the first ~150-200 steps (seen at lr 3e-3 and 6e-3), wasting a third of the run.
  c.warmup_frac = 0.2
  c.min_lr_frac = 0.1
  c.grad_clip_norm = 0.0
  c.log_every = max(steps // 10, 1)
  c.ckpt_every = max(steps // 2, 1)
  c.keep_ckpts = 1
  c.evaluate.enabled = False
  return c


def finetune_config(size, data_dir, name, init, s2d: bool, steps: int, seed: int):
  from s2d_jax import config_utils  # pylint: disable=g-import-not-at-top
  arg = f'size={size},s2d={s2d},init={init},data_dir={data_dir},dataset={name}'
  if steps:
    arg += f',steps={steps}'
  c = config_utils.load_config(f'{DEMO_CONFIG}:{arg}')
  c.seed = seed
  return c


def summarize(report: dict) -> dict:
  """Accuracy per setting, max |activation|, kurtosis, σ_max from a report.json."""
  layers = report.get('layers', {})
  weights = report.get('weights', {})
  row = {s: float(report['accuracy'][s]) for s in SETTINGS if s in report['accuracy']}
  if layers:
    top_layer, top = max(layers.items(), key=lambda kv: kv[1]['max_abs'])
    row['max_abs_act'] = float(top['max_abs'])
    row['max_abs_act_layer'] = top_layer
    kurts = [float(v['kurtosis']) for v in layers.values()
             if isinstance(v.get('kurtosis'), (int, float))]
    row['kurtosis_max'] = max(kurts) if kurts else float('nan')
  if weights:
    top_w, w = max(weights.items(), key=lambda kv: kv[1]['sigma_max'])
    row['sigma_max'] = float(w['sigma_max'])
    row['sigma_max_layer'] = top_w
  return row


def format_results(rows: dict[str, dict]) -> str:
  cols = [('run', None)] + [(s, s) for s in SETTINGS] + [
      ('max|act|', 'max_abs_act'), ('kurtosis', 'kurtosis_max'),
      ('σ_max', 'sigma_max')]
  table = [[c for c, _ in cols]]
  for run, r in rows.items():
    line = [run]
    for _, key in cols[1:]:
      v = r.get(key)
      if v is None:
        line.append('-')
      elif key in SETTINGS:
        line.append(f'{100 * v:.2f}')
      else:
        line.append(f'{v:.2f}')
    table.append(line)
  widths = [max(len(t[i]) for t in table) for i in range(len(cols))]
  out = ['| ' + ' | '.join(c.ljust(w) for c, w in zip(t, widths)) + ' |'
         for t in table]
  out.insert(1, '|' + '|'.join('-' * (w + 2) for w in widths) + '|')
  return '\n'.join(out)


def run(workdir: str, size: str = 'default', pretrain_steps: int = 0,
        finetune_steps: int = 0, seed: int = 0, echo: bool = True) -> dict:
  """The whole job; returns {'rows', 'table', 'paths', 'wall_s'}."""
  import jax  # pylint: disable=g-import-not-at-top
  from s2d_jax import evaluate, train  # pylint: disable=g-import-not-at-top
  if size not in PRETRAIN:
    raise ValueError(f'--size={size!r} not in {sorted(PRETRAIN)}')
  t0 = time.time()
  os.makedirs(workdir, exist_ok=True)
  _log(f'workdir {os.path.abspath(workdir)}, {jax.device_count()} device(s), '
       f'size={size}')
  data_dir, name, spm_path = build_data(workdir, size)
  _log(f'dataset {name} ready in {data_dir} ({time.time() - t0:.0f}s)')

  steps = pretrain_steps or PRETRAIN[size]['steps']
  pcfg = pretrain_config(size, data_dir, name, spm_path, steps, seed)
  pdir = os.path.join(workdir, 'pretrain')
  _log(f'pre-training a two-towers SigLIP model for {steps} steps')
  pres = train.train(pcfg, pdir, echo=echo)
  npz = pres['npz']
  _log(f'pre-trained model saved as big_vision npz {npz} ({time.time() - t0:.0f}s)')

  rows, reports = {}, {}
  for run_name, s2d in (('AdamW', False), ('AdamW+S2D', True)):
    rdir = os.path.join(workdir, 's2d' if s2d else 'adamw')
    cfg = finetune_config(size, data_dir, name, npz, s2d, finetune_steps, seed)
    _log(f'fine-tuning {run_name} for {cfg.total_steps} steps in {rdir}')
    res = train.train(cfg, rdir, echo=echo)
    _log(f'evaluating {run_name}: {", ".join(cfg.evaluate.settings)}')
    rep = evaluate.evaluate(cfg, rdir, params=jax.device_get(res['params']),
                            progress=False)
    reports[run_name] = rep
    rows[run_name] = summarize(rep)
    rows[run_name]['train_steps'] = int(res['total_steps'])

  table = format_results(rows)
  wall = time.time() - t0
  from s2d_jax import plots  # pylint: disable=g-import-not-at-top
  plot_paths = plots.save_comparison(reports, rows, SETTINGS,
                                     os.path.join(workdir, 'plots'))
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump({'rows': rows, 'wall_s': wall, 'size': size, 'seed': seed,
               'devices': jax.device_count()}, f, indent=1)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(f'Main job (size={size}, seed={seed}), measured in {wall:.0f} s on '
            f'{jax.device_count()} {jax.default_backend()} device(s).\n'
            'Accuracy: top-1 % on the s2d_demo_shapes test split; max|act|, kurtosis: '
            'largest over layers (float model); σ_max: largest over kernels.\n\n')
    f.write(table + '\n')
  print(table, flush=True)
  for run_name, r in rows.items():
    print(f'{run_name}: largest activation at {r.get("max_abs_act_layer")}, '
          f'largest σ at {r.get("sigma_max_layer")}', flush=True)
  _log(f'done in {wall:.0f}s; table in {os.path.join(workdir, "results.md")}, plots '
       f'in {os.path.join(workdir, "plots")}')
  return {'rows': rows, 'table': table, 'paths': plot_paths, 'wall_s': wall}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--workdir', default=os.path.join('.', 'workdir', 'main'))
  ap.add_argument('--size', default='default', choices=sorted(PRETRAIN))
  ap.add_argument('--pretrain_steps', type=int, default=0)
  ap.add_argument('--finetune_steps', type=int, default=0)
  ap.add_argument('--seed', type=int, default=0)
  args = ap.parse_args(sys.argv[1:] if argv is None else argv)
  return run(args.workdir, args.size, args.pretrain_steps, args.finetune_steps,
             args.seed)


if __name__ == '__main__':
  main()
