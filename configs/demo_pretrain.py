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

Recipe (moved as is from main.py): aggressive pre-training grows dominant singular
values: a high learning rate, no weight decay, no clipping, 20% warmup (with 5% the
sigmoid loss stayed at its initial value (~5.15) for the first ~150-200 steps, seen at
lr 3e-3 and 6e-3, wasting a third of the run); 500 steps at 5e-3 so that the whole
main job fits in ~5 minutes on 2 CPU cores.

Hardware: 1 CPU (2 cores), about 100 s at the default size.
"""

import re

from s2d_jax import config_utils

SIZES = {
    # steps, lr, batch, text dims (the image tower is demo.py's)
    'default': dict(steps=500, lr=5e-3, batch=64, text_width=64, text_depth=2,
                    text_heads=4, text_mlp=256, max_len=16),
    'tiny': dict(steps=16, lr=3e-3, batch=16, text_width=32, text_depth=1,
                 text_heads=2, text_mlp=64, max_len=12),
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
  c.warmup_frac = 0.2
  c.min_lr_frac = 0.1
  c.grad_clip_norm = 0.0
  c.log_every = max(c.total_steps // 10, 1)
  c.ckpt_every = max(c.total_steps // 2, 1)
  c.keep_ckpts = 1
  c.evaluate.enabled = False
  c.evaluate.kind = 'zeroshot'
  return c
