"""SigLIP / SigLIP2 two-towers model, compatible with big_vision's `two_towers.py`.

    zimg = img(images) / (||img(images)||_2 + 1e-8)        (B, C)  ViT tower 'img'
    ztxt = txt(tokens) / (||txt(tokens)||_2 + 1e-8)        (B', C) text tower 'txt'
    out['t'] = exp(t),  t = log(temperature_init) initially    (param 't', shape (1,))
    out['b'] = b,       b = bias_init initially                 (param 'b', only if
                                                                  bias_init is set)

`model.apply({'params': p}, images, tokens) -> (zimg, ztxt, out)`; either input may
be None (that tower is then skipped; its params are not needed). `out` also holds
every tower output under 'img/...' / 'txt/...' (big_vision's names), and
'img/norm', 'img/normalized', 'txt/norm', 'txt/normalized', 't/parameter'.

SigLIP pairwise sigmoid loss (arXiv:2303.15343), `sigmoid_loss` below:

    logits_ij = t zimg_i . ztxt_j + b,    z_ij = +1 if i == j else -1
    L = -(1/B) sum_i sum_j log sigmoid(z_ij logits_ij)
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from s2d_jax.models import text as text_lib
from s2d_jax.models import vit

IMAGE_MODELS = ("vit",)
TEXT_MODELS = ("proj.image_text.text_transformer", "text")


class Model(nn.Module):
  """Two towers: image ViT 'img' and text transformer 'txt' (see module docstring).

  Attributes:
    image: kwargs of `vit.Model` (e.g. dict(variant='B/16', pool_type='map')).
    text: kwargs of `text.Model` (e.g. dict(variant='B', vocab_size=32_000)).
    out_dim: int or (image_out, text_out): the towers' `num_classes` (None = no head;
      SigLIP uses (None, width): MAP-pooled image features, a Dense head on text).
    temperature_init: t is initialised to log(temperature_init).
    bias_init: b is initialised to bias_init; None means no 'b' parameter.
  """
  image: Optional[Any] = None
  text: Optional[Any] = None
  text_model: str = "proj.image_text.text_transformer"
  image_model: str = "vit"
  out_dim: Union[int, None, Tuple[Optional[int], Optional[int]]] = 128
  temperature_init: float = 1.0
  bias_init: Optional[float] = None

  @nn.compact
  def __call__(self, image, text=None, **kw):
    if self.image_model not in IMAGE_MODELS:
      raise ValueError(f"Unsupported image_model {self.image_model!r}; "
                       f"expected one of {IMAGE_MODELS}")
    if self.text_model not in TEXT_MODELS:
      raise ValueError(f"Unsupported text_model {self.text_model!r}; "
                       f"expected one of {TEXT_MODELS}")
    out = {}
    out_dims = self.out_dim
    if out_dims is None or isinstance(out_dims, int):
      out_dims = (out_dims, out_dims)
    zimg = ztxt = None

    if text is not None:
      txt = text_lib.Model(**{"num_classes": out_dims[1], **(self.text or {})},
                           name="txt")
      ztxt, out_txt = txt(text, **kw)
      for k, v in out_txt.items():
        out[f"txt/{k}"] = v
      out["txt/norm"] = jnp.linalg.norm(ztxt, axis=1, keepdims=True)
      out["txt/normalized"] = ztxt = ztxt / (out["txt/norm"] + 1e-8)

    if image is not None:
      img = vit.Model(**{"num_classes": out_dims[0], **(self.image or {})}, name="img")
      zimg, out_img = img(image, **kw)
      for k, v in out_img.items():
        out[f"img/{k}"] = v
      out["img/norm"] = jnp.linalg.norm(zimg, axis=1, keepdims=True)
      out["img/normalized"] = zimg = zimg / (out["img/norm"] + 1e-8)

    temp_init = jnp.log(self.temperature_init)
    t = self.param("t", lambda key, shape, dtype: temp_init * jnp.ones(shape, dtype),
                   (1,), jnp.float32)
    out["t"] = jnp.exp(t)
    out["t/parameter"] = t
    if (b_init := self.bias_init) is not None:
      out["b"] = self.param("b", lambda k, s, d: b_init * jnp.ones(s, d), (1,),
                            jnp.float32)
    return zimg, ztxt, out


def sigmoid_loss(zimg: jax.Array, ztxt: jax.Array, t: jax.Array,
                 b: Optional[jax.Array] = None) -> jax.Array:
  """SigLIP loss: mean over images of -sum_j log sigmoid(z_ij (t zimg_i . ztxt_j + b)).

  Args:
    zimg: (B, C) image embeddings; ztxt: (B, C) text embeddings of the matching
      captions (pair i is the positive of row i).
    t: the temperature *after* exp, i.e. `out['t']` (shape () or (1,)).
    b: the logit bias `out['b']` (shape () or (1,)); None means 0.
  Returns:
    scalar loss, exactly big_vision's siglip trainer loss.
  """
  if zimg.ndim != 2 or zimg.shape != ztxt.shape:
    raise ValueError(f"sigmoid_loss needs zimg and ztxt of the same shape (B, C), got "
                     f"{zimg.shape} and {ztxt.shape}")
  logits = jnp.dot(zimg, ztxt.T) * t
  if b is not None:
    logits = logits + b
  labels = 2 * jnp.eye(zimg.shape[0], dtype=logits.dtype) - 1
  return jnp.mean(-jnp.sum(jax.nn.log_sigmoid(labels * logits), axis=-1))


def load(init_params: Any, init_file: str, model_cfg: Any = None,
         dont_load=(), *, allow_nonfinite: bool = False) -> dict:
  """Params of a two-towers model from a big_vision SigLIP npz (big_vision API).

  As `vit.load` for each tower: the layout of `img/` and `txt/` is converted to
  `model_cfg['image' | 'text']['scan']`, the image position embedding resampled to
  `init_params`', and `dont_load` regexes (full match on 'img/head/kernel'-style
  paths) keep `init_params`' values. NaN / Inf params in the file raise a
  CheckpointError naming them, unless `allow_nonfinite=True`. Returns host numpy
  arrays.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from s2d_jax.models import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  cfg = dict(model_cfg or {})
  params = dict(ckpt_lib.load_params(init_file, allow_nonfinite=allow_nonfinite))
  for tower, key in (("img", "image"), ("txt", "text")):
    if tower in params:
      scan = bool(dict(cfg.get(key) or {}).get("scan", False))
      params[tower] = ckpt_lib.convert_layout(params[tower], scan, tower)
  pe = init_params.get("img", {}).get("pos_embedding")
  if pe is not None and "pos_embedding" in params.get("img", {}):
    old = params["img"]["pos_embedding"]
    if np.shape(old) != tuple(pe.shape) and np.shape(old)[2:] == tuple(pe.shape)[2:]:
      params["img"] = {**params["img"],
                       "pos_embedding": ckpt_lib.resample_posemb(old, pe.shape)}
  init = init_params if ckpt_lib.compile_patterns(dont_load) else None
  merged = ckpt_lib.merge_params(params, init_params, dont_load, init)
  return jax.tree.map(vit._host, merged)  # pylint: disable=protected-access
