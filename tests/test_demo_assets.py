"""The committed pre-trained demo model (s2d_jax/assets): checksums, loading, outliers.

`s2d_jax/assets/README.md` states the SHA-256 of every file, the model's shape and
its outlier structure; these tests check each statement against the files, on demo
images drawn directly with `s2d_jax.data.demo.draw_example` (no tfds build).
"""

import hashlib
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import s2d_jax
from s2d_jax import capture, outliers
from s2d_jax.data import demo
from s2d_jax.models import siglip, tokenizer, zeroshot

ASSETS = os.path.join(os.path.dirname(s2d_jax.__file__), 'assets')
README = os.path.join(ASSETS, 'README.md')
NPZ = os.path.join(ASSETS, 'demo_siglip.npz')
SPM = os.path.join(ASSETS, 'demo_captions.model')

# The claims of README.md ("Outlier structure"), checked on the first N_IMAGES test
# images of s2d_demo_shapes/default: the fc2 input (post-GELU) of the last encoder
# block reaches >= 100x its median |x|, and the largest outputs of the kernel that
# produces it (fc1) are carried by its top singular direction (PCDR_1 >= 0.5).
N_IMAGES = 64
OUTLIER_LAYER = 'img/Transformer/encoderblock_3/MlpBlock_0/Dense_1/input'
OUTLIER_PRODUCER = 'img/Transformer/encoderblock_3/MlpBlock_0/Dense_0'
MIN_RATIO, MIN_PCDR1 = 100.0, 0.5
# The fc2 inputs README lists with max/median >= 100 (the MAP head's is the largest).
RATIO_LAYERS = ('img/MAPHead_0/MlpBlock_0/Dense_1/input',
                'img/Transformer/encoderblock_2/MlpBlock_0/Dense_1/input',
                OUTLIER_LAYER)


def _readme_checksums() -> dict[str, str]:
  """{file name: sha256} from README lines like '| `name` | ... | `<64 hex>` |'."""
  with open(README) as f:
    text = f.read()
  return dict(re.findall(r'`([\w.]+)`[^\n]*?`([0-9a-f]{64})`', text))


def _images(n=N_IMAGES, res=32):
  imgs = np.stack([demo.draw_example(0, 'test', i, image_size=res)['image']
                   for i in range(n)])
  return imgs.astype(np.float32) / 127.5 - 1.0


@pytest.fixture(scope='module')
def loaded():
  return siglip.load(NPZ)


def test_checksums_match_readme():
  sums = _readme_checksums()
  assert set(sums) >= {os.path.basename(NPZ), os.path.basename(SPM)}, sums
  for name, want in sums.items():
    with open(os.path.join(ASSETS, name), 'rb') as f:
      assert hashlib.sha256(f.read()).hexdigest() == want, name


def test_npz_is_small():
  assert os.path.getsize(NPZ) < 2 * 1024 * 1024


def test_loads_with_siglip_load(loaded):
  model, params = loaded
  img, txt = model.image, model.text
  assert (img['width'], img['depth'], img['mlp_dim'], img['num_heads']) == (
      64, 4, 256, 4)
  assert tuple(img['patch_size']) == (4, 4) and img['pool_type'] == 'map'
  tok = tokenizer.Tokenizer(SPM, max_len=16, pad_value=0)
  assert txt['vocab_size'] == tok.vocab_size
  tokens = tok(['a red circle on a blue background', 'green star'])
  zimg, ztxt, out = jax.jit(model.apply)({'params': params}, _images(2), tokens)
  assert zimg.shape == ztxt.shape == (2, 64)
  np.testing.assert_allclose(np.linalg.norm(zimg, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(ztxt, axis=1), 1.0, rtol=1e-5)
  assert np.isfinite(float(out['t'][0])) and 'b' in out


def test_caption_model_covers_the_captions():
  """Every word of the demo captions is a piece of the shipped model (no <unk>)."""
  tok = tokenizer.Tokenizer(SPM, max_len=16, pad_value=0)
  captions = [demo.draw_example(0, 'train', i)['caption'] for i in range(N_IMAGES)]
  ids = np.asarray(tok(captions))
  assert tok.vocab_size == 70
  assert not (ids == 1).any(), [c for c, r in zip(captions, ids) if (r == 1).any()]


def test_zero_shot_colour_well_above_chance(loaded):
  """The towers are aligned: captions name the colour, zero-shot finds it."""
  model, params = loaded
  tok = tokenizer.Tokenizer(SPM, max_len=16, pad_value=0)
  emb = zeroshot.class_embeddings(model, params, tok, list(demo.COLOR_NAMES),
                                  [f'a {{}} {s}' for s in demo.SHAPES])
  labels = np.array([demo.draw_example(0, 'test', i)['color']
                     for i in range(N_IMAGES)])
  zimg = jax.jit(lambda v, x: model.apply(v, x, None)[0])({'params': params},
                                                          _images())
  acc = zeroshot.accuracy(zimg, emb, labels)
  assert acc > 0.5, acc   # chance: 1/12


def test_outlier_structure(loaded):
  """README's claim: a layer input >= 100x its median |x|, carried by sigma_1."""
  model, params = loaded
  apply_img = lambda v, x, **kw: model.apply(v, x, None, **kw)
  images = _images()
  v = {'params': params}
  # One forward pass: per-layer statistics and the captured matmul inputs.
  stats, inputs = jax.jit(lambda v, x: (
      outliers.stats_apply(apply_img)(v, None, x)[1],
      capture.capture_matmul_inputs(apply_img, v, x)[1]))(v, images)
  layers = outliers.summarize(jax.device_get(stats))
  ratios = {k: s['top1_median_ratio'] for k, s in layers.items()}
  above = {k for k, r in ratios.items() if r >= MIN_RATIO}
  assert above >= set(RATIO_LAYERS), {k: ratios[k] for k in RATIO_LAYERS}
  assert max(ratios, key=ratios.get) == RATIO_LAYERS[0], ratios
  # A real spread, not the ratio of a tensor that is almost all zeros.
  for k in RATIO_LAYERS:
    assert layers[k]['median_abs'] > 1e-3 and layers[k]['max_abs'] > 5, layers[k]
  # PCDR of the encoder's fc1 kernels only (scan layout: one leaf, all blocks).
  fc1 = inputs['img']['Transformer']['encoderblock']['MlpBlock_0']['Dense_0']
  pcdr = outliers.pcdr_stats(params, {'img': {'Transformer': {'encoderblock': {
      'MlpBlock_0': {'Dense_0': fc1}}}}}, 1)
  assert pcdr[OUTLIER_PRODUCER][0] >= MIN_PCDR1, pcdr[OUTLIER_PRODUCER]
