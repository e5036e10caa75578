r"""The main job's pre-training stage: a tiny SigLIP-style two-towers model on the demo data.

`python -m s2d_jax.main` trains this config first, exports the result as a big_vision
npz, and fine-tunes `demo.py` from it. The image tower is `demo.py`'s (same size
argument), the text tower a small transformer over the captions' SentencePiece word
model. Run it alone with

  python -m s2d_jax.train --config demo_pretrain:data_dir=WORKDIR/tfds,spm=WORKDIR/captions.model \
      --workdir /tmp/pretrain

Args: size ('default' | 'tiny'), data_dir (tfds data_dir holding s2d_demo_shapes),
dataset (tfds name incl. config, default per size), spm (the caption SentencePiece
model; its vocabulary size sets the text tower's), steps (0 = size default).

Recipe (issue 11: a model with genuine activation outliers; the shipped
`s2d_jax/assets/demo_siglip.npz` is this config at size='default', seed 0): long
training at a high learning rate without weight decay or clipping, Adam (b1 0.9,
b2 0.999), a MAP-pooled image tower: 3000 steps of batch 64, peak lr 1e-2, 10%
linear warmup, cosine to 0.1x. The probes of the recipe search
(`benchmarks/outlier_recipe.py`, 256 test images) show the outliers growing with
training: largest max|x| / median|x| of any image-tower layer input 54 (step 500) ->
87 (1000) -> 126 (1500) -> 172 (2000) -> 283 (2500) -> 336 (3000), at the fc2 input
(post-GELU) of the MAP head, `img/MAPHead_0/MlpBlock_0/Dense_1/input`, produced by
`MAPHead_0/MlpBlock_0/Dense_0` with PCDR_1 ~0.5-0.6; the largest |x| (~130-150)
sits in the residual stream (block outputs). The previous recipe (500 steps at 5e-3,
20% warmup) reached a ratio of ~30 and max|x| ~28. With lr 2e-2 the float model
stayed at ~67% after fine-tuning; see s2d_jax/assets/README.md for the whole log.

Hardware: 1 CPU (2 cores), 816-1037 CPU s (14-17 CPU minutes) at the default size;
the main job does not run it unless asked (`--pretrain`): it starts from the shipped
npz, which this config re-creates bit for bit on the same machine and versions.
"""

import re

from s2d_jax import config_utils

SIZES = {
    # steps, lr, warmup, batch, text dims (the image tower is demo.py's)
    'default': dict(steps=3000, lr=1e-2, warmup_frac=0.1, batch=64, text_width=64,
                    text_depth=2, text_heads=4, text_mlp=256, max_len=16),
    'tiny': dict(steps=16, lr=3e-3, warmup_frac=0.2, batch=16, text_width=32,
                 text_depth=1, text_heads=2, text_mlp=64, max_len=12),
}


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, size='default', data_dir='', dataset='', spm='',
                               steps=0)
  if arg.size not in SIZES:
    raise ValueError(f'configs/demo_pretrain.py: size={arg.size!r} not in '
                     f'{sorted(SIZES)}')
  p = SIZES[arg.size]
  ft = config_utils.load_config(f'demo:size={arg.size},dataset={arg.dataset},'
                                f'data_dir={arg.data_dir}')
  # The image size of the demo config's evaluation `resize(S)` (S x S inputs).
  res = int(re.search(r'resize\((\d+)\)', ft.evaluate.pp).group(1))
  vocab = 32
  if arg.spm:
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    vocab = spm.SentencePieceProcessor(model_file=arg.spm).get_piece_size()
  c = config_utils.default_train_config()
  c.model_name = 'two_towers'
  image = dict(ft.model)
  c.model = dict(
      image=image,
      text=dict(width=p['text_width'], depth=p['text_depth'],
                num_heads=p['text_heads'], mlp_dim=p['text_mlp'], vocab_size=vocab,
                scan=True),
      out_dim=(None, image['width']), temperature_init=10.0, bias_init=-10.0)
  c.num_classes = 0
  c.model_init = ''
  c.input.data = dict(ft.input.data)
  c.input.data_dir = ft.input.data_dir
  c.input.pp = (f'decode|resize({res})|value_range(-1,1)'
                f'|tokenize(max_len={p["max_len"]}, eos="sticky", model="{arg.spm}", '
                'pad_value=0, inkey="caption")|keep("image","labels")')
  c.input.batch_size = p['batch']
  c.input.shuffle_buffer_size = 1024
  c.total_steps = arg.steps or p['steps']
  c.lr = p['lr']
  c.wd = 0.0
  c.warmup_frac = p['warmup_frac']
  c.min_lr_frac = 0.1
  c.grad_clip_norm = 0.0
  c.b1, c.b2, c.eps = 0.9, 0.999, 1e-8
  c.log_every = max(c.total_steps // 10, 1)
  c.ckpt_every = max(c.total_steps // 2, 1)
  c.keep_ckpts = 1
  c.evaluate.enabled = False
  c.evaluate.kind = 'zeroshot'
  return c
