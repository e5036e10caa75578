"""Zero-shot classification with a SigLIP two-towers model, as big_vision does it.

For classes ``c = 1..C`` and prompt templates ``t = 1..T`` (e.g. ``"a photo of
a {}."``), with ``ztxt(s)`` the (L2-normalised) text embedding of string
``s``, the class embedding is (``big_vision/evaluators/proj/image_text/
discriminative_classifier.py::_average_embeddings``)::

  m_c = (1/T) Σ_t ztxt(template_t.format(name_c))
  e_c = m_c / (1e-8 + ||m_c||)                                   (C, D)

and for L2-normalised image embeddings ``zimg`` (B, D) the prediction is
``argmax_c zimg · e_cᵀ`` (:func:`zeroshot_logits`; SigLIP's ``t``, ``b`` are a
monotone map of these logits and do not change the argmax).

Class names and templates are canonicalised like big_vision's
``prompt_engineering``: ``_`` -> space, punctuation removed (except ``","`` in
class names and ``"{}"`` in templates), lower-cased, whitespace collapsed.
Defaults are ImageNet-1k's CLIP class names and big_vision's ``clip_paper``
templates (CLIP's 80 + ``"{}"``), see :mod:`s2d_jax.models.imagenet_classes`.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from s2d_jax.models import imagenet_classes

TEMPLATE_SETS = {
    "clip_paper": imagenet_classes.BIG_VISION_TEMPLATES,
    "clip": imagenet_classes.CLIP_TEMPLATES,
    "clip_best": imagenet_classes.CLIP_BEST_TEMPLATES,
    "class_name_only": ("{}",),
}


def canonicalize_text(text: str, *, keep_punctuation_exact_string: str | None = None
                      ) -> str:
  """big_vision's ``canonicalize_text``: lower case, punctuation removed."""
  text = text.replace("_", " ")
  table = str.maketrans("", "", string.punctuation)
  if keep_punctuation_exact_string:
    text = keep_punctuation_exact_string.join(
        part.translate(table)
        for part in text.split(keep_punctuation_exact_string))
  else:
    text = text.translate(table)
  text = text.lower()
  return re.sub(r"\s+", " ", text).strip()


def get_class_names(names: Sequence[str] | None = None, *,
                    canonicalize: bool = True) -> list[str]:
  """Class names (default: ImageNet-1k CLIP names), canonicalised like big_vision."""
  names = list(imagenet_classes.CLASS_NAMES if names is None else names)
  if not names:
    raise ValueError("need at least one class name")
  if canonicalize:
    names = [canonicalize_text(n, keep_punctuation_exact_string=",")
             for n in names]
  return names


def get_templates(templates: str | Sequence[str] | None = None, *,
                  canonicalize: bool = True) -> list[str]:
  """Prompt templates: a set name from ``TEMPLATE_SETS`` or a list (default clip_paper)."""
  if templates is None:
    templates = "clip_paper"
  if isinstance(templates, str):
    if templates not in TEMPLATE_SETS:
      raise ValueError(f"unknown template set {templates!r}; known: "
                       f"{sorted(TEMPLATE_SETS)} (or pass a list of templates)")
    templates = TEMPLATE_SETS[templates]
  templates = list(templates)
  if not templates:
    raise ValueError("need at least one prompt template")
  bad = [t for t in templates if t.count("{}") != 1]
  if bad:
    raise ValueError(f"each template needs exactly one '{{}}': {bad[:3]}")
  if canonicalize:
    templates = [canonicalize_text(t, keep_punctuation_exact_string="{}")
                 for t in templates]
  return templates


def class_texts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
  """All prompts, class-major: ``[t.format(c) for c in classnames for t in templates]``."""
  return [t.format(c) for c in classnames for t in templates]


def _text_fn(model: Any, params: Any) -> Callable[[np.ndarray], Any]:
  """(model, params) -> jitted tokens -> ztxt; a plain callable is used as is."""
  if hasattr(model, "apply") and hasattr(model, "init"):  # a flax Module
    if params is None:
      raise ValueError("class_embeddings(model, params, ...): params is None; "
                       "pass the model's params or a text function instead")

    @jax.jit
    def fn(p, tokens):
      return model.apply({"params": p}, None, tokens)[1]
    return lambda tokens: fn(params, tokens)
  if callable(model):
    if params is not None:
      raise ValueError("class_embeddings: params must be None when a text "
                       "function (tokens -> ztxt) is given")
    return model
  raise TypeError(f"expected a flax model or a function, got {type(model)}")


def embed_texts(model: Any, params: Any, tokens: np.ndarray, *,
                batch_size: int = 256) -> np.ndarray:
  """ztxt for (N, L) tokens, in fixed-size batches (last one padded; one compile)."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  tokens = np.asarray(tokens, np.int32)
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be (N, L), got shape {tokens.shape}")
  fn = _text_fn(model, params)
  n = len(tokens)
  outs = []
  for start in range(0, n, batch_size):
    chunk = tokens[start:start + batch_size]
    real = len(chunk)
    if real < batch_size:
      chunk = np.concatenate(
          [chunk, np.repeat(chunk[-1:], batch_size - real, axis=0)])
    z = np.asarray(jax.device_get(fn(chunk)), np.float32)
    if z.ndim != 2 or z.shape[0] != batch_size:
      raise ValueError(f"text function returned shape {z.shape}; expected "
                       f"({batch_size}, D)")
    outs.append(z[:real])
  return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def class_embeddings(model: Any, params: Any = None, tokenizer: Any = None,
                     classnames: Sequence[str] | None = None,
                     templates: str | Sequence[str] | None = None, *,
                     batch_size: int = 256, canonicalize: bool = True
                     ) -> np.ndarray:
  """Per-class mean text embedding over templates, re-normalised: (C, D).

  Args:
    model: a two-towers flax model (``model.apply({'params': p}, None, tokens)
      -> (_, ztxt, out)``) used with ``params``, or a function ``tokens (B, L)
      int32 -> ztxt (B, D)`` (then ``params`` must be None).
    params: the model's params (or None with a function).
    tokenizer: callable ``list[str] -> (N, L) int32``, e.g.
      :class:`s2d_jax.models.tokenizer.Tokenizer`.
    classnames: default ImageNet-1k CLIP names.
    templates: template set name or list; default ``"clip_paper"``.
    batch_size: texts per forward pass (the last batch is padded).
    canonicalize: apply big_vision's canonicalisation to names and templates.
  """
  if tokenizer is None:
    raise ValueError("class_embeddings needs a tokenizer (texts -> tokens)")
  names = get_class_names(classnames, canonicalize=canonicalize)
  temps = get_templates(templates, canonicalize=canonicalize)
  tokens = np.asarray(tokenizer(class_texts(names, temps)), np.int32)
  z = embed_texts(model, params, tokens, batch_size=batch_size)
  z = z.reshape(len(names), len(temps), -1).mean(axis=1)
  return z / (1e-8 + np.linalg.norm(z, axis=1, keepdims=True))


def zeroshot_logits(zimg: Any, class_emb: Any) -> jax.Array:
  """``zimg @ class_embᵀ``: (B, D) x (C, D) -> (B, C) cosine similarities."""
  zimg, class_emb = jnp.asarray(zimg), jnp.asarray(class_emb)
  if zimg.ndim != 2 or class_emb.ndim != 2 or zimg.shape[1] != class_emb.shape[1]:
    raise ValueError(f"zimg {zimg.shape} and class_emb {class_emb.shape} must "
                     "be (B, D) and (C, D)")
  return jnp.matmul(zimg, class_emb.T, precision=jax.lax.Precision.HIGHEST)


def zeroshot_predict(zimg: Any, class_emb: Any) -> jax.Array:
  """Predicted class ids ``argmax_c zimg · e_c``: (B,)."""
  return jnp.argmax(zeroshot_logits(zimg, class_emb), axis=-1)


def count_correct(zimg: Any, class_emb: Any, labels: Any, mask: Any = None
                  ) -> tuple[int, int]:
  """(#correct, #counted) for one batch; ``mask`` (B,) 1 = real example."""
  labels = np.asarray(labels)
  pred = np.asarray(zeroshot_predict(zimg, class_emb))
  if labels.shape != pred.shape:
    raise ValueError(f"labels shape {labels.shape} != batch shape {pred.shape}")
  m = np.ones_like(pred, bool) if mask is None else np.asarray(mask).astype(bool)
  return int(np.sum((pred == labels) & m)), int(np.sum(m))


def accuracy(zimg: Any, class_emb: Any, labels: Any, mask: Any = None) -> float:
  """Zero-shot top-1 accuracy of a batch (masked examples ignored)."""
  correct, total = count_correct(zimg, class_emb, labels, mask)
  if total == 0:
    raise ValueError("accuracy over zero examples (mask is all zero)")
  return correct / total
