"""SigLIP / SigLIP2: load big_vision checkpoints into `two_towers.Model`, and back.

    model, params = load("gs://big_vision/siglip/webli_en_b16_224_63724782.npz")
    zimg, ztxt, out = model.apply({"params": params}, images, tokens)
    probs = sigmoid(out["t"] * zimg @ ztxt.T + out["b"])

Everything about the architecture is read off the parameter shapes (`infer_config`):

    img/embedding/kernel          (p, p, 3, D)         patch size p, width D
    img/pos_embedding             (1, (R/p)^2, D)      resolution R
    img/Transformer/encoderblock*  depth; mlp_dim from MlpBlock_0/Dense_0 (D, M);
                                  heads from attention query kernel (D, H, D/H)
    img/MAPHead_0 | img/cls | -   pool type map | tok | gap;   img/head -> out_dim[0]
    txt/Embed_0/embedding         (V, D_t)             vocab size V
    txt/pos_embedding             (1, L, D_t)          text length L
    txt/head/kernel               (D_t, C)             out_dim[1] = C
    b present                     bias_init set (SigLIP); absent for CLIP-style / LiT

Overrides (`load(path, **overrides)`): `scan`, `dtype_mm`, `remat_policy` (both
towers), `res` (image resolution; the posemb is resampled bilinearly, as
big_vision), `image=dict(...)` / `text=dict(...)` (tower kwargs, e.g. pool_type),
`towers=('img',)` (load only the image tower; likewise ('txt',)), `dont_load`
(regexes, e.g. 'img/head/.*': those params keep the model's random init),
`param_dtype` (cast every leaf), `seed` (for the init of not-loaded params), and
any `two_towers.Model` field (`out_dim`, `temperature_init`, `bias_init`).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from s2d_jax.models import checkpoint as ckpt_lib
from s2d_jax.models import text as text_lib
from s2d_jax.models import two_towers
from s2d_jax.models import vit

CheckpointError = ckpt_lib.CheckpointError
TOWERS = ("img", "txt")

# Public big_vision checkpoints by name (as big_vision's two_towers.VANITY_NAMES):
# `load("SigLIP2 B/16 384")` == `load("gs://big_vision/siglip2/siglip2_b16_384.npz")`.
_BV = "gs://big_vision/"
CHECKPOINTS = {
    "SigLIP B/16 224": _BV + "siglip/webli_en_b16_224_63724782.npz",
    "SigLIP B/16 256": _BV + "siglip/webli_en_b16_256_60500360.npz",
    "SigLIP B/16 384": _BV + "siglip/webli_en_b16_384_68578854.npz",
    "SigLIP B/16 512": _BV + "siglip/webli_en_b16_512_68580893.npz",
    "SigLIP L/16 256": _BV + "siglip/webli_en_l16_256_60552751.npz",
    "SigLIP L/16 384": _BV + "siglip/webli_en_l16_384_63634585.npz",
    "SigLIP So400m/14 224": _BV + "siglip/webli_en_so400m_224_57633886.npz",
    "SigLIP So400m/14 384": _BV + "siglip/webli_en_so400m_384_58765454.npz",
    "SigLIP B/16-i18n 256": _BV + "siglip/webli_i18n_b16_256_66117334.npz",
    "SigLIP So400m/16-i18n 256": _BV + "siglip/webli_i18n_so400m_16_256_78061115.npz",
    **{f"SigLIP2 {v} {r}": _BV + f"siglip2/siglip2_{v.lower().replace('/', '')}_{r}.npz"
       for v, rs in (("B/16", (224, 256, 384, 512)), ("B/32", (256,)),
                     ("L/16", (256, 384, 512)), ("So400m/14", (224, 384)),
                     ("So400m/16", (256, 384, 512)), ("g-opt/16", (256, 384)))
       for r in rs},
}


def resolve(path: str) -> str:
  """A name from CHECKPOINTS -> its gs:// path; anything else unchanged."""
  return CHECKPOINTS.get(path, path)


# ----------------------------------------------------------------------------------
# Reading the architecture off the shapes.


def _shape(x) -> tuple[int, ...]:
  """Shape of an array or of a jax.ShapeDtypeStruct (so eval_shape trees work too)."""
  return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _get(tree: Mapping[str, Any], path: str, where: str):
  node = tree
  for part in path.split("/"):
    if not isinstance(node, Mapping) or part not in node:
      raise CheckpointError(f"missing key in checkpoint: {where}/{path}")
    node = node[part]
  return node


def _encoder_dims(enc: Mapping[str, Any], where: str) -> dict[str, Any]:
  """depth, mlp_dim, num_heads and layout of a `Transformer` / `Encoder_0` subtree."""
  if "encoderblock" in enc:
    blk, lead = enc["encoderblock"], 1
    q = _shape(_get(blk, "MultiHeadDotProductAttention_0/query/kernel",
                      where + "/encoderblock"))
    depth, scan = q[0], True
  else:
    idx = ckpt_lib._block_indices(enc, where)  # pylint: disable=protected-access
    if not idx:
      raise CheckpointError(f"missing key in checkpoint: {where}/encoderblock_0 "
                            "(no encoder blocks found)")
    blk, lead, depth, scan = enc["encoderblock_0"], 0, len(idx), False
    where = where + "/encoderblock_0"
  q = _shape(_get(blk, "MultiHeadDotProductAttention_0/query/kernel", where))
  m = _shape(_get(blk, "MlpBlock_0/Dense_0/kernel", where))
  if len(q) != 3 + lead or len(m) != 2 + lead:
    raise CheckpointError(f"{where}: unexpected attention/MLP kernel ranks {q}, {m}")
  return dict(depth=int(depth), mlp_dim=int(m[-1]), num_heads=int(q[-2]), scan=scan)


def _named(width, dims):
  name = vit.variant_name(width, dims["depth"], dims["mlp_dim"], dims["num_heads"])
  return name


def infer_image_config(img: Mapping[str, Any], where: str = "img") -> tuple[dict, dict]:
  """(vit.Model kwargs incl. num_classes, info) for a ViT parameter tree."""
  k = _shape(_get(img, "embedding/kernel", where))
  if len(k) != 4:
    raise CheckpointError(f"{where}/embedding/kernel must be (p, p, C, D), got {k}")
  ph, pw, _, width = map(int, k)
  dims = _encoder_dims(_get(img, "Transformer", where), where + "/Transformer")
  cfg: dict[str, Any] = {}
  name = _named(width, dims)
  if name is not None and ph == pw:
    cfg["variant"] = f"{name}/{ph}"
  else:
    cfg.update(width=width, depth=dims["depth"], mlp_dim=dims["mlp_dim"],
               num_heads=dims["num_heads"], patch_size=(ph, pw))
  cfg["scan"] = dims["scan"]
  if "MAPHead_0" in img:
    cfg["pool_type"] = "map"
  elif "cls" in img:
    cfg["pool_type"] = "tok"
  else:
    cfg["pool_type"] = "gap"
  info = {"layout": "scan" if dims["scan"] else "loop"}
  if "pos_embedding" in img:
    n = _shape(img["pos_embedding"])[1]
    g = int(round(np.sqrt(n)))
    info["grid"] = (g, g) if g * g == n else None
    info["res"] = g * ph if g * g == n and ph == pw else None
  else:
    cfg["posemb"] = "sincos2d"
    info["grid"] = info["res"] = None
  if "pre_logits" in img:
    rep = int(_shape(_get(img, "pre_logits/kernel", where))[-1])
    cfg["rep_size"] = True if rep == width else rep
  num_classes = (int(_shape(_get(img, "head/kernel", where))[-1])
                 if "head" in img else None)
  cfg["num_classes"] = num_classes
  return cfg, info


def infer_text_config(txt: Mapping[str, Any], where: str = "txt") -> tuple[dict, dict]:
  """(text.Model kwargs incl. num_classes, info) for a text-tower parameter tree."""
  e = _shape(_get(txt, "Embed_0/embedding", where))
  if len(e) != 2:
    raise CheckpointError(f"{where}/Embed_0/embedding must be (vocab, D), got {e}")
  vocab, width = map(int, e)
  dims = _encoder_dims(_get(txt, "Encoder_0", where), where + "/Encoder_0")
  cfg: dict[str, Any] = {}
  name = _named(width, dims)
  if name is not None:
    cfg["variant"] = name
  else:
    cfg.update(width=width, depth=dims["depth"], mlp_dim=dims["mlp_dim"],
               num_heads=dims["num_heads"])
  cfg.update(vocab_size=vocab, scan=dims["scan"],
             pool_type="map" if "MAPHead_0" in txt else "last")
  pe = _shape(_get(txt, "pos_embedding", where))
  info = {"seq_len": int(pe[1]), "vocab_size": vocab,
          "layout": "scan" if dims["scan"] else "loop"}
  cfg["num_classes"] = (int(_shape(_get(txt, "head/kernel", where))[-1])
                        if "head" in txt else None)
  return cfg, info


def _check_two_towers(params: Mapping[str, Any]) -> None:
  if not any(t in params for t in TOWERS):
    hint = ("; this is a plain ViT checkpoint: use load_vit or load_classifier"
            if "Transformer" in params else "")
    raise CheckpointError("Not a two-towers checkpoint: no 'img' or 'txt' subtree "
                          f"(top-level keys: {sorted(params)}){hint}")


def infer_config(params: Mapping[str, Any]) -> tuple[dict, dict]:
  """(two_towers.Model kwargs, info) from a two-towers parameter tree.

  info: {'img': {'res', 'grid', 'layout'}, 'txt': {'seq_len', 'vocab_size', 'layout'}}.
  """
  _check_two_towers(params)
  if "t" not in params:
    raise CheckpointError("missing key in checkpoint: t (the SigLIP temperature)")
  cfg: dict[str, Any] = {}
  info: dict[str, Any] = {}
  out_dim = [None, None]
  if "img" in params:
    img_cfg, info["img"] = infer_image_config(params["img"])
    out_dim[0] = img_cfg.pop("num_classes")
    cfg["image"] = img_cfg
  if "txt" in params:
    txt_cfg, info["txt"] = infer_text_config(params["txt"])
    out_dim[1] = txt_cfg.pop("num_classes")
    cfg["text"] = txt_cfg
  cfg["out_dim"] = tuple(out_dim)
  # The values used by big_vision's SigLIP configs; loaded params replace them.
  cfg["temperature_init"] = 10.0
  cfg["bias_init"] = -10.0 if "b" in params else None
  return cfg, info


def inspect(path: str) -> tuple[dict, dict]:
  """(two_towers.Model kwargs, info) of an npz without loading its arrays.

  info['img']['res'] is the pretraining resolution (for preprocessing),
  info['txt']['seq_len'] / ['vocab_size'] the tokenizer settings. Only the .npy
  headers are read for local files.
  """
  flat = ckpt_lib.strip_prefix(ckpt_lib.npz_shapes(resolve(path)))
  return infer_config(ckpt_lib.unflatten(flat))


# ----------------------------------------------------------------------------------
# Loading.


_TOWER_KEYS = ("scan", "dtype_mm", "remat_policy")
_MODEL_FIELDS = {f.name for f in dataclasses.fields(two_towers.Model)} - {
    "parent", "name", "image", "text"}


_DIM_KEYS = ("width", "depth", "mlp_dim", "num_heads", "patch_size")


def _override(cfg: dict, over: Mapping[str, Any]) -> dict:
  """Tower kwargs updated by `over`; a `variant` there replaces the inferred dims."""
  cfg = dict(cfg)
  if "variant" in over:
    for k in _DIM_KEYS:
      cfg.pop(k, None)
  cfg.update(over)
  return cfg


def _dummy_inputs(model: two_towers.Model, info: Mapping[str, Any],
                  towers: Sequence[str], res: Optional[Union[int, Sequence[int]]]):
  img = txt = None
  if "img" in towers:
    p = vit.Model(**model.image).patch_size
    if res is None:
      grid = info["img"].get("grid") or (14, 14)
      hw = (grid[0] * p[0], grid[1] * p[1])
    else:
      hw = (res, res) if isinstance(res, int) else tuple(res)
    img = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)
  if "txt" in towers:
    txt = jax.ShapeDtypeStruct((1, info["txt"]["seq_len"]), jnp.int32)
  return img, txt


def build(params: Mapping[str, Any], *, towers: Sequence[str] = TOWERS,
          res: Optional[Union[int, Sequence[int]]] = None, dont_load=(),
          param_dtype=None, seed: int = 0, image: Optional[dict] = None,
          text: Optional[dict] = None, **overrides) -> tuple[two_towers.Model, dict]:
  """`load` for an in-memory big_vision two-towers parameter tree (see module doc)."""
  bad = set(overrides) - set(_TOWER_KEYS) - _MODEL_FIELDS
  if bad:
    known = set(_TOWER_KEYS) | _MODEL_FIELDS | {
        "res", "towers", "dont_load", "param_dtype", "seed", "image", "text"}
    raise TypeError(f"Unknown override(s) {sorted(bad)}; known: {sorted(known)}")
  towers = tuple(towers)
  if not towers or set(towers) - set(TOWERS):
    raise ValueError(f"towers must be a non-empty subset of {TOWERS}, got {towers}")
  _check_two_towers(params)
  params = {k: v for k, v in params.items() if k not in TOWERS or k in towers}
  for t in towers:
    if t not in params:
      raise CheckpointError(f"missing key in checkpoint: {t} (the "
                            f"{'image' if t == 'img' else 'text'} tower was requested)")
  cfg, info = infer_config(params)
  tower_over = {k: overrides.pop(k) for k in _TOWER_KEYS if k in overrides}
  if "image" in cfg:
    cfg["image"] = _override(cfg["image"], {**tower_over, **(image or {})})
  if "text" in cfg:
    cfg["text"] = _override(cfg["text"], {**tower_over, **(text or {})})
  cfg.update(overrides)
  model = two_towers.Model(**cfg)

  # Layout to the model's; posemb to the model's resolution.
  params = dict(params)
  for t, key in (("img", "image"), ("txt", "text")):
    if t in params:
      params[t] = ckpt_lib.convert_layout(params[t], bool(cfg[key].get("scan")), t)
  img_in, txt_in = _dummy_inputs(model, info, towers, res)
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(seed), img_in, txt_in)
  expected = expected["params"]
  if "img" in params and "pos_embedding" in params["img"] and \
     "pos_embedding" in expected.get("img", {}):
    pe_old, pe_new = params["img"]["pos_embedding"], expected["img"]["pos_embedding"]
    if _shape(pe_old) != pe_new.shape and _shape(pe_old)[2:] == pe_new.shape[2:]:
      params["img"] = {**params["img"],
                       "pos_embedding": ckpt_lib.resample_posemb(pe_old, pe_new.shape)}
  return model, _finish(model, params, expected, dont_load, param_dtype, seed,
                        (img_in, txt_in))


def _finish(model: nn.Module, params, expected, dont_load, param_dtype, seed,
            dummy_args) -> dict:
  pats = ckpt_lib.compile_patterns(dont_load)
  need = sorted(k for k in ckpt_lib.flatten(expected) if any(p.fullmatch(k) for p in pats))
  init = None
  if need:
    # Only the not-loaded leaves are computed (XLA drops the rest of the init), so a
    # new head on a 1B-parameter tower does not materialise a random 1B-param copy.
    dummies = [None if a is None else jnp.zeros(a.shape, a.dtype) for a in dummy_args]
    init_some = jax.jit(lambda rng: {
        k: v for k, v in ckpt_lib.flatten(model.init(rng, *dummies)["params"]).items()
        if k in need})
    init = ckpt_lib.unflatten(init_some(jax.random.PRNGKey(seed)))
  merged = ckpt_lib.merge_params(params, expected, dont_load, init)
  if param_dtype is not None:
    merged = jax.tree.map(lambda x: np.asarray(x).astype(param_dtype), merged)
  return jax.tree.map(jnp.asarray, merged)


def load(path: str, *, allow_nonfinite: bool = False,
         **overrides) -> tuple[two_towers.Model, dict]:
  """Loads a big_vision SigLIP / SigLIP2 npz: `(model, params)`.

  `path` is local or anything tf.io.gfile reads (gs://...); the file may hold
  `params/...` or bare names, loop or scan layout, float32 or bfloat16 leaves.
  See the module docstring for the overrides. Raises FileNotFoundError, or
  CheckpointError (a ValueError) naming the key / shapes / dtype at fault, or
  the keys holding NaN / Inf (`allow_nonfinite=True` loads them with a
  `NonFiniteWarning`).
  """
  return build(ckpt_lib.load_params(resolve(path), allow_nonfinite=allow_nonfinite),
               **overrides)


def save(path: str, params: Mapping[str, Any]) -> None:
  """Writes `params` (two towers, or any tower) as a big_vision npz under `params/`."""
  ckpt_lib.save(path, params)


def _image_tree(path_or_params) -> tuple[dict, str]:
  """`(image tower tree, its name)`; not checked for NaN / Inf (the callers check
  exactly the params they use: the text tower or a dropped head do not count)."""
  if isinstance(path_or_params, str):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", ckpt_lib.NonFiniteWarning)
      params = ckpt_lib.load_params(resolve(path_or_params), allow_nonfinite=True)
    where = path_or_params
  else:
    params, where = path_or_params, "params"
  if "img" in params:
    return params["img"], f"{where}:img"
  if "embedding" in params and "Transformer" in params:
    return dict(params), where
  raise CheckpointError("No image tower: expected an 'img' subtree or a ViT tree with "
                        f"'embedding' and 'Transformer' (top-level keys: {sorted(params)})")


def load_vit(path_or_params, *, res=None, dont_load=(), param_dtype=None, seed=0,
             allow_nonfinite: bool = False,
             **overrides) -> tuple[vit._Model, dict]:  # pylint: disable=protected-access
  """Loads a ViT: the image tower of a two-towers checkpoint, or a plain ViT npz.

  Overrides are `vit.Model` kwargs (e.g. scan, dtype_mm, pool_type, num_classes);
  the head is kept if the checkpoint has one (use `load_classifier` for a new head).
  NaN / Inf params of the image tower (in the file or the given tree) raise a
  CheckpointError naming them unless `allow_nonfinite=True` (then a
  `NonFiniteWarning`).
  """
  img, where = _image_tree(path_or_params)
  ckpt_lib.check_finite(img, allow=allow_nonfinite, where=where)
  cfg, info = infer_image_config(img, where="img" if isinstance(path_or_params, str)
                                 else "params")
  cfg = _override(cfg, overrides)
  model = vit.Model(**cfg)
  img = ckpt_lib.convert_layout(img, bool(cfg.get("scan")), "img")
  grid = info.get("grid") or (14, 14)
  if res is None:
    hw = (grid[0] * model.patch_size[0], grid[1] * model.patch_size[1])
  else:
    hw = (res, res) if isinstance(res, int) else tuple(res)
  x = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(seed), x)["params"]
  if "pos_embedding" in img and "pos_embedding" in expected:
    pe_new = expected["pos_embedding"].shape
    if _shape(img["pos_embedding"]) != pe_new and \
       _shape(img["pos_embedding"])[2:] == pe_new[2:]:
      img = {**img, "pos_embedding": ckpt_lib.resample_posemb(img["pos_embedding"],
                                                              pe_new)}
  return model, _finish(model, img, expected, dont_load, param_dtype, seed, (x,))


def load_classifier(path_or_params, num_classes: int, /, **overrides
                    ) -> tuple[vit._Model, dict]:  # pylint: disable=protected-access
  """Image tower + a new zero-initialised linear head `head` (kernel (D, K), bias (K,)).

  The checkpoint's own head (if any) is dropped; this is the paper's ImageNet
  fine-tuning model: logits = pool(ViT(x)) @ 0 + 0 at step 0. Overrides are
  `load_vit`'s (res, scan, dtype_mm, pool_type, variant, dont_load, ...); they may
  repeat num_classes (e.g. `**config.model`) if it agrees, and may hold
  `allow_nonfinite` (NaN / Inf in the image tower without its head: as `load_vit`).
  """
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  if overrides.get("num_classes", num_classes) != num_classes:
    raise ValueError(f"num_classes={num_classes} and overrides num_classes="
                     f"{overrides['num_classes']} disagree")
  overrides.pop("num_classes", None)
  allow = bool(overrides.pop("allow_nonfinite", False))
  img, where = _image_tree(path_or_params)
  img = dict(img)
  img.pop("head", None)  # dropped: its values (finite or not) are never used
  ckpt_lib.check_finite(img, allow=allow, where=where)
  dont_load = list(overrides.pop("dont_load", ()))
  overrides.setdefault("head_zeroinit", True)
  with warnings.catch_warnings():  # checked (and warned about) above
    warnings.simplefilter("ignore", ckpt_lib.NonFiniteWarning)
    return load_vit(img, num_classes=int(num_classes),
                    dont_load=dont_load + ["head/.*"], allow_nonfinite=True,
                    **overrides)


def load_hf(path_or_dir: str, *, allow_nonfinite: bool = False,
            **overrides) -> tuple[two_towers.Model, dict]:
  """Loads a Hugging Face `transformers` SigLIP / SigLIP2 safetensors checkpoint.

  NaN / Inf tensors raise a CheckpointError naming them (as big_vision keys)
  unless `allow_nonfinite=True`.
  """
  from s2d_jax.models import hf  # pylint: disable=import-outside-toplevel
  return build(hf.load_hf_params(path_or_dir, allow_nonfinite=allow_nonfinite),
               **overrides)
