"""Hugging Face `transformers` SigLIP / SigLIP2 safetensors <-> big_vision parameters.

HF's `SiglipModel` (used by the SigLIP and the fixed-resolution SigLIP2 checkpoints)
stores PyTorch conventions: a Linear weight is (out, in) with y = x W^T + b, the patch
Conv2d weight is (D, C, kh, kw), attention projections are (H*hd, D) with head h in
rows h*hd .. (h+1)*hd - 1, and the MAP head uses `nn.MultiheadAttention`, whose
`in_proj_weight` stacks [Wq; Wk; Wv] (3D, D). The mapping to big_vision names:

  vision_model.embeddings.patch_embedding.weight (D,C,p,p)  img/embedding/kernel (p,p,C,D)
      (SigLIP2 NaFlex `Siglip2Model`: Linear (D, p*p*C), patches flattened (p, p, C))
  vision_model.embeddings.position_embedding.weight (N, D) img/pos_embedding (1, N, D)
  vision_model.encoder.layers.{i}.layer_norm1/2           .../encoderblock_{i}/LayerNorm_0/1
  vision_model.encoder.layers.{i}.self_attn.q/k/v_proj    .../query|key|value: W^T -> (D, H, hd)
  vision_model.encoder.layers.{i}.self_attn.out_proj      .../out: W^T -> (H, hd, D)
  vision_model.encoder.layers.{i}.mlp.fc1/fc2             .../MlpBlock_0/Dense_0/1: W^T
  vision_model.post_layernorm                             img/Transformer/encoder_norm
  vision_model.head.probe / attention / layernorm / mlp   img/MAPHead_0/...
  text_model.embeddings.token_embedding.weight (V, D)     txt/Embed_0/embedding
  text_model.embeddings.position_embedding.weight (L, D)  txt/pos_embedding (1, L, D)
  text_model.encoder.layers.{i}...                        txt/Encoder_0/encoderblock_{i}/...
  text_model.final_layer_norm                             txt/Encoder_0/encoder_norm
  text_model.head                                         txt/head
  logit_scale (1,), logit_bias (1,)                       t, b  (HF: logits*exp(scale)+bias)

LayerNorm `weight` is big_vision's `scale`. The number of heads is not stored in the
weights: it is read from `config.json` next to the weights, given explicitly, or
taken from big_vision's variants table when (width, depth, mlp_dim) name a variant.

For a NaFlex checkpoint, the learned (g x g) position table is used at its native
grid; NaFlex's per-image antialiased resizing is not reproduced (identical results
for square images at g*p pixels; other resolutions use big_vision's resampling).
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Mapping, Optional

import numpy as np

from s2d_jax.models import checkpoint as ckpt_lib
from s2d_jax.models import vit

CheckpointError = ckpt_lib.CheckpointError

_LAYER_RE = re.compile(r"(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)")

# HF per-layer suffix -> (big_vision path inside the block, kind)
_BLOCK_MAP = {
    "layer_norm1.weight": ("LayerNorm_0/scale", "vec"),
    "layer_norm1.bias": ("LayerNorm_0/bias", "vec"),
    "layer_norm2.weight": ("LayerNorm_1/scale", "vec"),
    "layer_norm2.bias": ("LayerNorm_1/bias", "vec"),
    "self_attn.q_proj.weight": ("MultiHeadDotProductAttention_0/query/kernel", "qkv"),
    "self_attn.q_proj.bias": ("MultiHeadDotProductAttention_0/query/bias", "qkv_b"),
    "self_attn.k_proj.weight": ("MultiHeadDotProductAttention_0/key/kernel", "qkv"),
    "self_attn.k_proj.bias": ("MultiHeadDotProductAttention_0/key/bias", "qkv_b"),
    "self_attn.v_proj.weight": ("MultiHeadDotProductAttention_0/value/kernel", "qkv"),
    "self_attn.v_proj.bias": ("MultiHeadDotProductAttention_0/value/bias", "qkv_b"),
    "self_attn.out_proj.weight": ("MultiHeadDotProductAttention_0/out/kernel", "out"),
    "self_attn.out_proj.bias": ("MultiHeadDotProductAttention_0/out/bias", "vec"),
    "mlp.fc1.weight": ("MlpBlock_0/Dense_0/kernel", "linear"),
    "mlp.fc1.bias": ("MlpBlock_0/Dense_0/bias", "vec"),
    "mlp.fc2.weight": ("MlpBlock_0/Dense_1/kernel", "linear"),
    "mlp.fc2.bias": ("MlpBlock_0/Dense_1/bias", "vec"),
}

# Non-layer HF names -> (big_vision name, kind)
_TOP_MAP = {
    "vision_model.embeddings.patch_embedding.bias": ("img/embedding/bias", "vec"),
    "vision_model.embeddings.position_embedding.weight": ("img/pos_embedding", "posemb"),
    "vision_model.post_layernorm.weight": ("img/Transformer/encoder_norm/scale", "vec"),
    "vision_model.post_layernorm.bias": ("img/Transformer/encoder_norm/bias", "vec"),
    "vision_model.head.probe": ("img/MAPHead_0/probe", "vec"),
    "vision_model.head.layernorm.weight": ("img/MAPHead_0/LayerNorm_0/scale", "vec"),
    "vision_model.head.layernorm.bias": ("img/MAPHead_0/LayerNorm_0/bias", "vec"),
    "vision_model.head.mlp.fc1.weight": ("img/MAPHead_0/MlpBlock_0/Dense_0/kernel", "linear"),
    "vision_model.head.mlp.fc1.bias": ("img/MAPHead_0/MlpBlock_0/Dense_0/bias", "vec"),
    "vision_model.head.mlp.fc2.weight": ("img/MAPHead_0/MlpBlock_0/Dense_1/kernel", "linear"),
    "vision_model.head.mlp.fc2.bias": ("img/MAPHead_0/MlpBlock_0/Dense_1/bias", "vec"),
    "vision_model.head.attention.out_proj.weight": (
        "img/MAPHead_0/MultiHeadDotProductAttention_0/out/kernel", "out"),
    "vision_model.head.attention.out_proj.bias": (
        "img/MAPHead_0/MultiHeadDotProductAttention_0/out/bias", "vec"),
    "text_model.embeddings.token_embedding.weight": ("txt/Embed_0/embedding", "vec"),
    "text_model.embeddings.position_embedding.weight": ("txt/pos_embedding", "posemb"),
    "text_model.final_layer_norm.weight": ("txt/Encoder_0/encoder_norm/scale", "vec"),
    "text_model.final_layer_norm.bias": ("txt/Encoder_0/encoder_norm/bias", "vec"),
    "text_model.head.weight": ("txt/head/kernel", "linear"),
    "text_model.head.bias": ("txt/head/bias", "vec"),
    "logit_scale": ("t", "scalar"),
    "logit_bias": ("b", "scalar"),
}
_IN_PROJ = ("vision_model.head.attention.in_proj_weight",
            "vision_model.head.attention.in_proj_bias")
_PATCH_W = "vision_model.embeddings.patch_embedding.weight"
_ENC = {"vision_model": "img/Transformer", "text_model": "txt/Encoder_0"}


# ----------------------------------------------------------------------------------
# Reading safetensors.


def read_safetensors(path_or_dir: str) -> tuple[dict[str, np.ndarray], dict]:
  """All tensors of a HF checkpoint (single file, or a dir with one or more shards)
  plus its config.json (or {}). bfloat16 tensors come back as ml_dtypes.bfloat16."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  config = {}
  if os.path.isdir(path_or_dir):
    files = sorted(glob.glob(os.path.join(path_or_dir, "*.safetensors")))
    if not files:
      raise FileNotFoundError(f"No *.safetensors files in {path_or_dir}")
    cfg_path = os.path.join(path_or_dir, "config.json")
    if os.path.exists(cfg_path):
      with open(cfg_path) as f:
        config = json.load(f)
  elif os.path.exists(path_or_dir):
    files = [path_or_dir]
    cfg_path = os.path.join(os.path.dirname(path_or_dir), "config.json")
    if os.path.exists(cfg_path):
      with open(cfg_path) as f:
        config = json.load(f)
  else:
    raise FileNotFoundError(f"HF checkpoint not found: {path_or_dir}")
  tensors: dict[str, np.ndarray] = {}
  for fn in files:
    try:
      part = load_file(fn)
    except Exception as e:  # safetensors raises its own SafetensorError types
      raise CheckpointError(f"{fn}: not a readable safetensors file (corrupt or "
                            f"truncated?): {type(e).__name__}: {e}") from e
    dup = tensors.keys() & part.keys()
    if dup:
      raise CheckpointError(f"{fn}: tensors {sorted(dup)} also appear in another shard")
    tensors.update(part)
  return tensors, config


def _strip_prefix(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops a wrapper prefix such as 'model.' in front of vision_model./text_model."""
  out = {}
  for k, v in tensors.items():
    m = re.search(r"(vision_model\.|text_model\.|logit_scale$|logit_bias$)", k)
    out[k[m.start():] if m else k] = v
  return out


# ----------------------------------------------------------------------------------
# HF -> big_vision.


def _heads_from_table(width: int, depth: int, mlp: int, tower: str) -> int:
  for (w, d, m, h) in vit.VARIANTS.values():
    if (w, d, m) == (width, depth, mlp):
      return h
  raise CheckpointError(
      f"Cannot tell the number of attention heads of the {tower} tower "
      f"(width {width}, depth {depth}, mlp {mlp} is no big_vision variant) and no "
      f"config.json was found; pass num_heads=... / text_num_heads=...")


def _convert(v: np.ndarray, kind: str, heads: int, name: str) -> np.ndarray:
  if kind == "vec":
    return v
  if kind == "scalar":
    return v.reshape(1)
  if kind == "posemb":
    return v[None]
  if kind == "linear":
    return v.T
  split = v.shape[0] if kind in ("qkv", "qkv_b") else v.shape[-1]
  if v.ndim != (1 if kind == "qkv_b" else 2) or split % heads:
    raise CheckpointError(f"{name}: shape {v.shape} cannot be split into {heads} heads")
  if kind == "qkv_b":  # (H*hd,) -> (H, hd)
    return v.reshape(heads, -1)
  d_out, d_in = v.shape
  if kind == "qkv":  # (H*hd, D) -> (D, H, hd)
    return v.T.reshape(d_in, heads, d_out // heads)
  if kind == "out":  # (D, H*hd) -> (H, hd, D)
    return v.T.reshape(heads, d_in // heads, d_out)
  raise AssertionError(kind)


def hf_to_big_vision(tensors: Mapping[str, np.ndarray], config: Optional[dict] = None, *,
                     num_heads: Optional[int] = None,
                     text_num_heads: Optional[int] = None) -> dict:
  """Maps HF SigLIP tensors to a big_vision two-towers tree (loop layout).

  Raises CheckpointError for unknown tensor names, or shapes that do not fit.
  """
  config = config or {}
  t = _strip_prefix(tensors)
  towers = {p for p in ("vision_model", "text_model") if any(k.startswith(p + ".")
                                                              for k in t)}
  if not towers:
    raise CheckpointError("Not a HF SigLIP checkpoint: no vision_model.* or "
                          f"text_model.* tensors (e.g. {sorted(t)[:5]})")
  depth = {p: 1 + max([int(m.group(2)) for k in t if (m := _LAYER_RE.fullmatch(k))
                       and m.group(1) == p], default=-1) for p in towers}
  heads = {}
  for p, given, cfg_key in (("vision_model", num_heads, "vision_config"),
                            ("text_model", text_num_heads, "text_config")):
    if p not in towers:
      continue
    h = given or config.get(cfg_key, {}).get("num_attention_heads")
    if h is None:
      fc1 = t.get(f"{p}.encoder.layers.0.mlp.fc1.weight")
      if fc1 is None:
        raise CheckpointError(f"missing key in HF checkpoint: {p}.encoder.layers.0.mlp."
                              "fc1.weight")
      h = _heads_from_table(fc1.shape[1], depth[p], fc1.shape[0],
                            "image" if p == "vision_model" else "text")
    heads[p] = int(h)

  flat: dict[str, np.ndarray] = {}
  unknown = []
  for k, v in t.items():
    v = np.asarray(v)
    if m := _LAYER_RE.fullmatch(k):
      tower, i, rest = m.groups()
      if rest not in _BLOCK_MAP:
        unknown.append(k)
        continue
      bv, kind = _BLOCK_MAP[rest]
      flat[f"{_ENC[tower]}/encoderblock_{i}/{bv}"] = _convert(v, kind, heads[tower], k)
    elif k in _TOP_MAP:
      bv, kind = _TOP_MAP[k]
      flat[bv] = _convert(v, kind, heads.get(k.split(".")[0], 1), k)
    elif k == _PATCH_W:
      if v.ndim == 4:  # Conv2d (D, C, kh, kw) -> (kh, kw, C, D)
        flat["img/embedding/kernel"] = v.transpose(2, 3, 1, 0)
      elif v.ndim == 2:  # NaFlex Linear (D, p*p*C), patches flattened (p, p, C)
        d, n_in = v.shape
        c = int(config.get("vision_config", {}).get("num_channels", 3))
        p = int(round(np.sqrt(n_in // c)))
        if p * p * c != n_in:
          raise CheckpointError(f"{k}: shape {v.shape} is not (D, p*p*{c})")
        flat["img/embedding/kernel"] = v.T.reshape(p, p, c, d)
      else:
        raise CheckpointError(f"{k}: unexpected shape {v.shape}")
    elif k in _IN_PROJ:
      d3 = v.shape[0]
      if d3 % 3:
        raise CheckpointError(f"{k}: first dimension {d3} is not 3 * width")
      names = ("query", "key", "value")
      for name, part in zip(names, np.split(v, 3, axis=0)):
        kind = "qkv" if k.endswith("weight") else "qkv_b"
        leaf = "kernel" if kind == "qkv" else "bias"
        flat[f"img/MAPHead_0/MultiHeadDotProductAttention_0/{name}/{leaf}"] = _convert(
            part, kind, heads["vision_model"], k)
    elif k.endswith("position_ids"):
      continue  # a non-parameter buffer some versions save
    else:
      unknown.append(k)
  if unknown:
    raise CheckpointError("unexpected tensor(s) in HF checkpoint (no big_vision "
                          "equivalent): " + ", ".join(sorted(unknown)))
  for name, v in flat.items():
    ckpt_lib.check_float(v, name)
  if "t" not in flat:
    raise CheckpointError("missing key in HF checkpoint: logit_scale")
  return ckpt_lib.unflatten(flat)


def load_hf_params(path_or_dir: str, *, num_heads: Optional[int] = None,
                   text_num_heads: Optional[int] = None,
                   allow_nonfinite: bool = False) -> dict:
  """Reads a HF SigLIP / SigLIP2 checkpoint into big_vision two-towers params.

  Params holding NaN / Inf raise a CheckpointError naming them (big_vision keys)
  and their counts, unless `allow_nonfinite=True` (then a `NonFiniteWarning`).
  """
  tensors, config = read_safetensors(path_or_dir)
  params = hf_to_big_vision(tensors, config, num_heads=num_heads,
                            text_num_heads=text_num_heads)
  ckpt_lib.check_finite(params, allow=allow_nonfinite, where=path_or_dir)
  return params


# ----------------------------------------------------------------------------------
# big_vision -> HF (the inverse; for export and tests).


def big_vision_to_hf(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Inverse of `hf_to_big_vision` (Conv2d patch embedding; loop or scan params)."""
  params = ckpt_lib.convert_layout(params, scan=False)
  flat = {k: np.asarray(v) for k, v in ckpt_lib.flatten(params).items()}
  inv_block = {bv: hf for hf, (bv, _) in _BLOCK_MAP.items()}
  inv_top = {bv: hf for hf, (bv, _) in _TOP_MAP.items()}
  out: dict[str, np.ndarray] = {}
  for name, v in flat.items():
    if m := re.fullmatch(r"(img/Transformer|txt/Encoder_0)/encoderblock_(\d+)/(.+)", name):
      enc, i, rest = m.groups()
      tower = "vision_model" if enc.startswith("img") else "text_model"
      hf = f"{tower}.encoder.layers.{i}.{inv_block[rest]}"
      kind = _BLOCK_MAP[inv_block[rest]][1]
    elif name in inv_top:
      hf = inv_top[name]
      kind = _TOP_MAP[hf][1]
    elif name == "img/embedding/kernel":
      out[_PATCH_W] = np.ascontiguousarray(v.transpose(3, 2, 0, 1))
      continue
    elif name.startswith("img/MAPHead_0/MultiHeadDotProductAttention_0/") and \
        name.split("/")[-2] in ("query", "key", "value"):
      continue  # assembled into in_proj below
    else:
      raise CheckpointError(f"{name!r} has no HF SigLIP equivalent")
    if kind == "vec":
      w = v
    elif kind == "scalar":
      w = v.reshape(1)
    elif kind == "posemb":
      w = v[0]
    elif kind == "linear":
      w = v.T
    elif kind == "qkv":
      w = v.reshape(v.shape[0], -1).T
    elif kind == "qkv_b":
      w = v.reshape(-1)
    elif kind == "out":
      w = v.reshape(-1, v.shape[-1]).T
    out[hf] = np.ascontiguousarray(w)
  mh = "img/MAPHead_0/MultiHeadDotProductAttention_0/"
  if mh + "query/kernel" in flat:
    out[_IN_PROJ[0]] = np.concatenate(
        [flat[mh + f"{n}/kernel"].reshape(flat[mh + f"{n}/kernel"].shape[0], -1).T
         for n in ("query", "key", "value")], axis=0)
    out[_IN_PROJ[1]] = np.concatenate(
        [flat[mh + f"{n}/bias"].reshape(-1) for n in ("query", "key", "value")])
  # C order matters: safetensors writes the raw buffer of whatever it is given.
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_hf(path: str, params: Mapping[str, Any]) -> None:
  """Writes `params` as a HF-layout `model.safetensors` file (weights only)."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  save_file(big_vision_to_hf(params), path)
