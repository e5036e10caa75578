r"""SigLIP So400m/14 384 (WebLI, English) -> ImageNet-1k, AdamW or AdamW+S2D, FSDP.

  python -m s2d_jax.train --config configs/siglip_so400m14_384_i1k.py:s2d=True \
      --workdir gs://BUCKET/s2d/siglip_so400m_384_s2d

Args: s2d (bool), epochs (float, 10), batch (int, 512), fsdp (int, 16),
init (npz, big_vision's `webli_en_so400m_384_58765454.npz`).

TPU: v5e-64 (64 chips, 16 GB HBM each, 16 hosts) or v4-64; global batch 512
(8 per chip). So400m/14 has 428M image-tower params (27 blocks, width 1152, MLP 4304);
params + Adam moments + S2D bases ≈ 5.5 GB in float32, sharded over an 'fsdp' axis of
16 chips (mesh data=4 × fsdp=16; each param is split along its largest dimension that
16 divides, big_vision's FSDP rule); activations are rematerialised per block.
"""

from s2d_jax import config_utils


def get_config(arg=None):
  arg = config_utils.parse_arg(
      arg, s2d=False, epochs=10.0, batch=512, fsdp=16,
      init='gs://big_vision/siglip/webli_en_so400m_384_58765454.npz')
  c = config_utils.default_train_config()
  c.model = dict(variant='So400m/14', pool_type='map', scan=True)
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
