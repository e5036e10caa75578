"""Tests for s2d_jax.models.text (big_vision text transformer) and two_towers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2d_jax.models import text, two_towers, vit
from test_models_vit import (_apply, _rand_params, _shapes, np_dense, np_encoder,
                             np_map_head, np_vit)

TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=4)


def _tokens(b=3, l=16, vocab=50, seed=0):
  return jax.random.randint(jax.random.PRNGKey(seed), (b, l), 0, vocab)


def np_text(tokens, p, pool_type="last"):
  x = np.asarray(p["Embed_0"]["embedding"], np.float64)[np.asarray(tokens)]
  x = x + np.asarray(p["pos_embedding"], np.float64)
  x = np_encoder(x, p["Encoder_0"])
  x = {"last": lambda: x[:, -1], "first": lambda: x[:, 0], "mean": lambda: x.mean(1),
       "max": lambda: x.max(1), "map": lambda: np_map_head(x, p["MAPHead_0"])}[pool_type]()
  return np_dense(x, p["head"]) if "head" in p else x


@pytest.mark.parametrize("pool_type", ["last", "first", "mean", "max", "map"])
def test_text_tower_matches_numpy(pool_type):
  m = text.Model(24, **TINY, vocab_size=50, pool_type=pool_type)
  tok = _tokens()
  p = _rand_params(m, tok)
  y, out = _apply(m, p, tok)
  assert y.shape == (3, 24)
  np.testing.assert_allclose(y, np_text(tok, p, pool_type), rtol=2e-4, atol=2e-4)
  # tied-embedding vocabulary logits
  ref = np.asarray(out["transformed"], np.float64) @ np.asarray(
      p["Embed_0"]["embedding"], np.float64).T
  np.testing.assert_allclose(out["vocab_logits"], ref, rtol=1e-4, atol=1e-4)


def test_text_param_names_and_aliases():
  tok = _tokens()
  p = _shapes(text.Model(8, **TINY, vocab_size=50), tok)
  assert set(p) == {"Embed_0", "pos_embedding", "Encoder_0", "head"}
  assert p["Embed_0"]["embedding"].shape == (50, 32)
  assert p["pos_embedding"].shape == (1, 16, 32)
  assert set(p["Encoder_0"]) == {"encoderblock_0", "encoderblock_1", "encoder_norm"}
  ps = _shapes(text.Model(None, **TINY, vocab_size=50, scan=True), tok)
  assert "head" not in ps and "encoderblock" in ps["Encoder_0"]
  # gap/gmp are aliases of mean/max
  m1 = text.Model(None, **TINY, vocab_size=50, pool_type="gap")
  m2 = text.Model(None, **TINY, vocab_size=50, pool_type="mean")
  p2 = _rand_params(m2, tok)
  np.testing.assert_array_equal(_apply(m1, p2, tok)[0], _apply(m2, p2, tok)[0])


def test_text_variant_ignores_patch_and_errors():
  assert text.Model(None, variant="So400m/14").width == 1152
  assert text.Model(None, variant="B", vocab_size=256_000).vocab_size == 256_000
  with pytest.raises(ValueError, match="Cannot do pooling 'cls'"):
    _shapes(text.Model(None, **TINY, vocab_size=50, pool_type="cls"), _tokens())
  with pytest.raises(ValueError, match=r"\(B, L\)"):
    _shapes(text.Model(None, **TINY, vocab_size=50), _tokens()[0])


@pytest.mark.parametrize("variant,vocab,seq_len,emb", [
    ("B", 32_000, 64, 768),        # SigLIP B/16 en
    ("B", 250_000, 64, 768),       # SigLIP B/16 i18n (mc4)
    ("So400m", 32_000, 16, 1152),  # SigLIP So400m/14 @224 (16 tokens)
    ("So400m", 256_000, 64, 1152),  # SigLIP2 (Gemma vocab)
])
def test_full_size_text_tower_shapes(variant, vocab, seq_len, emb):
  m = text.Model(emb, variant=variant, vocab_size=vocab, scan=True)
  s = jax.eval_shape(m.init, jax.random.PRNGKey(0),
                     jax.ShapeDtypeStruct((1, seq_len), jnp.int32))["params"]
  d = vit.decode_variant(variant)
  assert s["Embed_0"]["embedding"].shape == (vocab, d["width"])
  assert s["pos_embedding"].shape == (1, seq_len, d["width"])
  assert s["Encoder_0"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"].shape == (
      d["depth"], d["width"], d["mlp_dim"])
  assert s["head"]["kernel"].shape == (d["width"], emb)


# ---------------------------------------------------------------------------------
# Two towers.

IMG = dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=(8, 8), pool_type="map")
TXT = dict(**TINY, vocab_size=50)


def _two_towers(**kw):
  return two_towers.Model(**{"image": IMG, "text": TXT, "out_dim": (None, 32),
                             "bias_init": -10.0, "temperature_init": 10.0, **kw})


def test_two_towers_matches_numpy_and_normalises():
  m = _two_towers()
  img = jax.random.uniform(jax.random.PRNGKey(0), (3, 32, 32, 3), minval=-1, maxval=1)
  tok = _tokens()
  tb = m.init(jax.random.PRNGKey(1), None, None)["params"]  # only t and b: cheap
  np.testing.assert_allclose(tb["t"], [np.log(10.0)], rtol=1e-6)
  np.testing.assert_allclose(tb["b"], [-10.0])
  p = _shapes(m, img, tok)
  assert set(p) == {"img", "txt", "t", "b"}
  assert "head" not in p["img"] and p["txt"]["head"]["kernel"].shape == (32, 32)
  p = _rand_params(m, img, tok)
  zimg, ztxt, out = _apply(m, p, img, tok)
  ri = np_vit(img, p["img"], 8, "map")
  rt = np_text(tok, p["txt"])
  np.testing.assert_allclose(zimg, ri / np.linalg.norm(ri, axis=1, keepdims=True),
                             rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(ztxt, rt / np.linalg.norm(rt, axis=1, keepdims=True),
                             rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(np.linalg.norm(zimg, axis=1), 1, rtol=1e-6)
  np.testing.assert_allclose(out["t"], np.exp(p["t"]), rtol=1e-6)
  np.testing.assert_array_equal(out["b"], p["b"])
  np.testing.assert_allclose(out["img/norm"][:, 0], np.linalg.norm(ri, axis=1), rtol=2e-4)
  assert "img/encoder" in out and "txt/block00" in out and "txt/vocab_logits" in out


def test_two_towers_one_tower_and_no_bias():
  m = _two_towers(bias_init=None)
  img = jnp.zeros((2, 32, 32, 3))
  p_img = _rand_params(m, img, None)
  assert set(p_img) == {"img", "t"}  # no 'b' without bias_init, no text params
  zimg, ztxt, out = _apply(m, p_img, img, None)
  assert ztxt is None and zimg.shape == (2, 32) and "b" not in out
  p_txt = _rand_params(m, None, _tokens())
  assert set(p_txt) == {"txt", "t"}
  zimg, ztxt, _ = _apply(m, p_txt, None, _tokens())
  assert zimg is None and ztxt.shape == (3, 32)
  with pytest.raises(ValueError, match="Unsupported image_model 'resnet'"):
    _shapes(two_towers.Model(image=IMG, image_model="resnet"), img)


def _np_sigmoid_loss(zimg, ztxt, t, b):
  logits = np.asarray(zimg, np.float64) @ np.asarray(ztxt, np.float64).T * t + b
  n = len(logits)
  total = 0.0
  for i in range(n):
    for j in range(n):
      z = 1.0 if i == j else -1.0
      total += np.log1p(np.exp(-z * logits[i, j]))  # -log sigmoid(z * logit)
  return total / n


def test_sigmoid_loss_matches_numpy_and_grad():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  zi = jax.random.normal(k1, (5, 8))
  zt = jax.random.normal(k2, (5, 8))
  zi /= jnp.linalg.norm(zi, axis=1, keepdims=True)
  zt /= jnp.linalg.norm(zt, axis=1, keepdims=True)
  t, b = jnp.array([10.0]), jnp.array([-10.0])
  loss = two_towers.sigmoid_loss(zi, zt, t, b)
  np.testing.assert_allclose(loss, _np_sigmoid_loss(zi, zt, 10.0, -10.0), rtol=1e-5)
  np.testing.assert_allclose(two_towers.sigmoid_loss(zi, zt, 2.0),
                             _np_sigmoid_loss(zi, zt, 2.0, 0.0), rtol=1e-5)
  # d loss / d b = (1/n) sum_ij (sigmoid(logit_ij) - [i == j])
  g = jax.grad(lambda b_: two_towers.sigmoid_loss(zi, zt, t, b_))(b)
  logits = np.asarray(zi @ zt.T * 10.0 - 10.0, np.float64)
  ref = (1 / (1 + np.exp(-logits)) - np.eye(5)).sum() / 5
  np.testing.assert_allclose(g, [ref], rtol=1e-4)
  with pytest.raises(ValueError, match="same shape"):
    two_towers.sigmoid_loss(zi, zt[:3], t, b)


def test_text_dtype_mm_and_configdict_towers():
  import ml_collections
  tok = _tokens()
  m = text.Model(None, **TINY, vocab_size=50, dtype_mm="bfloat16")
  p = _rand_params(m, tok, scale=0.1)
  y16, o16 = _apply(m, p, tok)
  y32, _ = _apply(text.Model(None, **TINY, vocab_size=50), p, tok)
  assert o16["block00"]["sa"].dtype == jnp.bfloat16
  # bf16 operands (unit roundoff u = 2**-8) and a bf16 output: the operand errors
  # stay below one u of the output scale (as in the ViT test) and the output's own
  # rounding adds at most one u: 2 u of max|y| (measured 0.47 u).
  np.testing.assert_allclose(y16.astype(np.float32), y32, rtol=0,
                             atol=2 * 2 ** -8 * np.abs(y32).max())
  # big_vision configs pass ConfigDicts for the towers
  cfg = ml_collections.ConfigDict(dict(image=IMG, text=TXT, out_dim=(None, 32)))
  mc = two_towers.Model(**cfg)
  s = _shapes(mc, jnp.zeros((1, 32, 32, 3)), tok)
  assert s["txt"]["head"]["kernel"].shape == (32, 32)
