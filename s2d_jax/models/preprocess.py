"""big_vision's preprocessing mini-language, reimplemented for s2d_jax.

A pipeline is a string of ops separated by ``|``; each op is a name or a call
with Python-literal arguments::

  get_preprocess_fn("decode|resize(224)|value_range(-1,1)|keep('image','label')")

The result maps a dict of TF tensors (one example, e.g. ``{'image': uint8
(H, W, C), 'label': int}``) to a new dict, and is meant for ``tf.data``'s
``map``. The ops follow big_vision (``big_vision/pp/ops_*.py``) numerically:

* ``decode(channels=3, precise=False)``: ``tf.io.decode_image`` (or
  ``decode_jpeg(dct_method="INTEGER_ACCURATE")`` if ``precise``). An image that
  is already decoded (not a string) passes through unchanged.
* ``resize(size, method="bilinear", antialias=False)``: ``tf.image.resize`` to
  ``size`` (int, or ``[H, W]``), then big_vision's dtype round trip
  ``cast(clip(y, dtype.min, dtype.max), dtype)``: for uint8 input the float
  result is clipped to [0, 255] and *truncated* (not rounded) back to uint8.
* ``resize_small(smaller_size, method="area", antialias=False)``: scales by
  ``f = smaller_size / min(H, W)`` to ``(round(H f), round(W f))`` (``tf.round``:
  half to even), same round trip.
* ``central_crop(crop_size=None)``: the ``(h, w)`` window at offset
  ``((H - h) // 2, (W - w) // 2)``; None = the largest central square.
* ``inception_crop(size=None, area_min=5, area_max=100, method="bilinear",
  antialias=False, ratio_min=0.75, ratio_max=1.33)``: a crop from
  ``sample_distorted_bounding_box`` (area fraction in ``[area_min,
  area_max]%``, aspect ratio in ``[ratio_min, ratio_max]``, 100 attempts,
  whole image as fallback), then ``resize(size)``.
* ``flip_lr``: left-right flip with probability 1/2.
* ``value_range(vmin=-1, vmax=1, in_min=0, in_max=255, clip_values=False)``:
  ``y = vmin + (x - in_min) / (in_max - in_min) * (vmax - vmin)`` in float32.
* ``keep(*keys)``, ``drop(*keys)``, ``copy(inkey, outkey)``,
  ``onehot(depth, key="labels", key_result=None, multi=True, on=1, off=0)``,
  ``lower(key="text")``, and the text ops ``tokenize`` (big_vision SigLIP form)
  and ``tok`` (SigLIP2 form), backed by :mod:`s2d_jax.models.tokenizer`.

Single-tensor ops take ``key=`` or ``inkey=``/``outkey=`` (default ``"image"``).

Randomness. The random ops (``inception_crop``, ``flip_lr``) are
*deterministic* when the example carries ``'_rng'``, an int64 seed of shape
``[2]`` (the input pipeline adds it, see :mod:`s2d_jax.data.input_pipeline`):
op number ``i`` in the pipeline uses the stateless seed
``stateless_fold_in(_rng, i)``, so results depend only on the seed, never on
threading or on how many examples came before. ``'_rng'`` is consumed by the
pipeline and never returned. Without ``'_rng'`` they use TF's stateful RNG,
like big_vision.

The zero-shot evaluation pipelines of big_vision are :func:`square875` and
:func:`aspect75`.
"""

from __future__ import annotations

import ast
import functools
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

RNG_KEY = "_rng"

_REGISTRY: dict[str, Callable[..., Any]] = {}
_RANDOM_OPS: set[str] = set()


def register(name: str, *, random: bool = False):
  """Registers an op factory under ``name``.

  A factory takes the op's arguments and returns ``fn(data) -> data``; for a
  ``random`` op it returns ``fn(data, seed) -> data`` with ``seed`` an int64
  ``[2]`` tensor or None (stateful randomness).
  """
  def deco(factory):
    if name in _REGISTRY:
      raise KeyError(f"preprocessing op {name!r} is already registered")
    _REGISTRY[name] = factory
    if random:
      _RANDOM_OPS.add(name)
    return factory
  return deco


def known_ops() -> list[str]:
  return sorted(_REGISTRY)


def parse_op(spec: str) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
  """``"resize(224, method='area')"`` -> ``("resize", (224,), {"method": "area"})``."""
  try:
    expr = ast.parse(spec.strip(), mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"syntax error in preprocessing op {spec!r}: {e.msg}") from e
  if isinstance(expr, ast.Name):
    return expr.id, (), {}
  if not (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name)):
    raise ValueError(
        f"preprocessing op {spec!r} must be a name or a call like name(args)")
  try:
    args = tuple(ast.literal_eval(a) for a in expr.args)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in expr.keywords}
  except ValueError as e:
    raise ValueError(
        f"arguments of preprocessing op {spec!r} must be Python literals") from e
  if any(k is None for k in kwargs):
    raise ValueError(f"preprocessing op {spec!r}: **kwargs are not supported")
  return expr.func.id, args, kwargs


def build_op(spec: str):
  """Parses one op and builds its function; errors name the op."""
  name, args, kwargs = parse_op(spec)
  if name not in _REGISTRY:
    raise ValueError(f"unknown preprocessing op {name!r} in {spec!r}; "
                     f"known ops: {', '.join(known_ops())}")
  factory = _REGISTRY[name]
  try:
    inspect.signature(factory).bind(*args, **kwargs)
  except TypeError as e:
    raise ValueError(f"bad arguments for preprocessing op {name!r} in "
                     f"{spec!r}: {e}; signature: {name}"
                     f"{inspect.signature(factory)}") from e
  try:
    return name, factory(*args, **kwargs)
  except (ValueError, TypeError) as e:
    raise ValueError(f"preprocessing op {name!r} in {spec!r}: {e}") from e


def get_preprocess_fn(pp: str | None) -> Callable[[dict[str, Any]], dict[str, Any]]:
  """Builds the function for a pipeline string (None / "" = identity).

  All parsing and argument checks happen here, so a typo fails at start-up.
  """
  ops = []
  for spec in (pp or "").split("|"):
    if spec.strip():
      ops.append(build_op(spec))

  def _preprocess(data):
    if not isinstance(data, dict):
      raise ValueError(f"preprocessing expects a dict example, got {type(data)}")
    data = dict(data)
    rng = data.pop(RNG_KEY, None)
    if rng is not None:
      rng = tf.cast(tf.convert_to_tensor(rng), tf.int64)
    for i, (name, op) in enumerate(ops):
      with tf.name_scope(name):
        if name in _RANDOM_OPS:
          seed = None if rng is None else (
              tf.random.experimental.stateless_fold_in(rng, i))
          data = op(data, seed)
        else:
          data = op(data)
      if not isinstance(data, dict):
        raise ValueError(f"preprocessing op {name!r} returned {type(data)}")
    return data

  return _preprocess


def square875(size: int) -> str:
  """big_vision's zero-shot eval pp: ``resize(int(size/0.875))|central_crop(size)``."""
  return f"resize({int(size / 0.875)})|central_crop({size})|value_range(-1,1)"


def aspect75(size: int) -> str:
  """big_vision's ``resize_small(int(size/0.75))|central_crop(size)`` eval pp."""
  return f"resize_small({int(size / 0.75)})|central_crop({size})|value_range(-1,1)"


# ----------------------------------------------------------------------------
# Helpers.


def _get(data, key, op):
  if key not in data:
    raise KeyError(f"preprocessing op {op!r} needs key {key!r}; the example "
                   f"has keys {sorted(data)}")
  return data[key]


def _inkey_outkey(op_name, indefault="image", outdefault="image", *,
                  random=False):
  """Adds big_vision's ``key`` / ``inkey`` / ``outkey`` arguments to a factory."""
  def deco(factory):
    sig = inspect.signature(factory)
    params = list(sig.parameters.values())
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d)
             for n, d in (("key", None), ("inkey", indefault),
                          ("outkey", outdefault))]

    @functools.wraps(factory)
    def wrapped(*args, key=None, inkey=indefault, outkey=outdefault, **kw):
      fn = factory(*args, **kw)
      ik, ok = key or inkey, key or outkey
      if ik is None or ok is None:
        raise ValueError(f"{op_name}: give the text key with key= or inkey=")
      if random:
        def _op(data, seed):
          data[ok] = fn(_get(data, ik, op_name), seed)
          return data
      else:
        def _op(data):
          data[ok] = fn(_get(data, ik, op_name))
          return data
      return _op

    # Keep a signature that `bind` can check (factory args + key args).
    pos = [p for p in params if p.kind != inspect.Parameter.VAR_KEYWORD]
    wrapped.__signature__ = sig.replace(parameters=pos + extra)
    return wrapped
  return deco


def _size2(size, op, name="size"):
  """int or [h, w] -> (h, w) positive Python ints (integral floats accepted)."""
  if isinstance(size, (list, tuple)):
    if len(size) != 2:
      raise ValueError(f"{op}: {name} must be an int or [height, width], got {size!r}")
    vals = list(size)
  else:
    vals = [size, size]
  out = []
  for v in vals:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (
        isinstance(v, float) and not v.is_integer()):
      raise ValueError(f"{op}: {name} must be integers, got {size!r} (write "
                       "e.g. int(sz/0.875) as big_vision's configs do)")
    if v <= 0:
      raise ValueError(f"{op}: {name} must be positive, got {size!r}")
    out.append(int(v))
  return tuple(out)


def _resize_roundtrip(image, size, method, antialias):
  """tf.image.resize, then big_vision's ``cast(clip(., dtype range), dtype)``."""
  dtype = image.dtype
  out = tf.image.resize(image, size, method=method, antialias=antialias)
  return tf.cast(tf.clip_by_value(out, dtype.min, dtype.max), dtype)


def _check_method(method, op):
  valid = [m for m in dir(tf.image.ResizeMethod) if m.isupper()]
  valid = [getattr(tf.image.ResizeMethod, m) for m in valid]
  if method not in valid:
    raise ValueError(f"{op}: unknown resize method {method!r}; one of {valid}")


# ----------------------------------------------------------------------------
# Image ops.


@register("decode")
@_inkey_outkey("decode")
def get_decode(channels=3, precise=False):
  """Decodes an encoded image string (pass-through if already decoded)."""
  def _decode(image):
    if image.dtype != tf.string:
      return image
    if precise:
      return tf.image.decode_jpeg(image, channels=channels,
                                  dct_method="INTEGER_ACCURATE")
    return tf.io.decode_image(image, channels=channels, expand_animations=False)
  return _decode


@register("resize")
@_inkey_outkey("resize")
def get_resize(size, method="bilinear", antialias=False):
  """Resizes to ``size`` with big_vision's uint8 round trip."""
  size = _size2(size, "resize")
  _check_method(method, "resize")
  return lambda image: _resize_roundtrip(image, size, method, antialias)


@register("resize_small")
@_inkey_outkey("resize_small")
def get_resize_small(smaller_size, method="area", antialias=False):
  """Resizes so that the smaller side is ``smaller_size``, keeping aspect."""
  (smaller_size, _) = _size2(smaller_size, "resize_small", "smaller_size")
  _check_method(method, "resize_small")

  def _resize_small(image):
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    factor = tf.cast(smaller_size, tf.float32) / tf.cast(tf.minimum(h, w),
                                                           tf.float32)
    nh = tf.cast(tf.round(tf.cast(h, tf.float32) * factor), tf.int32)
    nw = tf.cast(tf.round(tf.cast(w, tf.float32) * factor), tf.int32)
    return _resize_roundtrip(image, tf.stack([nh, nw]), method, antialias)
  return _resize_small


@register("central_crop")
@_inkey_outkey("central_crop")
def get_central_crop(crop_size=None):
  """Central ``crop_size`` crop (None: the largest central square)."""
  size = _size2(crop_size, "central_crop", "crop_size") if crop_size else None

  def _crop(image):
    ih, iw = tf.shape(image)[0], tf.shape(image)[1]
    if size:
      h, w = size
      tf.debugging.assert_greater_equal(
          tf.stack([ih, iw]), tf.constant([h, w]),
          message=f"central_crop({crop_size!r}): image smaller than the crop")
    else:
      h = w = tf.minimum(ih, iw)
    return tf.image.crop_to_bounding_box(image, (ih - h) // 2, (iw - w) // 2,
                                         h, w)
  return _crop


@register("inception_crop", random=True)
@_inkey_outkey("inception_crop", random=True)
def get_inception_crop(size=None, area_min=5, area_max=100, method="bilinear",
                       antialias=False, ratio_min=0.75, ratio_max=1.33):
  """Inception-style random crop (random area and aspect), then resize."""
  if not 0 < area_min <= area_max <= 100:
    raise ValueError("inception_crop: need 0 < area_min <= area_max <= 100, "
                     f"got area_min={area_min}, area_max={area_max}")
  if not 0 < ratio_min <= ratio_max:
    raise ValueError("inception_crop: need 0 < ratio_min <= ratio_max, got "
                     f"{ratio_min}, {ratio_max}")
  size = _size2(size, "inception_crop") if size else None
  _check_method(method, "inception_crop")
  kw = dict(area_range=(area_min / 100, area_max / 100),
            aspect_ratio_range=(ratio_min, ratio_max), min_object_covered=0.0,
            use_image_if_no_bounding_boxes=True)

  def _inception_crop(image, seed):
    boxes = tf.zeros([0, 0, 4], tf.float32)
    if seed is None:
      begin, crop, _ = tf.image.sample_distorted_bounding_box(
          tf.shape(image), boxes, **kw)
    else:
      begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
          tf.shape(image), boxes, seed=seed, **kw)
    out = tf.slice(image, begin, crop)
    out.set_shape([None, None, image.shape[-1]])
    if size:
      out = _resize_roundtrip(out, size, method, antialias)
    return out
  return _inception_crop


@register("flip_lr", random=True)
@_inkey_outkey("flip_lr", random=True)
def get_flip_lr():
  """Flips left-right with probability 1/2."""
  def _flip(image, seed):
    if seed is None:
      return tf.image.random_flip_left_right(image)
    return tf.image.stateless_random_flip_left_right(image, seed)
  return _flip


# ----------------------------------------------------------------------------
# General ops.


@register("value_range")
@_inkey_outkey("value_range")
def get_value_range(vmin=-1, vmax=1, in_min=0, in_max=255.0, clip_values=False):
  """``y = vmin + (x - in_min) / (in_max - in_min) * (vmax - vmin)``, float32."""
  if np.any(np.asarray(in_min, np.float32) == np.asarray(in_max, np.float32)):
    raise ValueError(f"value_range: in_min == in_max ({in_min}, {in_max})")

  def _value_range(image):
    x = tf.cast(image, tf.float32)
    x = (x - tf.constant(in_min, tf.float32)) / (
        tf.constant(in_max, tf.float32) - tf.constant(in_min, tf.float32))
    x = vmin + x * (vmax - vmin)
    if clip_values:
      x = tf.clip_by_value(x, min(vmin, vmax), max(vmin, vmax))
    return x
  return _value_range


@register("keep")
def get_keep(*keys):
  """Keeps only ``keys`` (missing ones are an error)."""
  def _keep(data):
    missing = [k for k in keys if k not in data]
    if missing:
      raise KeyError(f"keep: keys {missing} not in the example (keys: "
                     f"{sorted(data)})")
    return {k: v for k, v in data.items() if k in keys}
  return _keep


@register("drop")
def get_drop(*keys):
  """Drops ``keys`` (absent ones are ignored, as in big_vision)."""
  return lambda data: {k: v for k, v in data.items() if k not in keys}


@register("copy")
def get_copy(inkey, outkey):
  """``data[outkey] = data[inkey]``."""
  def _copy(data):
    data[outkey] = tf.nest.map_structure(lambda x: x, _get(data, inkey, "copy"))
    return data
  return _copy


@register("onehot")
def get_onehot(depth, key="labels", key_result=None, multi=True, on=1.0,
               off=0.0):
  """One-hot (``multi``: multi-hot for a vector of labels) float32 encoding."""
  if not isinstance(depth, int) or depth <= 0:
    raise ValueError(f"onehot: depth must be a positive int, got {depth!r}")

  def _onehot(data):
    labels = tf.cast(_get(data, key, "onehot"), tf.int64)
    if labels.shape.rank and multi:
      x = tf.scatter_nd(labels[:, None], tf.ones(tf.shape(labels)[0]), (depth,))
      x = tf.clip_by_value(x, 0, 1) * (on - off) + off
    else:
      x = tf.one_hot(labels, depth, on_value=on, off_value=off)
    data[key_result or key] = x
    return data
  return _onehot


@register("lower")
@_inkey_outkey("lower", "text", "text")
def get_lower():
  """ASCII lower-casing of a string tensor (``tf.strings.lower``)."""
  return tf.strings.lower


# ----------------------------------------------------------------------------
# Text ops.


@functools.lru_cache(maxsize=16)
def _tokenizer(model, max_len, eos, add_bos, lower, pad_value):
  from s2d_jax.models import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  return tok_lib.Tokenizer(model, max_len=max_len, eos=eos, add_bos=add_bos,
                           lower=lower, pad_value=pad_value)


@register("tokenize")
@_inkey_outkey("tokenize", None, "labels")
def get_tokenize(max_len, eos, model="c4_en", lower=True, pad_value=None,
                 add_bos=False):
  """big_vision's SigLIP ``tokenize`` op (``pad_value`` None: model convention).

  The input key must be given (``inkey="text"``); a vector of texts gives a
  ``(n, max_len)`` result (big_vision's ``sample_if_multi=False``).

  SigLIP: ``tokenize(max_len=64, model="c4_en", eos="sticky", pad_value=1,
  inkey="text")``. ``model`` is a name from ``tokenizer.KNOWN_MODELS`` or a path.
  """
  tok = _tokenizer(model, max_len, eos, add_bos, lower, pad_value)
  return tok.tf_tokenize


@register("tok")
@_inkey_outkey("tok", "text", "text")
def get_tok(model, length, bos="no", eos="no"):
  """big_vision's PaliGemma/SigLIP2 ``tok`` op (no lower-casing; pad = model pad).

  SigLIP2: ``lower(key="text")|tok(length=64, model="gemma", bos="no",
  eos="sticky", key="text")``.
  """
  if bos not in ("no", "yes"):
    raise ValueError(f"tok: bos must be 'no' or 'yes', got {bos!r}")
  tok = _tokenizer(model, length, eos, bos == "yes", False, "<pad>")
  return tok.tf_tokenize
