r"""SigLIP2 B/16 384 -> ImageNet-1k with W4A4 quantization-aware training (± S2D).

The paper's QAT row: fine-tune through straight-through fake quantization (weights
and activations, setting W4A4 by default) with AdamW or AdamW + S2D, then evaluate
float and PTQ settings.

  python -m s2d_jax.train --config configs/siglip2_b16_384_i1k_qat.py:s2d=True \
      --workdir gs://BUCKET/s2d/siglip2_b16_384_qat_s2d

Args: s2d (bool), setting ('W4A4'), epochs (float, 10), batch (int, 512), fsdp (1).

TPU: as `siglip2_b16_384_i1k.py` (v4-32 or v5e-32, global batch 512, pure data
parallelism); fake quantization adds elementwise work only, memory is unchanged.
"""

from s2d_jax import config_utils


def get_config(arg=None):
  arg = config_utils.parse_arg(
      arg, s2d=False, setting='W4A4', epochs=10.0, batch=512, fsdp=1,
      init='gs://big_vision/siglip2/siglip2_b16_384.npz')
  c = config_utils.default_train_config()
  c.model = dict(variant='B/16', pool_type='map', scan=True)
  c.num_classes = 1000
  c.model_init = arg.init
  c.input.data = dict(name='imagenet2012', split='train[:99%]')
  c.input.pp = ('decode|inception_crop(384)|flip_lr|value_range(-1,1)'
                '|keep("image","label")')
  c.input.batch_size = arg.batch
  c.total_epochs = arg.epochs
  c.s2d.enabled = arg.s2d
  c.qat.enabled = True
  c.qat.setting = arg.setting
  c.mesh.fsdp = arg.fsdp
  c.evaluate.data = dict(name='imagenet2012', split='validation')
  c.evaluate.pp = ('decode|resize_small(438)|central_crop(384)|value_range(-1,1)'
                   '|keep("image","label")')
  return c
