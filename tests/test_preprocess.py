"""Tests for s2d_jax.models.preprocess (big_vision pp op strings)."""

import io

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf

from s2d_jax.models import preprocess as pp
from s2d_jax.models import tokenizer as tok_lib


def _img(h, w, c=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def _np_bilinear(x, oh, ow):
  """Independent half-pixel-centre bilinear resize (TF2 semantics), float64."""
  x = x.astype(np.float64)

  def axis_weights(n_in, n_out):
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    f = np.floor(src)
    lerp = src - f
    lo = np.clip(f, 0, n_in - 1).astype(int)
    hi = np.clip(f + 1, 0, n_in - 1).astype(int)
    return lo, hi, lerp

  lo, hi, t = axis_weights(x.shape[0], oh)
  x = x[lo] * (1 - t)[:, None, None] + x[hi] * t[:, None, None]
  lo, hi, t = axis_weights(x.shape[1], ow)
  return x[:, lo] * (1 - t)[None, :, None] + x[:, hi] * t[None, :, None]


def _run(pp_str, **example):
  return pp.get_preprocess_fn(pp_str)(example)


def test_value_range_math():
  x = _img(5, 7)
  out = _run("value_range(-1, 1)", image=tf.constant(x))["image"].numpy()
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, x / 255.0 * 2 - 1, atol=1e-6)
  out = _run("value_range(0, 1, in_min=[0, 10, 20], in_max=[255, 110, 220], "
             "clip_values=True)", image=tf.constant(x))["image"].numpy()
  lo, hi = np.array([0, 10, 20.]), np.array([255, 110, 220.])
  np.testing.assert_allclose(out, np.clip((x - lo) / (hi - lo), 0, 1), atol=1e-6)


def test_resize_matches_tf_and_truncating_uint8_round_trip():
  x = _img(13, 17)
  out = _run("resize(8)", image=tf.constant(x))["image"].numpy()
  assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
  ref = tf.image.resize(x, (8, 8), method="bilinear", antialias=False).numpy()
  np.testing.assert_allclose(ref, _np_bilinear(x, 8, 8), atol=1e-3)
  # big_vision casts after clipping: truncation, not rounding.
  np.testing.assert_array_equal(out, np.clip(ref, 0, 255).astype(np.uint8))
  assert np.any(out != np.round(ref).astype(np.uint8))
  out = _run("resize([6, 11])", image=tf.constant(x))["image"].numpy()
  assert out.shape == (6, 11, 3)
  # Float input: no round trip at all.
  xf = x.astype(np.float32) / 7
  out = _run("resize(9)", image=tf.constant(xf))["image"].numpy()
  np.testing.assert_array_equal(out, tf.image.resize(xf, (9, 9)).numpy())
  # Other methods go through tf.image.resize too.
  out = _run("resize(5, method='nearest')", image=tf.constant(x))["image"].numpy()
  np.testing.assert_array_equal(
      out, tf.image.resize(x, (5, 5), method="nearest").numpy().astype(np.uint8))


@pytest.mark.parametrize("hw,small,want", [
    ((30, 45), 20, (20, 30)), ((4, 10), 2, (2, 5)),
    ((4, 5), 2, (2, 2)),   # 2.5 rounds half to even, like tf.round
    ((4, 7), 2, (2, 4)),   # 3.5 -> 4
    ((50, 20), 40, (100, 40))])
def test_resize_small_sizes(hw, small, want):
  out = _run(f"resize_small({small})", image=tf.constant(_img(*hw)))["image"]
  assert tuple(out.shape[:2]) == want and out.dtype == tf.uint8
  f = small / min(hw)
  assert want == (int(np.round(hw[0] * f)), int(np.round(hw[1] * f)))


@pytest.mark.parametrize("hw,crop", [((9, 12), 5), ((10, 10), [4, 7]),
                                     ((8, 13), None), ((7, 7), 7)])
def test_central_crop_indices(hw, crop):
  x = _img(*hw)
  out = _run(f"central_crop({crop!r})", image=tf.constant(x))["image"].numpy()
  if crop is None:
    h = w = min(hw)
  else:
    h, w = (crop, crop) if isinstance(crop, int) else crop
  dy, dx = (hw[0] - h) // 2, (hw[1] - w) // 2
  np.testing.assert_array_equal(out, x[dy:dy + h, dx:dx + w])


@pytest.mark.parametrize("sz,resized", [(224, 256), (384, 438), (32, 36)])
def test_square875_zero_shot_sizes(sz, resized):
  s = pp.square875(sz)
  assert s == f"resize({resized})|central_crop({sz})|value_range(-1,1)"
  x = _img(50, 70)
  out = _run(s, image=tf.constant(x))["image"].numpy()
  assert out.shape == (sz, sz, 3) and out.dtype == np.float32
  big = _run(f"resize({resized})", image=tf.constant(x))["image"].numpy()
  d = (resized - sz) // 2
  np.testing.assert_allclose(out, big[d:d + sz, d:d + sz] / 127.5 - 1, atol=1e-6)
  assert pp.aspect75(24) == "resize_small(32)|central_crop(24)|value_range(-1,1)"


def _coord_image(h, w):
  """uint8 image whose channels encode (row, col): crops can be located."""
  r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  return np.stack([r, c, np.zeros_like(r)], -1).astype(np.uint8)


def test_inception_crop_is_a_window_and_deterministic_given_rng():
  x = _coord_image(40, 60)
  f = pp.get_preprocess_fn("inception_crop(area_min=20, area_max=60)")
  shapes = set()
  for s in range(12):
    rng = tf.constant([7, s], tf.int64)
    a = f({"image": tf.constant(x), "_rng": rng})
    b = f({"image": tf.constant(x), "_rng": rng})
    assert "_rng" not in a
    a = a["image"].numpy()
    np.testing.assert_array_equal(a, b["image"].numpy())
    r0, c0 = a[0, 0, :2]
    h, w = a.shape[:2]
    np.testing.assert_array_equal(a, x[r0:r0 + h, c0:c0 + w])
    frac = h * w / (40 * 60)
    assert 0.2 - 0.03 <= frac <= 0.6 + 0.03 or frac == 1.0
    shapes.add((h, w, r0, c0))
  assert len(shapes) > 6  # different seeds, different crops
  out = _run("inception_crop(16)", image=tf.constant(x))["image"]  # stateful
  assert out.shape == (16, 16, 3) and out.dtype == tf.uint8


def test_flip_lr_deterministic_and_both_outcomes():
  x = _img(4, 6)
  f = pp.get_preprocess_fn("flip_lr")
  flips = []
  for s in range(16):
    rng = tf.constant([s, 3], tf.int64)
    a = f({"image": tf.constant(x), "_rng": rng})["image"].numpy()
    np.testing.assert_array_equal(
        a, f({"image": tf.constant(x), "_rng": rng})["image"].numpy())
    assert np.array_equal(a, x) or np.array_equal(a, x[:, ::-1])
    flips.append(np.array_equal(a, x[:, ::-1]))
  assert 0 < sum(flips) < 16


def test_random_ops_get_distinct_seeds_per_position():
  """Two flips in one pipeline must not share a seed (else they'd cancel)."""
  x = _img(3, 5)
  f = pp.get_preprocess_fn("flip_lr|flip_lr")
  outs = [f({"image": tf.constant(x), "_rng": tf.constant([s, 0], tf.int64)})
          ["image"].numpy() for s in range(16)]
  assert any(np.array_equal(o, x[:, ::-1]) for o in outs)
  assert any(np.array_equal(o, x) for o in outs)


def test_decode_png_and_pass_through():
  x = _img(6, 5)
  png = tf.io.encode_png(x)
  out = _run("decode", image=png)["image"].numpy()
  np.testing.assert_array_equal(out, x)
  np.testing.assert_array_equal(_run("decode", image=tf.constant(x))["image"], x)
  out = _run("decode(key='img')|keep('img')", img=png)
  np.testing.assert_array_equal(out["img"], x)


def test_general_ops_and_key_arguments():
  d = _run("copy('label', 'labels')|onehot(4)|drop('junk')|keep('labels', 'label')",
           label=tf.constant(2), junk=tf.constant(0))
  assert set(d) == {"labels", "label"}
  np.testing.assert_array_equal(d["labels"], [0, 0, 1, 0])
  d = _run("onehot(5, key='l', key_result='oh', on=0.9, off=0.025)",
           l=tf.constant([1, 3, 3]))
  np.testing.assert_allclose(d["oh"], [0.025, 0.9, 0.025, 0.9, 0.025])
  d = _run("onehot(3, key='l', multi=False)", l=tf.constant([0, 2]))
  np.testing.assert_array_equal(d["l"], [[1, 0, 0], [0, 0, 1]])
  x = _img(4, 4)
  d = _run("value_range(0, 1, inkey='image', outkey='scaled')", image=tf.constant(x))
  np.testing.assert_array_equal(d["image"], x)
  np.testing.assert_allclose(d["scaled"], x / 255, atol=1e-6)
  d = _run("lower", text=tf.constant("ÄB Cd"))
  assert d["text"].numpy().decode() == "Äb cd"
  assert _run("", a=1) == {"a": 1} and _run(None, a=1) == {"a": 1}


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  buf = io.BytesIO()
  words = "a photo of red blue circle square on striped plain background".split()
  rng = np.random.default_rng(1)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([" ".join(rng.choice(words, 6)) for _ in range(200)]),
      model_writer=buf, vocab_size=50, hard_vocab_limit=False, minloglevel=2,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
  path = tmp_path_factory.mktemp("sp") / "m.model"
  path.write_bytes(buf.getvalue())
  return str(path)


def test_tokenize_ops_match_tokenizer(sp_model):
  text = "A Photo of a RED circle"
  d = _run(f"tokenize(max_len=8, model={sp_model!r}, eos='sticky', pad_value=1, "
           "inkey='text')", text=tf.constant(text))
  ref = tok_lib.Tokenizer(sp_model, max_len=8, pad_value=1)(text)
  np.testing.assert_array_equal(d["labels"].numpy(), ref)
  assert d["labels"].shape == (8,)
  # SigLIP2 form: lower first, then tok with the model's pad id.
  d = _run(f"lower(key='text')|tok(length=8, model={sp_model!r}, bos='no', "
           "eos='sticky', key='text')", text=tf.constant(text))
  ref = tok_lib.Tokenizer(sp_model, max_len=8, pad_value="<pad>")(text)
  np.testing.assert_array_equal(d["text"].numpy(), ref)
  with pytest.raises(ValueError, match="tokenize: give the text key"):
    pp.get_preprocess_fn(f"tokenize(8, 'sticky', model={sp_model!r})")
  with pytest.raises(ValueError, match="tok: bos"):
    pp.get_preprocess_fn(f"tok({sp_model!r}, 8, bos='maybe')")


@pytest.mark.parametrize("spec,match", [
    ("decode|frobnicate(3)", "unknown preprocessing op 'frobnicate'"),
    ("resize(224, foo=1)", "bad arguments for preprocessing op 'resize'"),
    ("resize()", "bad arguments for preprocessing op 'resize'"),
    ("resize(224", "syntax error in preprocessing op"),
    ("resize(x)", "must be Python literals"),
    ("a.b(1)", "must be a name or a call"),
    ("resize(438.857)", "resize: size must be integers"),
    ("resize([1, 2, 3])", r"resize: size must be an int or \[height, width\]"),
    ("resize(-4)", "resize: size must be positive"),
    ("resize(4, method='cubicle')", "unknown resize method 'cubicle'"),
    ("central_crop(0.5)", "central_crop: crop_size must be integers"),
    ("value_range(0, 1, 3, 3)", r"value_range: in_min == in_max"),
    ("inception_crop(8, area_min=50, area_max=10)", "inception_crop: need 0 <"),
    ("onehot(0)", "onehot: depth must be a positive int"),
])
def test_errors_name_the_op(spec, match):
  with pytest.raises(ValueError, match=match):
    pp.get_preprocess_fn(spec)


def test_runtime_errors_name_key():
  with pytest.raises(KeyError, match="'resize' needs key 'image'"):
    _run("resize(4)", img=tf.constant(_img(5, 5)))
  with pytest.raises(KeyError, match=r"keep: keys \['label'\]"):
    _run("keep('image', 'label')", image=tf.constant(_img(5, 5)))
  assert pp.get_preprocess_fn("resize(256.0)")  # integral floats are fine
  with pytest.raises(KeyError, match="already registered"):
    pp.register("resize")(lambda: None)


def test_resize_float_size_accepted_when_integral():
  out = _run("resize(4.0)", image=tf.constant(_img(7, 7)))["image"]
  assert out.shape == (4, 4, 3)


def test_in_tf_data_graph_mode():
  f = pp.get_preprocess_fn(
      "decode|inception_crop(8)|flip_lr|value_range(-1,1)|keep('image','label')")
  imgs = [tf.io.encode_png(_img(12 + i, 10, seed=i)).numpy() for i in range(4)]
  ds = tf.data.Dataset.from_tensor_slices(
      {"image": imgs, "label": np.arange(4),
       "_rng": np.arange(8, dtype=np.int64).reshape(4, 2)}).map(f)
  assert ds.element_spec["image"].shape == (8, 8, 3)
  a = [e["image"] for e in ds.as_numpy_iterator()]
  b = [e["image"] for e in ds.as_numpy_iterator()]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
    assert x.min() >= -1 and x.max() <= 1
