"""Zero-shot evaluation end to end (issue 14): `python -m s2d_jax.evaluate` on a
tiny SigLIP two-towers npz, a SentencePiece model trained here on the class names,
and the tiny demo dataset; its float top-1 equals an independent computation
(tfds images, sentencepiece ids, numpy class embeddings and argmax), a quantized
setting runs on the image tower only, and a missing tokenizer or one of another
vocabulary is refused before any work, naming it."""

import io
import json
import os
import re
import string
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
import tensorflow_datasets as tfds

from s2d_jax import config_utils as cu
from s2d_jax import eval_setup
from s2d_jax import evaluate
from s2d_jax import tasks
from s2d_jax.data import demo
from s2d_jax.models import siglip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = 's2d_demo_shapes/tiny'
CLASSES = demo.SHAPES            # the tiny dataset's 10 'label' names
TEMPLATES = ('a photo of a {}.', 'a {} shape', '{}')
MAX_LEN, PAD, EOS = 8, 0, 1

CONFIG = '''
from s2d_jax import config_utils

def get_config(arg=None):
  arg = config_utils.parse_arg(arg, npz='', spm='', data_dir='', vocab=0)
  c = config_utils.default_train_config()
  c.model_name = 'two_towers'
  c.model = dict(
      image=dict(patch_size=(4, 4), width=16, depth=1, mlp_dim=32, num_heads=1,
                 pool_type='gap', scan=True),
      text=dict(width=16, depth=1, mlp_dim=32, num_heads=1, vocab_size=arg.vocab,
                scan=True),
      out_dim=(None, 16), temperature_init=10.0, bias_init=-10.0)
  c.num_classes = 0
  c.evaluate.kind = 'zeroshot'
  c.evaluate.checkpoint = arg.npz
  c.evaluate.tokenizer = dict(model=arg.spm, max_len=%d, pad_value=%d)
  c.evaluate.templates = %r
  c.evaluate.data = dict(name=%r, split='test')
  c.evaluate.data_dir = arg.data_dir
  c.evaluate.pp = 'decode|resize(16)|value_range(-1,1)|keep("image","label")'
  c.evaluate.batch_size = 16
  c.evaluate.settings = ('float', 'W8A8')
  c.evaluate.collect_stats = False
  c.evaluate.pcdr_examples = 0
  return c
''' % (MAX_LEN, PAD, TEMPLATES, DATASET)


def _canon(text):
  """big_vision's canonicalisation for these texts: lower case, no punctuation."""
  text = text.replace('_', ' ').translate(str.maketrans('', '', string.punctuation))
  return re.sub(r'\s+', ' ', text.lower()).strip()


@pytest.fixture(scope='module')
def setup(tmp_path_factory, data_dir):
  """(config file, args): the config, a SentencePiece word model trained on the
  class names and templates, random two-towers params saved as a big_vision npz."""
  d = tmp_path_factory.mktemp('zs')
  buf = io.BytesIO()
  corpus = [t.format(c) for c in CLASSES for t in TEMPLATES] * 4
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_writer=buf, model_type='word',
      vocab_size=32, hard_vocab_limit=False, minloglevel=2, pad_id=PAD, eos_id=EOS, unk_id=2,
      bos_id=-1)
  spm_path = str(d / 'names.model')
  with open(spm_path, 'wb') as f:
    f.write(buf.getvalue())
  vocab = spm.SentencePieceProcessor(model_file=spm_path).get_piece_size()
  cfg_path = str(d / 'zeroshot.py')
  with open(cfg_path, 'w') as f:
    f.write(CONFIG)
  npz = str(d / 'siglip.npz')
  arg = f'npz={npz},spm={spm_path},data_dir={data_dir},vocab={vocab}'
  c = cu.load_config(f'{cfg_path}:{arg}')
  model = tasks.get(c).build(c)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, MAX_LEN), jnp.int32))
  rs = np.random.RandomState(1)
  params = jax.tree_util.tree_map_with_path(
      lambda p, s: ((1.0 if p[-1].key == 'scale' else 0.0)
                    + 0.5 * rs.standard_normal(s.shape)).astype(np.float32),
      shapes['params'])
  siglip.save(npz, params)
  return dict(cfg=cfg_path, arg=arg, config=c, model=model, params=params,
              spm=spm_path, dir=d)


def _reference_correct(s, data_dir):
  """Correct float zero-shot predictions, computed without the evaluator: tfds
  images → [-1, 1]; sentencepiece ids + EOS, padded; class embedding = the
  normalised mean of the templates' text embeddings; argmax of zimg · embᵀ."""
  model, params = s['model'], {'params': s['params']}
  ds = tfds.builder(DATASET, data_dir=data_dir).as_dataset(split='test')
  exs = list(tfds.as_numpy(ds))
  images = np.stack([e['image'] for e in exs]).astype(np.float32) / 127.5 - 1
  labels = np.array([e['label'] for e in exs])
  sp = spm.SentencePieceProcessor(model_file=s['spm'])
  texts = [_canon(t.format(c)) for c in CLASSES for t in TEMPLATES]
  ids = [sp.encode(t) + [EOS] for t in texts]
  assert max(map(len, ids)) <= MAX_LEN          # nothing truncated
  tokens = np.array([i + [PAD] * (MAX_LEN - len(i)) for i in ids], np.int32)
  zimg = np.asarray(jax.jit(lambda x: model.apply(params, x, None)[0])(images),
                    np.float64)
  ztxt = np.asarray(jax.jit(lambda t: model.apply(params, None, t)[1])(tokens),
                    np.float64).reshape(len(CLASSES), len(TEMPLATES), -1)
  m = ztxt.mean(axis=1)
  emb = m / (1e-8 + np.linalg.norm(m, axis=1, keepdims=True))
  logits = zimg @ emb.T
  top2 = np.sort(logits, axis=1)[:, -2:]
  assert (top2[:, 1] - top2[:, 0]).min() > 1e-5   # no near-tie rounding could flip
  return int(np.sum(np.argmax(logits, axis=1) == labels)), len(labels)


def test_zeroshot_cli_float_top1_equals_an_independent_computation(setup, data_dir):
  s = setup
  wd = str(s['dir'] / 'work')
  proc = subprocess.run(
      [sys.executable, '-m', 's2d_jax.evaluate', '--config', f'{s["cfg"]}:{s["arg"]}',
       '--workdir', wd],
      cwd=str(s['dir']), capture_output=True, text=True, timeout=600,
      env={**os.environ, 'PYTHONPATH': ROOT + os.pathsep
           + os.environ.get('PYTHONPATH', '')})
  assert proc.returncode == 0, proc.stderr[-3000:]
  rep = json.load(open(os.path.join(wd, 'report.json')))
  correct, total = _reference_correct(s, data_dir)
  assert 0 < correct < total          # a real test of the argmax, not all or none
  assert rep['counts']['float'] == dict(correct=correct, total=total, nonfinite=0)
  assert rep['accuracy']['float'] == correct / total
  # the quantized setting runs, on the image tower only (text embeddings: float)
  assert rep['counts']['W8A8']['total'] == total
  assert rep['counts']['W8A8']['nonfinite'] == 0
  quantized = [p for ps in rep['quant_plan']['W8A8']['modules_by_bits'].values()
               for p in ps]
  assert quantized and all(p.startswith('img/') for p in quantized), quantized
  assert rep['model']['kind'] == 'zeroshot'


def test_missing_tokenizer_or_another_vocabulary_is_refused_before_work(
    setup, tmp_path, monkeypatch):
  """Both are found by the input checks, before the model is loaded (on main a
  tokenizer with another vocabulary than the text tower's ran and scored
  silently: ids past the embedding table are clamped by XLA)."""
  s = setup
  def no_work(*a, **k):
    raise AssertionError('the model was loaded before the input checks')
  monkeypatch.setattr(eval_setup, 'load_model', no_work)
  c = cu.load_config(f'{s["cfg"]}:{s["arg"]}')
  c.evaluate.tokenizer.model = str(tmp_path / 'missing.model')
  with pytest.raises(ValueError, match=r'config\.evaluate\.tokenizer=.*FileNotFound'
                     r'Error: SentencePiece model file not found: .*missing\.model'):
    evaluate.evaluate(c, str(tmp_path / 'w1'))
  c = cu.load_config(f'{s["cfg"]}:{s["arg"]}')
  vocab = c.model.text.vocab_size
  c.model.text.vocab_size = vocab + 8
  with pytest.raises(ValueError, match=(
      rf'config\.evaluate\.tokenizer: the SentencePiece model .*names\.model.* has '
      rf'{vocab} pieces but the text tower\'s vocabulary '
      rf'\(config\.model\.text\.vocab_size\) is {vocab + 8}')):
    evaluate.evaluate(c, str(tmp_path / 'w2'))
  assert not os.path.exists(tmp_path / 'w1') and not os.path.exists(tmp_path / 'w2')
