r"""SigLIP2 B/16 384 -> ImageNet-1k, 10 epochs: the S2D paper's main setup.

Fine-tunes the image tower of big_vision's SigLIP2 B/16 at 384 px (MAP head kept,
classifier head re-initialised to zero) on ImageNet-1k for 10 epochs, with AdamW
(baseline) or AdamW + S2D (λ = 5e-4, n = 2, K_max = 3, τ = 0.95, PCDR refresh every
m = 100 steps: the paper's defaults), then runs the paper's PTQ protocols on the validation set: RepQ-ViT W4A4 /
W5A5 / W6A6, PTQ4ViT W5A5 / W6A6, ERQ W4A4 (each calibrated on the first
`evaluate.calib_images` = 32 training images), next to float and the uniform
dynamic W8A8 / W6A6 / W4A4.

  python -m s2d_jax.train --config configs/siglip2_b16_384_i1k.py:s2d=True \
      --workdir gs://BUCKET/s2d/siglip2_b16_384_s2d
  python -m s2d_jax.train --config configs/siglip2_b16_384_i1k.py:s2d=False \
      --workdir gs://BUCKET/s2d/siglip2_b16_384_adamw

Args (`:key=value,...`): s2d (bool), res (int, 384), variant ('B/16'),
init (npz path), epochs (float, 10), batch (int, 512), fsdp (int, 1).

TPU: v4-32 (16 chips, 4 hosts) or v5e-32 (32 chips, 8 hosts); global batch 512
(32 resp. 16 images per chip), pure data parallelism (mesh 'data' = all chips,
'fsdp' = 1): B/16 has 86M parameters, so params + Adam moments + S2D bases (~1.1 GB
in float32) are replicated; activations are rematerialised per block (scan + remat).
Run the same command on every host (`jax.distributed.initialize` picks up the TPU
topology); each host reads its 1/num_hosts of the data. ImageNet-1k in tfds
(`imagenet2012`) must be prepared in `--config.input.data_dir` (manual download).

The optimizer hyper-parameters (lr 3e-5, wd 0.05, 5% warmup + cosine, clip 1.0) are
standard fine-tuning choices, not taken from the paper, which specifies only the S2D
hyper-parameters above.
"""

from s2d_jax import config_utils


def get_config(arg=None):
  arg = config_utils.parse_arg(
      arg, s2d=False, res=384, variant='B/16',
      init='gs://big_vision/siglip2/siglip2_b16_384.npz', epochs=10.0, batch=512,
      fsdp=1)
  c = config_utils.default_train_config()
  c.model_name = 'vit'
  c.model = dict(variant=arg.variant, pool_type='map', scan=True, posemb='learn')
  c.num_classes = 1000
  c.model_init = arg.init
  c.model_load.dont_load = ['head/.*']
  c.input.data = dict(name='imagenet2012', split='train[:99%]')
  c.input.pp = (f'decode|inception_crop({arg.res})|flip_lr|value_range(-1,1)'
                '|keep("image","label")')
  c.input.batch_size = arg.batch
  c.input.shuffle_buffer_size = 250_000
  c.total_epochs = arg.epochs
  c.lr = 3e-5
  c.wd = 0.05
  c.warmup_frac = 0.05
  c.grad_clip_norm = 1.0
  c.s2d.enabled = arg.s2d
  c.s2d.update(strength=5e-4, power=2.0, k_max=3, tau=0.95, refresh_every=100)
  c.mesh.fsdp = arg.fsdp
  c.log_every = 50
  c.ckpt_every = 1000
  c.evaluate.data = dict(name='imagenet2012', split='validation')
  c.evaluate.pp = (f'decode|resize_small({arg.res * 8 // 7})|central_crop({arg.res})'
                   '|value_range(-1,1)|keep("image","label")')
  c.evaluate.batch_size = 256
  c.evaluate.settings = ('float', 'W8A8', 'W6A6', 'W4A4',
                         'RepQ-ViT/W4A4', 'RepQ-ViT/W5A5', 'RepQ-ViT/W6A6',
                         'PTQ4ViT/W5A5', 'PTQ4ViT/W6A6', 'ERQ/W4A4')
  c.evaluate.calib_images = 32
  return c
