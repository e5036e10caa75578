r"""Pre-training recipes that grow activation outliers in the demo model (issue 11).

    python benchmarks/outlier_recipe.py --workdir /tmp/outliers --recipe final
    python benchmarks/outlier_recipe.py --workdir /tmp/probe --recipe today \
        --set steps=1000 --set lr=1e-2 --probe_every 250 --runs ''
    python benchmarks/outlier_recipe.py --workdir /tmp/outliers --recipe final \
        --runs adamw,s2d --ft_seeds 0,1,2

One run = build the embedded data (`s2d_demo_shapes`, + a SentencePiece caption model)
→ pre-train a SigLIP-style two-towers model with the recipe through
`s2d_jax.train.train` (probing the image tower's outlier statistics every
`--probe_every` steps) → fine-tune the image tower with AdamW (`configs/demo.py`) and,
with `--s2d`, with AdamW+S2D → evaluate float and fake-quant settings
(`s2d_jax.evaluate`) → print per-layer outlier statistics before and after fine-tuning
and the PTQ drops, and write them to WORKDIR/summary.json.

Statistics (all from `s2d_jax.outliers`, on the first `--probe_images` test images):
per matmul input and per block output, max|x|, max|x| / median|x| ("ratio"),
Pearson kurtosis; per kernel σ_max of its matrix view and PCDR_1 of its largest
outputs (top 0.1 %). The target of issue 11: some layer with ratio ≥ 100 whose
producing kernel has PCDR_1 ≥ 0.5, and ≥ 5 points lost at W4A4-static.

CPU cost is measured as process CPU time (`resource.getrusage`), not wall clock, since
the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import hashlib
import resource
import shutil
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)
DEMO_CONFIG = os.path.join(_REPO, 'configs', 'demo.py')

# The recipe before issue 11 (main.py's pretrain_config, size='default'): the base
# that every entry of RECIPES changes.
TODAY = dict(
    data='default', steps=500, lr=5e-3, wd=0.0, warmup_frac=0.2, min_lr_frac=0.1,
    grad_clip_norm=0.0, b1=0.9, b2=0.999, eps=1e-8, batch=64, seed=0,
    # image tower = configs/demo.py (size='default')
    res=32, patch=4, width=64, depth=4, mlp=256, heads=4, pool_type='map',
    posemb='learn',
    # text tower
    text_width=64, text_depth=2, text_heads=4, text_mlp=256, max_len=16,
    temperature_init=10.0, bias_init=-10.0)

# Recipes tried (their measured log: s2d_jax/assets/README.md). 'final' = p2 is
# configs/demo_pretrain.py at size='default' and produced s2d_jax/assets/demo_siglip.npz.
RECIPES = {
    'today': {},
    'p1': dict(steps=1500, lr=1e-2, warmup_frac=0.1),
    'p2': dict(steps=3000, lr=1e-2, warmup_frac=0.1),
    'p3': dict(steps=3000, lr=2e-2, warmup_frac=0.1),
    'p4': dict(steps=4000, lr=1e-2, warmup_frac=0.1),
    'p5': dict(steps=3000, lr=1.4e-2, warmup_frac=0.1),
}
RECIPES['final'] = RECIPES['p2']

# File names in s2d_jax/assets (--export).
NPZ_NAME, SPM_NAME = 'demo_siglip.npz', 'demo_captions.model'
# Issue 11's bar for "genuine" outliers: max|x| / median|x| >= 100 at a layer whose
# producing kernel has PCDR_1 >= 0.5, and >= 5 points lost at W4A4-static.
MIN_RATIO, MIN_PCDR1, MIN_DROP = 100.0, 0.5, 0.05

SETTINGS = ('float', 'W8A8', 'W6A6', 'W4A4', 'W8A8-static', 'W6A6-static',
            'W4A4-static')


def _log(msg):
  print(f'[outliers {time.strftime("%H:%M:%S")}] {msg}', flush=True)


def sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def cpu_seconds() -> float:
  """User + system CPU time of this process and its waited-for children."""
  s = resource.getrusage(resource.RUSAGE_SELF)
  c = resource.getrusage(resource.RUSAGE_CHILDREN)
  return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


# ----------------------------------------------------------------------------------
# Data and configs
# ----------------------------------------------------------------------------------

def build_data(workdir: str, data: str = 'default') -> tuple[str, str, str]:
  """Builds s2d_demo_shapes/`data` + a caption SentencePiece model; (data_dir, name, spm)."""
  from s2d_jax.data import demo  # pylint: disable=g-import-not-at-top
  data_dir = os.path.join(workdir, 'tfds')
  builder = demo.build(data_dir, data)
  spm_path = os.path.join(workdir, f'captions_{data}.model')
  if not os.path.exists(spm_path):
    demo.caption_tokenizer(builder, spm_path[:-len('.model')])
  return data_dir, f'{demo.NAME}/{data}', spm_path


def build_model(config):
  """The linen module of a config: two_towers.Model(**model) or vit.Model(classes)."""
  from s2d_jax.models import two_towers, vit  # pylint: disable=g-import-not-at-top
  kw = config.model.to_dict() if hasattr(config.model, 'to_dict') else dict(
      config.model)
  if config.model_name == 'two_towers':
    return two_towers.Model(**kw)
  return vit.Model(int(config.num_classes), **kw)


def recipe_values(name: str, overrides: dict | None = None) -> dict:
  r = dict(TODAY)
  r.update(RECIPES[name])
  for k, v in (overrides or {}).items():
    if k not in r:
      raise KeyError(f'--set {k}: unknown recipe key; known: {sorted(r)}')
    r[k] = type(r[k])(v) if not isinstance(r[k], bool) else v in (True, 'True', '1')
  return r


def pretrain_config(r: dict, data_dir: str, name: str, spm_path: str):
  """Two-towers SigLIP pre-training config for recipe values `r`."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from s2d_jax import config_utils  # pylint: disable=g-import-not-at-top
  vocab = spm.SentencePieceProcessor(model_file=spm_path).get_piece_size()
  c = config_utils.default_train_config()
  c.seed = r['seed']
  c.model_name = 'two_towers'
  image = dict(patch_size=(r['patch'], r['patch']), width=r['width'],
               depth=r['depth'], mlp_dim=r['mlp'], num_heads=r['heads'],
               pool_type=r['pool_type'], posemb=r['posemb'], scan=True)
  c.model = dict(
      image=image,
      text=dict(width=r['text_width'], depth=r['text_depth'],
                num_heads=r['text_heads'], mlp_dim=r['text_mlp'], vocab_size=vocab,
                scan=True),
      out_dim=(None, r['width']), temperature_init=r['temperature_init'],
      bias_init=r['bias_init'])
  c.num_classes = 0
  c.model_init = ''
  c.input.data = dict(name=name, split='train')
  c.input.data_dir = data_dir
  c.input.pp = (f'decode|resize({r["res"]})|value_range(-1,1)'
                f'|tokenize(max_len={r["max_len"]}, eos="sticky", model="{spm_path}", '
                'pad_value=0, inkey="caption")|keep("image","labels")')
  c.input.batch_size = r['batch']
  c.input.shuffle_buffer_size = 1024
  c.total_steps = r['steps']
  for k in ('lr', 'wd', 'warmup_frac', 'min_lr_frac', 'grad_clip_norm', 'b1', 'b2',
            'eps'):
    c[k] = r[k]
  c.log_every = max(r['steps'] // 10, 1)
  c.ckpt_every = max(r['steps'] // 2, 1)
  c.keep_ckpts = 1
  c.evaluate.enabled = False
  return c


def finetune_config(r: dict, data_dir: str, name: str, init: str, s2d: bool,
                    steps: int = 0, seed: int = 0, overrides: dict | None = None):
  """configs/demo.py with the recipe's image tower (its defaults when unchanged)."""
  from s2d_jax import config_utils  # pylint: disable=g-import-not-at-top
  arg = f's2d={s2d},init={init},data_dir={data_dir},dataset={name}'
  if steps:
    arg += f',steps={steps}'
  c = config_utils.load_config(f'{DEMO_CONFIG}:{arg}')
  c.seed = seed
  c.model.update(patch_size=(r['patch'], r['patch']), width=r['width'],
                 depth=r['depth'], mlp_dim=r['mlp'], num_heads=r['heads'],
                 pool_type=r['pool_type'], posemb=r['posemb'])
  res = r['res']
  c.input.pp = re.sub(r'inception_crop\(\d+', f'inception_crop({res}', c.input.pp)
  c.evaluate.pp = re.sub(r'resize\(\d+\)', f'resize({res})', c.evaluate.pp)
  c.evaluate.settings = SETTINGS
  if overrides:
    config_utils.apply_overrides(c, overrides)
  return c


# ----------------------------------------------------------------------------------
# Outlier statistics of an image tower
# ----------------------------------------------------------------------------------

def probe_images(data_dir: str, name: str, res: int, n: int):
  from s2d_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  ds, _ = input_pipeline.get_eval_dataset(
      name, 'test', preprocess=f'decode|resize({res})|value_range(-1,1)'
      '|keep("image","label")', batch_size=n, data_dir=data_dir)
  return next(ds.as_numpy_iterator())['image']


def tower_stats(apply_fn, params, images, prefix: str = '') -> dict:
  """Per layer: max_abs, ratio, kurtosis (inputs / block outputs); σ_max, PCDR_1..3.

  `apply_fn(variables, images)` runs the image tower; `prefix` ('img/') is removed
  from the layer names so that pre-trained and fine-tuned reports match.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from s2d_jax import capture, outliers  # pylint: disable=g-import-not-at-top
  v = {'params': params}
  stats_fn = jax.jit(lambda v, x: outliers.stats_apply(apply_fn)(v, None, x)[1])
  layers = outliers.summarize(jax.device_get(stats_fn(v, images)))
  inputs = jax.jit(lambda v, x: capture.capture_matmul_inputs(apply_fn, v, x)[1])(
      v, images[:8])
  pcdr = outliers.pcdr_stats(params, inputs, 3)
  weights = outliers.weight_spectrum(params)
  strip = lambda k: k[len(prefix):] if prefix and k.startswith(prefix) else k
  return dict(
      layers={strip(k): dict(max_abs=s['max_abs'], ratio=s['top1_median_ratio'],
                             kurtosis=s['kurtosis'], median=s['median_abs'])
              for k, s in layers.items()},
      pcdr={strip(k): p for k, p in pcdr.items()},
      sigma={strip(k): w['sigma_max'] for k, w in weights.items()})


def headline(st: dict) -> dict:
  """Largest ratio (and where), largest max|x|, largest σ, PCDR_1 of the producer."""
  lay = st['layers']
  k_ratio, r = max(lay.items(), key=lambda kv: kv[1]['ratio'])
  k_max, m = max(lay.items(), key=lambda kv: kv[1]['max_abs'])
  out = dict(ratio=r['ratio'], ratio_at=k_ratio, max_abs=m['max_abs'], max_at=k_max,
             kurtosis=max(v['kurtosis'] for v in lay.values()),
             sigma_max=max(st['sigma'].values()) if st['sigma'] else float('nan'))
  cats = dict(ln=r'(query|Dense_0)/input$', fc2=r'Dense_1/input$', res=r'/output$',
              attn=r'out/input$')
  for cat, pat in cats.items():
    sel = [v['ratio'] for k, v in lay.items() if re.search(pat, k)]
    out[f'ratio_{cat}'] = max(sel) if sel else float('nan')
  prod = producer(k_ratio)
  if prod and prod in st['pcdr']:
    out['producer'] = prod
    out['producer_pcdr1'] = st['pcdr'][prod][0]
  return out


def producer(layer: str) -> str | None:
  """The kernel whose output (through GELU / attention) is this layer's tensor."""
  m = re.match(r'(.*)/MlpBlock_0/Dense_1/input$', layer)
  if m:
    return f'{m.group(1)}/MlpBlock_0/Dense_0'
  m = re.match(r'(.*/MultiHeadDotProductAttention_0)/out/input$', layer)
  if m:
    return f'{m.group(1)}/value'
  m = re.match(r'(.*encoderblock_\d+)/output$', layer)
  if m:
    return f'{m.group(1)}/MlpBlock_0/Dense_1'
  return None


def genuine_outliers(st: dict) -> list[dict]:
  """Layers with max/median >= MIN_RATIO whose producer has PCDR_1 >= MIN_PCDR1."""
  out = []
  for k, v in st['layers'].items():
    prod = producer(k)
    if v['ratio'] >= MIN_RATIO and prod in st['pcdr'] and (
        st['pcdr'][prod][0] >= MIN_PCDR1):
      out.append(dict(layer=k, ratio=v['ratio'], max_abs=v['max_abs'],
                      kurtosis=v['kurtosis'], producer=prod,
                      producer_pcdr1=st['pcdr'][prod][0],
                      producer_sigma_max=st['sigma'].get(prod)))
  return sorted(out, key=lambda d: -d['ratio'])


def format_genuine(rows: list[dict]) -> str:
  if not rows:
    return (f'no layer with max/median >= {MIN_RATIO:.0f} and producer PCDR_1 >= '
            f'{MIN_PCDR1}')
  return '\n'.join(
      f'genuine outlier: {d["layer"]} max/median {d["ratio"]:.0f}, max|x| '
      f'{d["max_abs"]:.1f}, kurtosis {d["kurtosis"]:.0f}; produced by '
      f'{d["producer"]} (σ_max {d["producer_sigma_max"]:.2f}, PCDR_1 '
      f'{d["producer_pcdr1"]:.2f})' for d in rows)


def format_accuracy(by_seed: dict, name: str) -> str:
  """Top-1 % per setting: mean ± std over seeds (and the drop vs float)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  seeds = sorted(by_seed)
  lines = [f'{name}, fine-tune seeds {seeds}: top-1 % mean ± std (drop vs float)']
  fl = np.array([by_seed[s]['accuracy']['float'] for s in seeds])
  for k in by_seed[seeds[0]]['accuracy']:
    a = np.array([by_seed[s]['accuracy'][k] for s in seeds])
    d = 100 * (fl - a)
    lines.append(f'  {k:12s} {100 * a.mean():6.2f} ± {100 * a.std():4.2f}'
                 + ('' if k == 'float' else f'   ({d.mean():+.2f} ± {d.std():.2f})'))
  return '\n'.join(lines)


_SUB_ORDER = ('query', 'key', 'value', 'out', 'Dense_0', 'Dense_1', 'output')


def _layer_order(k: str):
  m = re.search(r'encoderblock_(\d+)', k)
  block = int(m.group(1)) if m else (-1 if k.startswith('embedding') else 99)
  sub = next((i for i, t in enumerate(_SUB_ORDER) if f'/{t}/' in k + '/'), 0)
  return block, sub, k


def format_layers(before: dict, after: dict | None = None) -> str:
  """Markdown table: per layer max|x|, ratio, kurtosis, σ_max, PCDR_1 (before → after)."""
  def row_vals(st, k):
    s = st['layers'].get(k)
    kern = k.rsplit('/', 1)[0]
    sig = st['sigma'].get(kern)
    p = st['pcdr'].get(kern)
    return [f'{s["max_abs"]:.1f}', f'{s["ratio"]:.0f}', f'{s["kurtosis"]:.0f}',
            '-' if sig is None else f'{sig:.2f}', '-' if p is None else f'{p[0]:.2f}']
  cols = ['layer', 'max|x|', 'max/med', 'kurt', 'σ_max', 'PCDR_1']
  lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for k in sorted(before['layers'], key=_layer_order):
    if k.startswith('txt/'):
      continue
    b = row_vals(before, k)
    if after is not None and k in after['layers']:
      a = row_vals(after, k)
      b = [f'{x} → {y}' for x, y in zip(b, a)]
    lines.append('| ' + ' | '.join([k] + b) + ' |')
  return '\n'.join(lines)


# ----------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------

def pretrain(r: dict, workdir: str, data, probe_every: int = 0, n_probe: int = 256,
             echo: bool = True) -> dict:
  """Pre-trains with recipe `r`; returns {'npz', 'probes', 'cpu_s', 'stats'}."""
  import jax  # pylint: disable=g-import-not-at-top
  from s2d_jax import checkpointing, train  # pylint: disable=g-import-not-at-top
  data_dir, name, spm_path = data
  cfg = pretrain_config(r, data_dir, name, spm_path)
  if probe_every:
    cfg.ckpt_every = probe_every
  model = build_model(cfg)
  apply_img = lambda v, x, **kw: model.apply(v, x, None, **kw)
  images = probe_images(data_dir, name, r['res'], n_probe)
  pdir = os.path.join(workdir, 'pretrain')
  probes = []

  def on_step(step):
    if probe_every and step % probe_every == 0 and step < cfg.total_steps:
      params = checkpointing.restore_params(pdir, step)
      h = headline(tower_stats(apply_img, params, images, 'img/'))
      h['step'] = step
      probes.append(h)
      _log(f'probe step {step}: ratio {h["ratio"]:.0f} at {h["ratio_at"]}, '
           f'max|x| {h["max_abs"]:.1f} at {h["max_at"]}, kurt {h["kurtosis"]:.0f}, '
           f'σ_max {h["sigma_max"]:.2f}, ratios ln/fc2/res/attn '
           f'{h["ratio_ln"]:.0f}/{h["ratio_fc2"]:.0f}/{h["ratio_res"]:.0f}/'
           f'{h["ratio_attn"]:.0f}, producer PCDR_1 '
           f'{h.get("producer_pcdr1", float("nan")):.2f}')

  c0 = cpu_seconds()
  res = train.train(cfg, pdir, echo=echo, on_step=on_step)
  cpu = cpu_seconds() - c0
  params = jax.device_get(res['params'])
  st = tower_stats(apply_img, params, images, 'img/')
  h = headline(st)
  h['step'] = cfg.total_steps
  probes.append(h)
  return dict(npz=res['npz'], probes=probes, cpu_s=cpu, stats=st,
              loss=float(res['metrics'].get('loss', float('nan'))))


def finetune(r: dict, workdir: str, data, npz: str, s2d: bool, n_probe: int = 256,
             steps: int = 0, overrides: dict | None = None, seed: int = 0,
             name: str = '', echo: bool = True) -> dict:
  """Fine-tunes configs/demo.py from `npz` in WORKDIR/NAME[_seedS]; evaluates it."""
  import jax  # pylint: disable=g-import-not-at-top
  from s2d_jax import evaluate, train  # pylint: disable=g-import-not-at-top
  data_dir, name, _ = data
  cfg = finetune_config(r, data_dir, name, npz, s2d, steps, seed, overrides)
  name = name or ('s2d' if s2d else 'adamw')
  rdir = os.path.join(workdir, name + (f'_seed{seed}' if seed else ''))
  c0 = cpu_seconds()
  res = train.train(cfg, rdir, echo=echo)
  params = jax.device_get(res['params'])
  rep = evaluate.evaluate(cfg, rdir, params=params, progress=False)
  model = build_model(cfg)
  images = probe_images(data_dir, name, r['res'], n_probe)
  st = tower_stats(model.apply, params, images)
  return dict(accuracy=rep['accuracy'], stats=st, cpu_s=cpu_seconds() - c0)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--workdir', required=True)
  ap.add_argument('--recipe', default='final', choices=sorted(RECIPES))
  ap.add_argument('--set', action='append', default=[],
                  help='recipe override key=value (keys of TODAY)')
  ap.add_argument('--probe_every', type=int, default=0,
                  help='outlier statistics every N pre-training steps (0 = at the end)')
  ap.add_argument('--probe_images', type=int, default=256)
  ap.add_argument('--runs', default='adamw',
                  help="fine-tunes: comma-separated 'adamw', 's2d'; '' = none")
  ap.add_argument('--ft_seeds', default='0', help='comma-separated fine-tune seeds')
  ap.add_argument('--ft_steps', type=int, default=0, help='0 = configs/demo.py')
  ap.add_argument('--ft_set', action='append', default=[],
                  help='fine-tune config override key=value, e.g. s2d.strength=5e-4')
  ap.add_argument('--tag', default='',
                  help='suffix of the fine-tune run directories and summary_TAG.json')
  ap.add_argument('--export', default='',
                  help='copy the pre-trained npz and caption model into this directory '
                  '(s2d_jax/assets) and print their SHA-256')
  ap.add_argument('--quiet', action='store_true', help='no per-step training logs')
  args = ap.parse_args(sys.argv[1:] if argv is None else argv)
  r = recipe_values(args.recipe, dict(s.split('=', 1) for s in args.set))
  runs = [x for x in args.runs.split(',') if x]
  if set(runs) - {'adamw', 's2d'}:
    raise ValueError(f'--runs={args.runs!r}: use adamw and/or s2d')
  os.makedirs(args.workdir, exist_ok=True)
  c0 = cpu_seconds()
  data = build_data(args.workdir, r['data'])
  data_cpu = cpu_seconds() - c0
  _log(f'recipe {args.recipe}: {r}')
  pre = pretrain(r, args.workdir, data, args.probe_every, args.probe_images,
                 echo=not args.quiet)
  summary = dict(recipe=args.recipe, values=r, data_cpu_s=data_cpu,
                 pretrain_cpu_s=pre['cpu_s'], pretrain_loss=pre['loss'],
                 probes=pre['probes'], pretrained=pre['stats'], npz=pre['npz'],
                 spm=data[2], genuine=genuine_outliers(pre['stats']), runs={})
  _log(f'pre-training: {pre["cpu_s"]:.0f} CPU s, final loss {pre["loss"]:.3f}')
  print(format_layers(pre['stats']))
  print(format_genuine(summary['genuine']))
  ft_over = dict(s.split('=', 1) for s in args.ft_set)
  for run in runs:
    for seed in (int(x) for x in args.ft_seeds.split(',')):
      name = f'{run}{"_" + args.tag if args.tag else ""}'
      ft = finetune(r, args.workdir, data, pre['npz'], run == 's2d', args.probe_images,
                    args.ft_steps, ft_over, seed, name, echo=not args.quiet)
      summary['runs'].setdefault(name, {})[seed] = ft
      acc = ft['accuracy']
      _log(f'{name} seed {seed}: ' + ', '.join(f'{k} {100 * v:.2f}'
                                               for k, v in acc.items()))
      _log(f'{name} seed {seed}: W4A4-static drop '
           f'{100 * (acc["float"] - acc["W4A4-static"]):.2f} points; '
           f'{ft["cpu_s"]:.0f} CPU s')
      print(format_layers(pre['stats'], ft['stats']))
    print(format_accuracy(summary['runs'][name], name))
  summary['cpu_s'] = cpu_seconds() - c0
  out = os.path.join(args.workdir, f'summary_{args.tag}.json' if args.tag
                     else 'summary.json')
  with open(out, 'w') as f:
    json.dump(summary, f, indent=1, default=str)
  if args.export:
    for src, dst in ((pre['npz'], NPZ_NAME), (data[2], SPM_NAME)):
      shutil.copyfile(src, os.path.join(args.export, dst))
      print(f'| `{dst}` | {os.path.getsize(src)} | `{sha256(src)}` |')
  _log(f'total {summary["cpu_s"]:.0f} CPU s (pre-training {pre["cpu_s"]:.0f}); '
       f'summary in {out}')
  return summary


if __name__ == '__main__':
  main()
