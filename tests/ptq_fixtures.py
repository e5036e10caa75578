"""Shared test models for the PTQ tests (RepQ-ViT, PTQ4ViT, ERQ, GPTQ).

A tiny big_vision ViT (`s2d_jax.models.vit`, 32x32 images, 8x8 patches -> 16 tokens,
width 32, 2 blocks, 4 heads, 10 classes) in the loop or scan layout, with a MAP head or
a plain 'gap' / 'tok' pooling, whose LayerNorms have uneven per-channel scales and
biases (so RepQ-ViT's per-channel -> per-tensor reparameterisation has work to do) and
a non-zero head.

`planted_outlier(params)` multiplies one LayerNorm output channel by `magnitude` (scale
and bias) in every block and divides the matching input rows of the consumers (q, k, v
and MLP fc1) by it: the float function is unchanged (up to rounding), but per-tensor
min-max activation quantization of those inputs loses every other channel, as with the
massive outlier channels of SigLIP. `agreement(a, b)` is the top-1 agreement of two
logit arrays (float vs itself = 1.0).

Everything is deterministic (fixed PRNG keys).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from s2d_jax.models import vit

TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=(8, 8),
            head_zeroinit=False)
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
OUTLIER_CHANNEL = 5


def model(pool_type: str = "map", scan: bool = False, **overrides):
  """The tiny ViT module (`vit._Model`)."""
  return vit.Model(NUM_CLASSES, pool_type=pool_type, scan=scan,
                   **{**TINY, **overrides})


def images(n: int = 32, seed: int = 0) -> jax.Array:
  """Fixed random images in [-1, 1], float32 `(n, 32, 32, 3)`."""
  return jax.random.uniform(jax.random.key(1000 + seed), (n,) + IMAGE_SHAPE,
                            jnp.float32, -1.0, 1.0)


def loop_to_scan(params, depth: int = TINY["depth"]):
  """Loop-layout params -> scan layout (blocks stacked under `encoderblock`)."""
  p = dict(params)
  t = dict(p["Transformer"])
  blocks = [t.pop(f"encoderblock_{i}") for i in range(depth)]
  t["encoderblock"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  p["Transformer"] = t
  return p


def _uneven_layernorms(params, rng):
  """Every LayerNorm's scale * exp(N(0, 0.8)) and bias + N(0, 0.5) per channel."""
  def visit(node, in_ln):
    out = {}
    for k, v in node.items():
      if isinstance(v, dict):
        out[k] = visit(v, in_ln or "LayerNorm" in k or k == "encoder_norm")
      elif in_ln and k == "scale":
        out[k] = v * np.exp(0.8 * rng.standard_normal(v.shape)).astype(np.float32)
      elif in_ln and k == "bias":
        out[k] = v + (0.5 * rng.standard_normal(v.shape)).astype(np.float32)
      else:
        out[k] = v
    return out
  return visit(params, False)


@functools.lru_cache(maxsize=None)
def _loop_params(pool_type: str, seed: int):
  m = model(pool_type, scan=False)
  params = jax.jit(m.init)(jax.random.key(seed), images(2))["params"]
  params = jax.tree.map(np.asarray, params)
  rng = np.random.RandomState(seed)
  params = _uneven_layernorms(params, rng)
  # A head with clear margins (random init gives near-uniform logits).
  k = params["head"]["kernel"]
  params["head"]["kernel"] = (3.0 * rng.standard_normal(k.shape) /
                              np.sqrt(k.shape[0])).astype(np.float32)
  return jax.tree.map(jnp.asarray, params)


def vit_model(pool_type: str = "map", scan: bool = False, seed: int = 0):
  """`(model, params)`: the tiny ViT with uneven LayerNorms, loop or scan layout.

  Both layouts hold the same numbers (scan = the loop's blocks stacked).
  """
  params = _loop_params(pool_type, seed)
  if scan:
    params = loop_to_scan(params)
  return model(pool_type, scan=scan), params


def planted_outlier(params, magnitude: float = 100.0,
                    channel: int = OUTLIER_CHANNEL, depth: int = TINY["depth"]):
  """Plant one massive post-LayerNorm channel in every block (float unchanged).

  For both LayerNorms of every block: scale[c], bias[c] *= magnitude; the input row c
  of the consumers (q, k, v kernels `(D, H, Dh)`; MLP fc1 `(D, mlp)`) /= magnitude.
  Works on loop and scan params.
  """
  def block(b):
    b = jax.tree.map(lambda x: x, b)
    m = magnitude
    for ln in ("LayerNorm_0", "LayerNorm_1"):
      b[ln] = {k: v.at[..., channel].multiply(m) for k, v in b[ln].items()}
    attn = dict(b["MultiHeadDotProductAttention_0"])
    for name in ("query", "key", "value"):
      k = attn[name]["kernel"]
      idx = (Ellipsis, channel, slice(None), slice(None))
      attn[name] = {**attn[name], "kernel": k.at[idx].divide(m)}
    b["MultiHeadDotProductAttention_0"] = attn
    mlp = dict(b["MlpBlock_0"])
    k = mlp["Dense_0"]["kernel"]
    mlp["Dense_0"] = {**mlp["Dense_0"],
                      "kernel": k.at[..., channel, :].divide(m)}
    b["MlpBlock_0"] = mlp
    return b

  p = dict(params)
  t = dict(p["Transformer"])
  if "encoderblock" in t:
    t["encoderblock"] = block(dict(t["encoderblock"]))
  else:
    for i in range(depth):
      t[f"encoderblock_{i}"] = block(dict(t[f"encoderblock_{i}"]))
  p["Transformer"] = t
  return p


_JITTED: dict = {}


def logits(apply_fn, variables, x) -> np.ndarray:
  """`apply_fn(variables, x)[0]` (big_vision ViT: logits), jitted, as numpy.

  The jitted function is cached per `apply_fn` (a bound `model.apply` is keyed by its
  module), so repeated calls with new variables do not recompile.
  """
  owner = getattr(apply_fn, "__self__", None)
  key = (id(owner), apply_fn.__func__) if owner is not None else id(apply_fn)
  if key not in _JITTED:
    _JITTED[key] = (apply_fn, jax.jit(lambda v, x: apply_fn(v, x)[0]))
  return np.asarray(_JITTED[key][1](variables, x))


def agreement(a, b) -> float:
  """Top-1 agreement of two `(N, classes)` logit arrays, in [0, 1]."""
  return float(np.mean(np.argmax(np.asarray(a), -1) == np.argmax(np.asarray(b), -1)))
