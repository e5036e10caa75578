r"""SigLIP L/16 384 (WebLI, English) -> ImageNet-1k fine-tuning, AdamW or AdamW+S2D.

  python -m s2d_jax.train --config configs/siglip_l16_384_i1k.py:s2d=True \
      --workdir gs://BUCKET/s2d/siglip_l16_384_s2d

Args: s2d (bool), epochs (float, 10), batch (int, 512), fsdp (int, 4),
init (npz, big_vision's `webli_en_l16_384_63634585.npz`).

TPU: v4-64 (32 chips, 8 hosts); global batch 512 (16 per chip). L/16 has 316M
params: params + Adam moments + S2D bases ≈ 4 GB in float32, so they are sharded
over an 'fsdp' axis of 4 chips (mesh data=8 × fsdp=4), leaving HBM for the 577-token
activations (remat per block). On v5e-64 (16 GB HBM per chip) use fsdp=8.
"""

from s2d_jax import config_utils


def get_config(arg=None):
  arg = config_utils.parse_arg(
      arg, s2d=False, epochs=10.0, batch=512, fsdp=4,
      init='gs://big_vision/siglip/webli_en_l16_384_63634585.npz')
  c = config_utils.default_train_config()
  c.model = dict(variant='L/16', pool_type='map', scan=True)
  c.num_classes = 1000
  c.model_init = arg.init
  c.input.data = dict(name='imagenet2012', split='train[:99%]')
  c.input.pp = ('decode|inception_crop(384)|flip_lr|value_range(-1,1)'
                '|keep("image","label")')
  c.input.batch_size = arg.batch
  c.total_epochs = arg.epochs
  c.lr = 2e-5
  c.s2d.enabled = arg.s2d
  c.mesh.fsdp = arg.fsdp
  c.evaluate.data = dict(name='imagenet2012', split='validation')
  c.evaluate.pp = ('decode|resize_small(438)|central_crop(384)|value_range(-1,1)'
                   '|keep("image","label")')
  c.evaluate.batch_size = 128
  return c
