"""Tests for s2d_jax.models.hf: HF transformers SigLIP safetensors <-> big_vision.

The reference is a numpy forward pass written in HF / PyTorch conventions (Linear
y = x W^T + b, Conv2d NCHW weights, heads as consecutive row blocks of q_proj,
nn.MultiheadAttention's stacked in_proj), applied directly to the HF tensors.
"""

import json

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from s2d_jax.models import checkpoint as ck
from s2d_jax.models import hf, siglip, two_towers
from test_models_vit import _apply, _rand_params

CheckpointError = ck.CheckpointError

VH, TH = 4, 2  # vision / text heads
ARCH = dict(image=dict(width=32, depth=2, mlp_dim=48, num_heads=VH, patch_size=(4, 4),
                       pool_type="map"),
            text=dict(width=16, depth=2, mlp_dim=24, num_heads=TH, vocab_size=40),
            out_dim=(None, 32), bias_init=-10.0, temperature_init=10.0)
CONFIG = {"model_type": "siglip", "vision_config": {"num_attention_heads": VH},
          "text_config": {"num_attention_heads": TH}}


def _ln(x, w, b, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _lin(x, w, b):
  return x @ w.astype(np.float64).T + b


def _gelu(x):  # gelu_pytorch_tanh
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _attn(xq, xkv, wq, bq, wk, bk, wv, bv, wo, bo, heads):
  def split(y):  # (B, L, H*hd) -> (B, H, L, hd): head h = columns h*hd:(h+1)*hd
    b, l, _ = y.shape
    return y.reshape(b, l, heads, -1).transpose(0, 2, 1, 3)
  q, k, v = split(_lin(xq, wq, bq)), split(_lin(xkv, wk, bk)), split(_lin(xkv, wv, bv))
  s = q @ k.transpose(0, 1, 3, 2) * q.shape[-1] ** -0.5
  a = np.exp(s - s.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  o = (a @ v).transpose(0, 2, 1, 3).reshape(xq.shape[0], xq.shape[1], -1)
  return _lin(o, wo, bo)


def _layers(x, t, pre, heads):
  i = 0
  while f"{pre}.encoder.layers.{i}.layer_norm1.weight" in t:
    g = lambda n, i=i: t[f"{pre}.encoder.layers.{i}.{n}"].astype(np.float64)
    h = _ln(x, g("layer_norm1.weight"), g("layer_norm1.bias"))
    x = x + _attn(h, h, *(g(f"self_attn.{p}_proj.{wb}") for p in "qkv" for wb in
                          ("weight", "bias")),
                  g("self_attn.out_proj.weight"), g("self_attn.out_proj.bias"), heads)
    h = _ln(x, g("layer_norm2.weight"), g("layer_norm2.bias"))
    x = x + _lin(_gelu(_lin(h, g("mlp.fc1.weight"), g("mlp.fc1.bias"))),
                 g("mlp.fc2.weight"), g("mlp.fc2.bias"))
    i += 1
  return x


def np_hf_siglip(t, pixels, ids):
  t = {k: np.asarray(v, np.float64) for k, v in t.items()}
  # vision: Conv2d on NCHW
  x = np.asarray(pixels, np.float64).transpose(0, 3, 1, 2)  # NCHW
  w = t["vision_model.embeddings.patch_embedding.weight"]  # (D, C, p, p)
  d, c, p, _ = w.shape
  b, _, hh, ww = x.shape
  x = x.reshape(b, c, hh // p, p, ww // p, p)
  x = np.einsum("bchpwq,dcpq->bdhw", x, w) + t["vision_model.embeddings.patch_embedding.bias"][
      None, :, None, None]
  x = x.reshape(b, d, -1).transpose(0, 2, 1)  # flatten(2).transpose(1, 2)
  x = x + t["vision_model.embeddings.position_embedding.weight"][None]
  x = _layers(x, t, "vision_model", VH)
  x = _ln(x, t["vision_model.post_layernorm.weight"], t["vision_model.post_layernorm.bias"])
  probe = np.tile(t["vision_model.head.probe"], [b, 1, 1])
  ip_w, ip_b = t["vision_model.head.attention.in_proj_weight"], t[
      "vision_model.head.attention.in_proj_bias"]
  a = _attn(probe, x, ip_w[:d], ip_b[:d], ip_w[d:2 * d], ip_b[d:2 * d], ip_w[2 * d:],
            ip_b[2 * d:], t["vision_model.head.attention.out_proj.weight"],
            t["vision_model.head.attention.out_proj.bias"], VH)
  h = _ln(a, t["vision_model.head.layernorm.weight"], t["vision_model.head.layernorm.bias"])
  img = (a + _lin(_gelu(_lin(h, t["vision_model.head.mlp.fc1.weight"],
                             t["vision_model.head.mlp.fc1.bias"])),
                  t["vision_model.head.mlp.fc2.weight"], t["vision_model.head.mlp.fc2.bias"]))[:, 0]
  # text
  y = t["text_model.embeddings.token_embedding.weight"][np.asarray(ids)]
  y = y + t["text_model.embeddings.position_embedding.weight"][None, :ids.shape[1]]
  y = _layers(y, t, "text_model", TH)
  y = _ln(y, t["text_model.final_layer_norm.weight"], t["text_model.final_layer_norm.bias"])
  txt = _lin(y[:, -1], t["text_model.head.weight"], t["text_model.head.bias"])
  img /= np.linalg.norm(img, axis=-1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
  logits = txt @ img.T * np.exp(t["logit_scale"]) + t["logit_bias"]
  return img, txt, logits


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  model = two_towers.Model(**ARCH)
  img = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  tok = np.random.default_rng(1).integers(0, 40, (2, 6)).astype(np.int32)
  params = jax.tree.map(np.asarray, _rand_params(model, img, tok))
  d = tmp_path_factory.mktemp("hf")
  tensors = hf.big_vision_to_hf(params)
  save_file(tensors, str(d / "model.safetensors"))
  (d / "config.json").write_text(json.dumps(CONFIG))
  out = _apply(model, params, img, tok)
  return model, params, img, tok, d, tensors, out


def test_hf_layout_names_and_shapes(setup):
  _, params, _, _, _, t, _ = setup
  assert t["vision_model.embeddings.patch_embedding.weight"].shape == (32, 3, 4, 4)
  assert t["vision_model.embeddings.position_embedding.weight"].shape == (16, 32)
  assert t["vision_model.encoder.layers.1.self_attn.q_proj.weight"].shape == (32, 32)
  assert t["vision_model.encoder.layers.0.mlp.fc1.weight"].shape == (48, 32)
  assert t["vision_model.head.attention.in_proj_weight"].shape == (96, 32)
  assert t["vision_model.head.probe"].shape == (1, 1, 32)
  assert t["text_model.head.weight"].shape == (32, 16)
  assert t["logit_scale"].shape == (1,) and t["logit_bias"].shape == (1,)
  assert len(t) == len(ck.flatten(params)) - 4  # q, k, v kernels+biases -> in_proj (2)


def test_hf_numpy_forward_matches_our_model(setup):
  """HF semantics on HF tensors == our model on the mapped params."""
  _, _, img, tok, _, t, (zimg, ztxt, out) = setup
  ri, rt, logits = np_hf_siglip(t, img, tok)
  np.testing.assert_allclose(zimg, ri, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(ztxt, rt, rtol=2e-4, atol=2e-5)
  ours = np.asarray(ztxt) @ np.asarray(zimg).T * np.asarray(out["t"]) + np.asarray(out["b"])
  np.testing.assert_allclose(ours, logits, rtol=2e-4, atol=2e-4)


def test_load_hf_equals_npz(setup, tmp_path):
  model, params, img, tok, d, _, (zimg, ztxt, _) = setup
  m_hf, p_hf = siglip.load_hf(str(d))
  jax.tree.map(np.testing.assert_array_equal, p_hf, params)  # exact inverse
  siglip.save(str(tmp_path / "c.npz"), params)
  m_np, p_np = siglip.load(str(tmp_path / "c.npz"))
  assert m_hf == m_np
  z_hf = _apply(m_hf, p_hf, img, tok)
  np.testing.assert_array_equal(z_hf[0], zimg)
  np.testing.assert_array_equal(z_hf[1], ztxt)
  # overrides pass through, e.g. scan layout
  _, p_scan = siglip.load_hf(str(d / "model.safetensors"), scan=True)
  assert "encoderblock" in p_scan["img"]["Transformer"]


def test_heads_from_config_argument_or_table(setup, tmp_path):
  _, params, _, _, _, t, _ = setup
  save_file(t, str(tmp_path / "w.safetensors"))  # no config.json next to it
  with pytest.raises(CheckpointError, match="number of attention heads of the image"):
    hf.load_hf_params(str(tmp_path / "w.safetensors"))
  p = hf.load_hf_params(str(tmp_path / "w.safetensors"), num_heads=VH, text_num_heads=TH)
  jax.tree.map(np.testing.assert_array_equal, p, params)
  with pytest.raises(CheckpointError, match="cannot be split into 5 heads"):
    hf.load_hf_params(str(tmp_path / "w.safetensors"), num_heads=5, text_num_heads=TH)
  # A named variant ('mu': width 32, depth 1, mlp 128, 2 heads) needs no config.
  mu = two_towers.Model(image=dict(variant="mu/8", pool_type="map"),
                        text=dict(variant="mu", vocab_size=10), out_dim=(None, 32))
  pm = jax.tree.map(np.asarray, _rand_params(mu, np.zeros((1, 16, 16, 3), np.float32),
                                             np.zeros((1, 4), np.int32)))
  back = hf.hf_to_big_vision(hf.big_vision_to_hf(pm))
  jax.tree.map(np.testing.assert_array_equal, back, pm)


def test_hf_variants_prefix_shards_bf16_naflex(setup, tmp_path):
  _, params, _, _, _, t, _ = setup
  # 'model.' wrapper prefix and a position_ids buffer are tolerated
  pre = {("model." + k if k.startswith(("vision", "text")) else k): v for k, v in t.items()}
  pre["text_model.embeddings.position_ids"] = np.arange(6)[None]
  jax.tree.map(np.testing.assert_array_equal, hf.hf_to_big_vision(pre, CONFIG), params)
  # sharded directory
  d = tmp_path / "sharded"
  d.mkdir()
  keys = sorted(t)
  save_file({k: t[k] for k in keys[::2]}, str(d / "model-00001-of-00002.safetensors"))
  save_file({k: t[k] for k in keys[1::2]}, str(d / "model-00002-of-00002.safetensors"))
  (d / "config.json").write_text(json.dumps(CONFIG))
  jax.tree.map(np.testing.assert_array_equal, hf.load_hf_params(str(d)), params)
  save_file({keys[0]: t[keys[0]]}, str(d / "model-00003-of-00002.safetensors"))
  with pytest.raises(CheckpointError, match="also appear in another shard"):
    hf.load_hf_params(str(d))
  # bfloat16 tensors stay bfloat16
  tb = {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}
  pb = hf.hf_to_big_vision(tb, CONFIG)
  assert pb["img"]["embedding"]["kernel"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(pb["img"]["embedding"]["kernel"],
                                params["img"]["embedding"]["kernel"].astype(ml_dtypes.bfloat16))
  # SigLIP2 NaFlex: Linear patch embedding over (p, p, C)-flattened patches
  k = params["img"]["embedding"]["kernel"]  # (p, p, C, D)
  nf = dict(t)
  nf["vision_model.embeddings.patch_embedding.weight"] = k.reshape(-1, k.shape[-1]).T
  pn = hf.hf_to_big_vision(nf, CONFIG)
  np.testing.assert_array_equal(pn["img"]["embedding"]["kernel"], k)


def test_hf_errors(setup, tmp_path):
  _, _, _, _, d, t, _ = setup
  with pytest.raises(CheckpointError, match="unexpected tensor.*vision_model.foo.weight"):
    hf.hf_to_big_vision({**t, "vision_model.foo.weight": np.zeros(2, np.float32)}, CONFIG)
  with pytest.raises(CheckpointError, match="unexpected tensor.*layers.0.self_attn.rope"):
    hf.hf_to_big_vision({**t, "text_model.encoder.layers.0.self_attn.rope": np.zeros(2)},
                        CONFIG)
  with pytest.raises(CheckpointError, match="Not a HF SigLIP checkpoint"):
    hf.hf_to_big_vision({"encoder.weight": np.zeros(2, np.float32)})
  with pytest.raises(CheckpointError, match="missing key in HF checkpoint: logit_scale"):
    hf.hf_to_big_vision({k: v for k, v in t.items() if k != "logit_scale"}, CONFIG)
  with pytest.raises(CheckpointError, match="vision_model.post_layernorm.bias.*int32|"
                     "img/Transformer/encoder_norm/bias.*int32"):
    hf.hf_to_big_vision({**t, "vision_model.post_layernorm.bias": np.zeros(32, np.int32)},
                        CONFIG)
  # missing tensor: the model-level check names the big_vision key
  (tmp_path / "m").mkdir()
  save_file({k: v for k, v in t.items() if k != "text_model.encoder.layers.1.mlp.fc2.bias"},
            str(tmp_path / "m" / "model.safetensors"))
  (tmp_path / "m" / "config.json").write_text(json.dumps(CONFIG))
  with pytest.raises(CheckpointError, match="missing key.*txt/Encoder_0/encoderblock_1/"
                     "MlpBlock_0/Dense_1/bias"):
    siglip.load_hf(str(tmp_path / "m"))
  data = (d / "model.safetensors").read_bytes()
  (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match="not a readable safetensors file"):
    hf.load_hf_params(str(tmp_path / "trunc.safetensors"), num_heads=4, text_num_heads=2)
  with pytest.raises(FileNotFoundError):
    hf.load_hf_params(str(tmp_path / "nothing_here"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="No \\*.safetensors"):
    hf.load_hf_params(str(tmp_path / "empty"))


def test_load_hf_refuses_nonfinite_unless_allowed(setup, tmp_path):
  """NaN / Inf tensors are named by their big_vision key (on main: loaded silently)."""
  *_, tensors, _ = setup
  t = dict(tensors)
  key = "vision_model.embeddings.patch_embedding.bias"
  t[key] = np.array(t[key])
  t[key][1] = np.inf
  (tmp_path / "config.json").write_text(json.dumps(CONFIG))
  save_file(t, str(tmp_path / "model.safetensors"))
  with pytest.raises(ck.CheckpointError,
                     match=r"img/embedding/bias \(0 NaN, 1 Inf of \d+ values\).*"
                     "allow_nonfinite=True"):
    siglip.load_hf(str(tmp_path))
  with pytest.raises(ck.CheckpointError, match="img/embedding/bias"):
    hf.load_hf_params(str(tmp_path))
  with pytest.warns(ck.NonFiniteWarning, match="img/embedding/bias"):
    _, p = siglip.load_hf(str(tmp_path), allow_nonfinite=True)
  assert np.isinf(np.asarray(p["img"]["embedding"]["bias"])).sum() == 1
