"""Tests for s2d_jax.models.tokenizer against a tiny SentencePiece model trained here."""

import io

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf

from s2d_jax.models import tokenizer as tok_lib

_WORDS = ("a photo of the red circle square triangle star ring cross on striped "
          "dotted plain background small large blue green yellow dog cat "
          "quick brown fox jumps over lazy").split()


def _corpus():
  rng = np.random.default_rng(0)
  return [" ".join(rng.choice(_WORDS, size=8)) for _ in range(400)]


def _train(path, **ids):
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_corpus()), model_writer=buf, vocab_size=80,
      hard_vocab_limit=False, minloglevel=2, **ids)
  path.write_bytes(buf.getvalue())
  return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  d = tmp_path_factory.mktemp("spm")
  # T5/c4-like ids: pad 0, eos 1, unk 2, no bos.  Gemma-like: pad 0, eos 1, bos 2, unk 3.
  c4 = _train(d / "c4.model", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
  gemma = _train(d / "gemma.model", pad_id=0, eos_id=1, bos_id=2, unk_id=3)
  return {"c4": c4, "gemma": gemma}


def _sp(path):
  sp = spm.SentencePieceProcessor()
  sp.Load(path)
  return sp


def _single_piece_word(sp):
  for w in _WORDS:
    if len(sp.EncodeAsIds(w)) == 1:
      return w
  raise AssertionError("no single-piece word")


def test_c4_conventions_short_text(models):
  sp = _sp(models["c4"])
  tok = tok_lib.Tokenizer("c4_en", model_path=models["c4"], max_len=16)
  assert tok.pad_value == 1 and tok.eos_id == 1 and tok.bos_id == -1
  text = "A Photo of the RED circle"
  ids = sp.EncodeAsIds(text.lower())
  want = ids + [1] + [1] * (16 - len(ids) - 1)
  np.testing.assert_array_equal(tok(text), want)
  assert tok(text).dtype == np.int32 and tok(text).shape == (16,)


@pytest.mark.parametrize("eos,pad", [("sticky", 0), ("sticky", 1), ("yes", 0),
                                     ("none", 0), ("no", 0)])
def test_big_vision_docstring_table(models, eos, pad):
  """big_vision ops_text.get_pp_tokenize docstring cases, max_len=3, id(</s>)=1."""
  sp = _sp(models["c4"])
  w = _single_piece_word(sp)
  a = sp.EncodeAsIds(w)[0]
  tok = tok_lib.Tokenizer(models["c4"], max_len=3, eos=eos, pad_value=pad)
  got = [tok(" ".join([w] * n)).tolist() for n in (1, 2, 3)]
  want = {
      "sticky": [[a, 1, pad], [a, a, 1], [a, a, 1]],
      "yes": [[a, 1, pad], [a, a, 1], [a, a, a]],
      "none": [[a, pad, pad], [a, a, pad], [a, a, a]],
      "no": [[a, pad, pad], [a, a, pad], [a, a, a]],
  }[eos]
  assert got == want


def test_sticky_truncation_long_text(models):
  sp = _sp(models["c4"])
  text = " ".join(_WORDS)
  ids = sp.EncodeAsIds(text.lower())
  assert len(ids) > 10
  tok = tok_lib.Tokenizer(models["c4"], max_len=10, pad_value=1)
  np.testing.assert_array_equal(tok(text), ids[:9] + [1])


def test_lowercase_is_ascii_only_like_tf(models):
  s = "ÄÖ Photo ÉCOLE"
  assert tok_lib.ascii_lower(s) == tf.strings.lower(s).numpy().decode()
  assert tok_lib.ascii_lower(s) == "ÄÖ photo École"
  tok = tok_lib.Tokenizer(models["c4"], max_len=12, pad_value=1)
  np.testing.assert_array_equal(tok("RED Circle"), tok("red circle"))
  raw = tok_lib.Tokenizer(models["c4"], max_len=12, pad_value=1, lower=False)
  assert not np.array_equal(raw("RED Circle"), raw("red circle"))


def test_gemma_conventions(models):
  sp = _sp(models["gemma"])
  tok = tok_lib.Tokenizer("gemma", model_path=models["gemma"], max_len=12)
  assert tok.pad_value == 0 == tok.pad_id
  ids = sp.EncodeAsIds("red circle")
  np.testing.assert_array_equal(tok("Red Circle"), ids + [1] + [0] * (11 - len(ids)))
  with_bos = tok_lib.Tokenizer("gemma", model_path=models["gemma"], max_len=12,
                               add_bos=True)
  np.testing.assert_array_equal(with_bos("red circle")[:len(ids) + 2],
                                [2] + ids + [1])
  # A path (no known name) pads with the model's <pad> id.
  assert tok_lib.Tokenizer(models["gemma"]).pad_value == 0


def test_batch_shapes_and_decode(models):
  tok = tok_lib.Tokenizer(models["c4"], max_len=8, pad_value=1)
  texts = np.array([["red circle", "blue square"], ["a dog", ""]], dtype=object)
  out = tok(texts)
  assert out.shape == (2, 2, 8) and out.dtype == np.int32
  np.testing.assert_array_equal(out[1, 1], [1] * 8)  # "" -> [eos] + pad
  np.testing.assert_array_equal(out[0, 1], tok("blue square"))
  assert tok.decode(tok("Blue Square")) == "blue square"
  assert tok(["a", "b"]).shape == (2, 8)
  assert tok([]).shape == (0, 8)


def test_tf_tokenize_matches_python(models):
  tok = tok_lib.Tokenizer(models["gemma"], max_len=7)
  texts = ["Red circle on a striped background", "cat", "ÉCOLE DOG"]
  ds = tf.data.Dataset.from_tensor_slices(texts).map(tok.tf_tokenize)
  assert ds.element_spec.shape == (7,)
  got = np.stack(list(ds.as_numpy_iterator()))
  np.testing.assert_array_equal(got, tok(texts))
  vec = tok.tf_tokenize(tf.constant(texts))
  np.testing.assert_array_equal(vec.numpy(), tok(texts))
  with pytest.raises(TypeError, match="tf.string"):
    tok.tf_tokenize(tf.constant([1, 2]))


def test_for_vocab_size(models):
  t = tok_lib.Tokenizer.for_vocab_size(256_000, max_len=16,
                                       model_path=models["gemma"])
  assert (t.name, t.max_len, t.pad_value) == ("gemma", 16, 0)
  t = tok_lib.Tokenizer.for_vocab_size(32_000, model_path=models["c4"])
  assert (t.name, t.max_len, t.pad_value) == ("c4_en", 64, 1)
  with pytest.raises(ValueError, match="vocab_size=1234"):
    tok_lib.Tokenizer.for_vocab_size(1234)


def test_errors(models, tmp_path):
  with pytest.raises(ValueError, match="eos must be one of"):
    tok_lib.Tokenizer(models["c4"], eos="always")
  with pytest.raises(ValueError, match="max_len"):
    tok_lib.Tokenizer(models["c4"], max_len=0)
  missing = str(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tok_lib.Tokenizer(missing)
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"this is not a sentencepiece model")
  with pytest.raises(ValueError, match="bad.model"):
    tok_lib.Tokenizer(str(bad))
  with pytest.raises(ValueError, match="not a piece"):
    tok_lib.Tokenizer(models["c4"], pad_value="<nonexistent>")
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok_lib.Tokenizer(models["c4"], pad_value=10**6)
  with pytest.raises(ValueError, match="model_path is only for known names"):
    tok_lib.Tokenizer(models["c4"], model_path=models["c4"])
  with pytest.raises(ValueError, match="no BOS"):
    tok_lib.Tokenizer(models["c4"], add_bos=True)
  with pytest.raises(TypeError, match="expected a str"):
    tok_lib.Tokenizer(models["c4"]).encode(3)
  with pytest.raises(ValueError, match="max_len must be >= 1"):
    tok_lib.pad_or_truncate([1], 0, pad_value=0, sticky_eos=True)
