r"""SigLIP B/16 224 (WebLI, English) -> ImageNet-1k fine-tuning, AdamW or AdamW+S2D.

  python -m s2d_jax.train --config configs/siglip_b16_224_i1k.py:s2d=True \
      --workdir gs://BUCKET/s2d/siglip_b16_224_s2d

Args: s2d (bool), epochs (float, 10), batch (int, 512), fsdp (int, 1),
init (npz, big_vision's `webli_en_b16_224_63724782.npz`).

TPU: v4-16 (8 chips, 2 hosts) or v5e-16 (16 chips, 4 hosts); global batch 512
(64 resp. 32 per chip), pure data parallelism (fsdp = 1; 86M params replicated).
"""

from s2d_jax import config_utils


def get_config(arg=None):
  arg = config_utils.parse_arg(
      arg, s2d=False, epochs=10.0, batch=512, fsdp=1,
      init='gs://big_vision/siglip/webli_en_b16_224_63724782.npz')
  c = config_utils.default_train_config()
  c.model = dict(variant='B/16', pool_type='map', scan=True)
  c.num_classes = 1000
  c.model_init = arg.init
  c.input.data = dict(name='imagenet2012', split='train[:99%]')
  c.input.pp = ('decode|inception_crop(224)|flip_lr|value_range(-1,1)'
                '|keep("image","label")')
  c.input.batch_size = arg.batch
  c.total_epochs = arg.epochs
  c.s2d.enabled = arg.s2d
  c.mesh.fsdp = arg.fsdp
  c.evaluate.data = dict(name='imagenet2012', split='validation')
  c.evaluate.pp = ('decode|resize_small(256)|central_crop(224)|value_range(-1,1)'
                   '|keep("image","label")')
  return c
