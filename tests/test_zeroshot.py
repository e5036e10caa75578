"""Tests for s2d_jax.models.zeroshot with small stand-in text towers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2d_jax.models import imagenet_classes
from s2d_jax.models import zeroshot as zs

L, V, D = 6, 64, 8


def _tokenizer(texts):
  """Deterministic toy tokenizer: hash of characters into [2, V), pad 0."""
  out = np.zeros((len(texts), L), np.int32)
  for i, t in enumerate(texts):
    ids = [2 + (sum(map(ord, w)) * 7 + j) % (V - 2) for j, w in
           enumerate(t.split())][:L]
    out[i, :len(ids)] = ids
  return out


class TextTower(nn.Module):
  """Stand-in with the two-towers API: apply(v, None, tokens) -> (None, ztxt, out)."""

  @nn.compact
  def __call__(self, images, tokens):
    assert images is None
    x = nn.Embed(V, D)(tokens).sum(axis=1)
    x = nn.Dense(D)(jnp.tanh(x))
    return None, x / jnp.linalg.norm(x, axis=-1, keepdims=True), {}


@pytest.fixture(scope="module")
def tower():
  model = TextTower()
  params = jax.jit(lambda k: model.init(k, None, jnp.zeros((1, L), jnp.int32)))(
      jax.random.PRNGKey(0))
  return model, params["params"]


def _ref_class_emb(model, params, names, templates):
  """Independent reference: one text at a time, mean, normalise (float64)."""
  embs = []
  for c in names:
    zs_c = [np.asarray(model.apply({"params": params}, None,
                                   jnp.asarray(_tokenizer([t.format(c)])))[1][0],
                       np.float64) for t in templates]
    m = np.mean(zs_c, axis=0)
    embs.append(m / (1e-8 + np.linalg.norm(m)))
  return np.stack(embs)


def test_class_embeddings_model_params_matches_reference(tower):
  model, params = tower
  names = ["red circle", "blue square", "green star"]
  temps = ["a photo of a {}.", "a {} drawing", "{}"]
  got = zs.class_embeddings(model, params, _tokenizer, names, temps,
                            batch_size=4, canonicalize=False)  # 9 texts: padded
  want = _ref_class_emb(model, params, names, temps)
  assert got.shape == (3, D)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)
  # Means of unit vectors are shorter than 1: re-normalisation matters.
  raw_mean = np.mean([np.asarray(model.apply({"params": params}, None,
                                             jnp.asarray(_tokenizer([t.format(names[0])])))[1][0])
                      for t in temps], axis=0)
  assert np.linalg.norm(raw_mean) < 0.999


def test_function_form_and_single_compile(tower):
  model, params = tower
  traces = []

  @jax.jit
  def text_fn(tokens):
    traces.append(tokens.shape)
    return model.apply({"params": params}, None, tokens)[1]

  names = [f"class {i}" for i in range(7)]
  temps = ["a {}", "the {} thing"]
  got = zs.class_embeddings(text_fn, None, _tokenizer, names, temps,
                            batch_size=5, canonicalize=False)
  want = zs.class_embeddings(model, params, _tokenizer, names, temps,
                             batch_size=3, canonicalize=False)
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert traces == [(5, L)]  # 14 texts in 3 batches of 5: one trace


def test_canonicalization_like_big_vision():
  assert zs.canonicalize_text("Kite (bird of prey)") == "kite bird of prey"
  assert zs.canonicalize_text("yellow lady's slipper") == "yellow ladys slipper"
  assert zs.canonicalize_text("a, b_c!", keep_punctuation_exact_string=",") == "a, b c"
  assert zs.canonicalize_text("A photo of a {}.",
                              keep_punctuation_exact_string="{}") == "a photo of a {}"
  names = zs.get_class_names()
  assert len(names) == 1000 and names[21] == "kite bird of prey"
  assert zs.get_class_names(["Great_White Shark"]) == ["great white shark"]
  temps = zs.get_templates()
  assert len(temps) == 81 and temps[-1] == "{}" and temps[0] == "a bad photo of a {}"
  assert len(zs.get_templates("clip")) == 80
  assert len(zs.get_templates("clip_best")) == 8
  assert zs.class_texts(["x", "y"], ["a {}", "{}!"]) == ["a x", "x!", "a y", "y!"]


def test_imagenet_data():
  assert len(imagenet_classes.CLASS_NAMES) == 1000
  assert imagenet_classes.CLASS_NAMES[0] == "tench"
  assert imagenet_classes.CLASS_NAMES[999] == "toilet paper"
  assert len(imagenet_classes.CLIP_TEMPLATES) == 80
  assert len(set(imagenet_classes.CLIP_TEMPLATES)) == 80
  assert all(t.count("{}") == 1 for t in imagenet_classes.BIG_VISION_TEMPLATES)


def test_logits_predict_accuracy():
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(5, D))
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  labels = np.array([0, 3, 4, 1, 2, 2])
  zimg = emb[labels] + 0.05 * rng.normal(size=(6, D))
  zimg /= np.linalg.norm(zimg, axis=1, keepdims=True)
  logits = np.asarray(zs.zeroshot_logits(zimg, emb))
  np.testing.assert_allclose(logits, zimg @ emb.T, atol=1e-6)
  np.testing.assert_array_equal(zs.zeroshot_predict(zimg, emb), labels)
  wrong = labels.copy()
  wrong[:2] = [1, 0]
  assert zs.accuracy(zimg, emb, labels) == 1.0
  assert zs.accuracy(zimg, emb, wrong) == pytest.approx(4 / 6)
  mask = np.array([0, 0, 1, 1, 1, 0])
  assert zs.accuracy(zimg, emb, wrong, mask) == 1.0
  assert zs.count_correct(zimg, emb, wrong, mask) == (3, 3)


def test_errors(tower):
  model, params = tower
  with pytest.raises(ValueError, match="needs a tokenizer"):
    zs.class_embeddings(model, params, None, ["a"], ["{}"])
  with pytest.raises(ValueError, match="params is None"):
    zs.class_embeddings(model, None, _tokenizer, ["a"], ["{}"])
  with pytest.raises(ValueError, match="params must be None"):
    zs.class_embeddings(lambda t: t, params, _tokenizer, ["a"], ["{}"])
  with pytest.raises(ValueError, match="exactly one"):
    zs.class_embeddings(model, params, _tokenizer, ["a"], ["no slot"])
  with pytest.raises(ValueError, match="unknown template set 'clip_worst'"):
    zs.get_templates("clip_worst")
  with pytest.raises(ValueError, match="at least one class"):
    zs.get_class_names([])
  with pytest.raises(ValueError, match="batch_size must be positive"):
    zs.embed_texts(model, params, np.zeros((2, L), np.int32), batch_size=0)
  with pytest.raises(ValueError, match="returned shape"):
    zs.embed_texts(lambda t: np.zeros((1, D)), None, np.zeros((3, L), np.int32),
                   batch_size=2)
  with pytest.raises(ValueError, match=r"zimg \(2, 3\) and class_emb \(4, 5\)"):
    zs.zeroshot_logits(np.zeros((2, 3)), np.zeros((4, 5)))
  with pytest.raises(ValueError, match="mask is all zero"):
    zs.accuracy(np.eye(2), np.eye(2), [0, 1], [0, 0])
  with pytest.raises(ValueError, match="labels shape"):
    zs.accuracy(np.eye(2), np.eye(2), [0, 1, 1])
  with pytest.raises(TypeError, match="flax model or a function"):
    zs.embed_texts(3, None, np.zeros((2, L), np.int32))


def test_with_two_towers_model_and_sentencepiece_tokenizer(tmp_path):
  """Integration: engineer B's two_towers text path + a real SentencePiece tokenizer."""
  import io
  import sentencepiece as spm
  from s2d_jax.data import demo
  from s2d_jax.models import tokenizer as tok_lib
  from s2d_jax.models import two_towers

  rng = np.random.default_rng(0)
  words = list(demo.SHAPES) + "a photo of the drawing red blue".split()
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([" ".join(rng.choice(words, 5)) for _ in range(300)]),
      model_writer=buf, vocab_size=60, hard_vocab_limit=False, minloglevel=2,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
  (tmp_path / "m.model").write_bytes(buf.getvalue())
  tok = tok_lib.Tokenizer(str(tmp_path / "m.model"), max_len=8, pad_value=1)
  model = two_towers.Model(
      text=dict(width=16, depth=1, mlp_dim=32, num_heads=2,
                vocab_size=tok.vocab_size), out_dim=(None, 16), bias_init=-10.0)
  params = jax.jit(lambda k: model.init(k, None, jnp.zeros((1, 8), jnp.int32)))(
      jax.random.PRNGKey(1))["params"]
  names, temps = list(demo.SHAPES[:4]), ["a photo of a {}.", "a {} drawing"]
  got = zs.class_embeddings(model, params, tok, names, temps, batch_size=3)
  one = jax.jit(lambda t: model.apply({"params": params}, None, t)[1][0])
  ref = []
  for c in names:
    z = [np.asarray(one(tok([t.format(c).rstrip(".")])), np.float64)
         for t in temps]
    m = np.mean(z, 0)
    ref.append(m / (1e-8 + np.linalg.norm(m)))
  np.testing.assert_allclose(got, np.stack(ref), atol=1e-5)
  # Image embeddings equal to a class embedding are classified as that class.
  np.testing.assert_array_equal(zs.zeroshot_predict(got[[2, 0, 3]], got), [2, 0, 3])
