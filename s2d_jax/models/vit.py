"""Vision Transformer, parameter-for-parameter compatible with big_vision's `vit.py`.

A re-implementation of `big_vision/models/vit.py` (same module names, same parameter
tree, same numerics), so that big_vision checkpoints (SigLIP, SigLIP2, AugReg, ...)
load without renaming.

Forward pass for an image batch `x` of shape (B, H, W, 3), patch size (p, p):

    tokens  = Conv_{p x p, stride p, VALID}(x)            (B, H/p, W/p, D) -> (B, N, D)
    tokens += pos_embedding                               (1, N, D), learned or sincos2d
    [cls token prepended if pool_type == 'tok']
    for each block:  x = x + MHSA(LN(x));  x = x + MLP(LN(x))      (pre-LN)
        MLP(y) = Dense_1(gelu_tanh(Dense_0(y)))            (D -> mlp_dim -> D)
    x = LN_encoder_norm(x)
    pool: 'map'  -> MAPHead: probe attends to x, y = a + MLP(LN(a))  (no residual
                    around the attention itself), take the single probe token
          'gap'  -> mean over tokens;  '0' / 'tok' -> token 0;  'none' -> no pooling
    [pre_logits = tanh(Dense(rep_size))]   [logits = Dense(num_classes), zero-init]

All LayerNorms use eps = 1e-6 (flax default); GELU is the tanh approximation (flax
default). `dtype_mm` is the dtype of the patch embedding and of every matmul inside
the encoder blocks (as in big_vision; the MAP head stays float32).

Parameter layout: `Transformer/encoderblock_{i}/...` (python loop, `scan=False`) or
`Transformer/encoderblock/...` with a leading layer axis (`scan=True`, `nn.scan` over
an `nn.remat`-ed block). In scan mode both the `params` and the `intermediates`
collections carry the leading layer axis, so values sown inside a block (e.g. by
`flax.linen.intercept_methods`) come out stacked per layer, exactly like the kernels.

`model.apply({'params': p}, images, train=False) -> (x, out)`, where `out` has
big_vision's keys: 'stem', 'with_posemb', 'encoder' (dict with 'block00', ...,
each holding 'sa', '+sa', 'mlp', '+mlp'; plus 'pre_ln' in loop mode), 'encoded',
'head_input', 'pre_logits_2d', 'pre_logits', and 'logits_2d' / 'logits' when
`num_classes` is set.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# name -> (width, depth, mlp_dim, num_heads); Table 2 of arXiv:2106.04560 plus the
# SigLIP shape-optimised So400m (arXiv:2305.13035) and the SigLIP2 g-opt/G-opt.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "g-opt": (1536, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    "G-opt": (1536, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
}

POOL_TYPES = ("map", "gap", "0", "tok", "none")


def decode_variant(variant: Optional[str]) -> dict[str, Any]:
  """Turns "B" or "B/16" into {'width', 'depth', 'mlp_dim', 'num_heads'[, 'patch_size']}.

  Raises ValueError naming the variant for an unknown name or a malformed patch size.
  """
  if variant is None:
    return {}
  if not isinstance(variant, str):
    raise ValueError(f"variant must be a string like 'B/16', got {variant!r}")
  name, patch = variant, {}
  if "/" in variant:
    name, p = variant.split("/", 1)
    if not re.fullmatch(r"[1-9][0-9]*", p):
      raise ValueError(
          f"Bad patch size {p!r} in variant {variant!r}; expected e.g. 'B/16'.")
    patch = {"patch_size": (int(p), int(p))}
  if name not in VARIANTS:
    raise ValueError(
        f"Unknown ViT variant {name!r} (from {variant!r}); known: "
        f"{', '.join(VARIANTS)}")
  width, depth, mlp_dim, num_heads = VARIANTS[name]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
              **patch)


def variant_name(width: int, depth: int, mlp_dim: int, num_heads: int) -> Optional[str]:
  """Inverse of the variants table: the name for these dimensions, or None."""
  for name, dims in VARIANTS.items():
    if dims == (width, depth, mlp_dim, num_heads):
      return name
  return None


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.,
                     dtype=jnp.float32) -> jax.Array:
  """2D sin-cos position embedding (MoCo v3), shape (1, h*w, width).

  With omega_d = temperature^(-d / (width/4 - 1)), d = 0 .. width/4 - 1, and grid
  coordinates (y, x) of token m = y*w + x:
      pe[m] = [sin(x omega), cos(x omega), sin(y omega), cos(y omega)].
  """
  if width % 4:
    raise ValueError(f"sincos2d posemb needs width % 4 == 0, got width={width}")
  y, x = jnp.mgrid[:h, :w]
  omega = jnp.arange(width // 4) / (width // 4 - 1)
  omega = 1. / (temperature**omega)
  y = jnp.einsum("m,d->md", y.flatten(), omega)
  x = jnp.einsum("m,d->md", x.flatten(), omega)
  pe = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
  return jnp.asarray(pe, dtype)[None, :, :]


def get_posemb(module: nn.Module, typ: str, seqshape, width: int, name: str,
               dtype=jnp.float32):
  """Learned (normal(1/sqrt(width)) init, shape (1, prod(seqshape), width)) or sincos2d."""
  if typ == "learn":
    return module.param(name, nn.initializers.normal(stddev=1 / np.sqrt(width)),
                        (1, int(np.prod(seqshape)), width), dtype)
  if typ == "sincos2d":
    return posemb_sincos_2d(*seqshape, width, dtype=dtype)
  raise ValueError(f"Unknown posemb type: {typ!r}; expected 'learn' or 'sincos2d'")


class MlpBlock(nn.Module):
  """Transformer MLP: Dense(mlp_dim or 4d) -> gelu(tanh approx.) -> dropout -> Dense(d)."""
  mlp_dim: Optional[int] = None
  dropout: float = 0.0
  dtype_mm: Any = "float32"

  @nn.compact
  def __call__(self, x, deterministic=True):
    inits = dict(kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=nn.initializers.normal(stddev=1e-6))
    d = x.shape[-1]
    x = nn.Dense(self.mlp_dim or 4 * d, dtype=self.dtype_mm, **inits)(x)
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_emb"))
    x = nn.gelu(x)  # approximate=True: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    x = nn.Dense(d, dtype=self.dtype_mm, **inits)(x)
    return x


class Encoder1DBlock(nn.Module):
  """Pre-LN block: x += MHSA(LN(x)); x += MLP(LN(x)). Returns (x, out)."""
  mlp_dim: Optional[int] = None
  num_heads: int = 12
  dropout: float = 0.0
  dtype_mm: Any = "float32"

  @nn.compact
  def __call__(self, x, deterministic=True):
    out = {}
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_emb"))
    y = nn.LayerNorm()(x)
    y = out["sa"] = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads,
        kernel_init=nn.initializers.xavier_uniform(),
        deterministic=deterministic,
        dtype=self.dtype_mm,
    )(y, y)
    y = nn.with_logical_constraint(y, ("act_batch", "act_len", "act_emb"))
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = out["+sa"] = x + y

    y = nn.LayerNorm()(x)
    y = out["mlp"] = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout,
                              dtype_mm=self.dtype_mm)(y, deterministic)
    y = nn.with_logical_constraint(y, ("act_batch", "act_len", "act_emb"))
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = out["+mlp"] = x + y
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_emb"))
    return x, out


class Encoder(nn.Module):
  """Stack of `depth` blocks followed by LayerNorm 'encoder_norm'.

  scan=False: blocks `encoderblock_{i}`; scan=True: one `encoderblock` whose params
  and intermediates have a leading axis of size `depth` (nn.scan of nn.remat(block)).
  """
  depth: int
  mlp_dim: Optional[int] = None
  num_heads: int = 12
  dropout: float = 0.0
  scan: bool = False
  remat_policy: str = "nothing_saveable"
  dtype_mm: Any = "float32"

  @nn.compact
  def __call__(self, x, deterministic=True):
    out = {}
    if self.scan:
      policy = getattr(jax.checkpoint_policies, self.remat_policy, None)
      if policy is None and self.remat_policy not in (None, "none", ""):
        raise ValueError(
            f"Unknown remat_policy {self.remat_policy!r}; expected a name in "
            "jax.checkpoint_policies, e.g. 'nothing_saveable'")
      block = nn.remat(Encoder1DBlock, prevent_cse=False,
                       static_argnums=(2,),  # 0=self, 1=x, 2=deterministic
                       policy=policy)
      x, scan_out = nn.scan(
          block,
          variable_axes={"params": 0, "intermediates": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=nn.broadcast,
          length=self.depth)(
              name="encoderblock", dtype_mm=self.dtype_mm, mlp_dim=self.mlp_dim,
              num_heads=self.num_heads, dropout=self.dropout)(x, deterministic)
      for lyr in range(self.depth):
        out[f"block{lyr:02d}"] = jax.tree.map(lambda o, l=lyr: o[l], scan_out)
    else:
      for lyr in range(self.depth):
        block = Encoder1DBlock(
            name=f"encoderblock_{lyr}", dtype_mm=self.dtype_mm,
            mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout)
        x, out[f"block{lyr:02d}"] = block(x, deterministic)
      out["pre_ln"] = x  # alias for the last block's output
    return nn.LayerNorm(name="encoder_norm")(x), out


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends to the tokens.

  a = MHA(probe, x) (B, 1, D);  y = a + MLP(LN(a));  returns y[:, 0] (B, D).
  """
  mlp_dim: Optional[int] = None
  num_heads: int = 12

  @nn.compact
  def __call__(self, x):
    n, _, d = x.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), x.dtype)
    probe = jnp.tile(probe, [n, 1, 1])
    x = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads,
        kernel_init=nn.initializers.xavier_uniform())(probe, x)
    y = nn.LayerNorm()(x)
    x = x + MlpBlock(mlp_dim=self.mlp_dim)(y)
    return x[:, 0]


class _Model(nn.Module):
  """ViT (see the module docstring)."""

  num_classes: Optional[int] = None
  patch_size: Sequence[int] = (16, 16)
  width: int = 768
  depth: int = 12
  mlp_dim: Optional[int] = None  # defaults to 4 * width
  num_heads: int = 12
  posemb: str = "learn"  # or "sincos2d"
  rep_size: Union[int, bool] = False
  dropout: float = 0.0
  pool_type: str = "gap"  # map, gap, 0, tok, none
  head_zeroinit: bool = True
  scan: bool = False
  remat_policy: str = "nothing_saveable"
  dtype_mm: Any = "float32"

  @nn.compact
  def __call__(self, image, *, train=False):
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f"Unknown pool type: {self.pool_type!r}; expected one of "
                       f"{POOL_TYPES}")
    out = {}
    image = jnp.asarray(image, self.dtype_mm)
    if image.ndim != 4:
      raise ValueError(f"ViT expects images of shape (B, H, W, C), got {image.shape}")

    x = out["stem"] = nn.Conv(
        self.width, tuple(self.patch_size), strides=tuple(self.patch_size),
        padding="VALID", name="embedding", dtype=self.dtype_mm)(image)
    n, h, w, c = x.shape
    x = jnp.reshape(x, [n, h * w, c])

    # The posemb is added before the cls token is prepended.
    x = out["with_posemb"] = x + get_posemb(
        self, self.posemb, (h, w), c, "pos_embedding", x.dtype)

    if self.pool_type == "tok":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c), x.dtype)
      x = jnp.concatenate([jnp.tile(cls, [n, 1, 1]), x], axis=1)

    x = nn.Dropout(rate=self.dropout)(x, not train)

    x, out["encoder"] = Encoder(
        depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        dropout=self.dropout, scan=self.scan, remat_policy=self.remat_policy,
        dtype_mm=self.dtype_mm, name="Transformer")(x, deterministic=not train)
    encoded = out["encoded"] = x

    if self.pool_type == "map":
      x = out["head_input"] = MAPHead(num_heads=self.num_heads,
                                      mlp_dim=self.mlp_dim)(x)
    elif self.pool_type == "gap":
      x = out["head_input"] = jnp.mean(x, axis=1)
    elif self.pool_type == "0":
      x = out["head_input"] = x[:, 0]
    elif self.pool_type == "tok":
      x = out["head_input"] = x[:, 0]
      encoded = encoded[:, 1:]

    x_2d = jnp.reshape(encoded, [n, h, w, -1])

    if self.rep_size:
      rep_size = self.width if self.rep_size is True else self.rep_size
      hid = nn.Dense(rep_size, name="pre_logits")
      x_2d = nn.tanh(hid(x_2d))
      x = nn.tanh(hid(x))

    out["pre_logits_2d"] = x_2d
    out["pre_logits"] = x

    if self.num_classes:
      kw = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
      head = nn.Dense(self.num_classes, name="head", **kw)
      x_2d = out["logits_2d"] = head(x_2d)
      x = out["logits"] = head(x)

    return x, out


def Model(num_classes: Optional[int] = None, *, variant: Optional[str] = None,
          **kw) -> _Model:  # pylint: disable=invalid-name
  """ViT factory: `Model(1000, variant="B/16", pool_type="map")`; kw override the variant."""
  return _Model(num_classes, **{**decode_variant(variant), **kw})


def load(init_params: Any, init_file: str, model_cfg: Any = None,
         dont_load: Sequence[str] = (), *, allow_nonfinite: bool = False) -> dict:
  """Params of a ViT from a big_vision npz, merged into `init_params` (big_vision API).

  `init_file` is a ViT npz or a two-towers (SigLIP) npz, whose image tower `img/` is
  taken (a `file.npz:sub/tree` suffix selects a subtree explicitly). The checkpoint's
  layout (loop / scan) is converted to `model_cfg['scan']`, a learned position
  embedding of another grid is resampled bilinearly to `init_params`' (big_vision's
  `resample_posemb`), and leaves whose path fully matches a `dont_load` regex keep their
  value from `init_params` (e.g. `head/.*` for a new classifier head). Every other
  leaf of `init_params` must be in the file with the same shape: a CheckpointError
  names the missing, unexpected or reshaped key. `init_params` may be abstract
  (`jax.ShapeDtypeStruct`s) when nothing is excluded. Params of the file holding
  NaN / Inf raise a CheckpointError naming them, unless `allow_nonfinite=True`.
  Returns host numpy arrays.
  """
  from s2d_jax.models import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  params = ckpt_lib.load_params(init_file, allow_nonfinite=allow_nonfinite)
  if "img" in params:
    params = params["img"]
  elif not ("embedding" in params and "Transformer" in params):
    raise ckpt_lib.CheckpointError(
        f"{init_file}: no image tower: expected an 'img' subtree or a ViT tree with "
        f"'embedding' and 'Transformer' (top-level keys: {sorted(params)})")
  return _merge_into(params, init_params, model_cfg, dont_load, "img")


def _merge_into(params, init_params, model_cfg, dont_load, where: str) -> dict:
  """Layout conversion, posemb resampling and the merge shared by the `load`s."""
  from s2d_jax.models import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  scan = bool(dict(model_cfg or {}).get("scan", False))
  params = ckpt_lib.convert_layout(params, scan, where)
  pe = init_params.get("pos_embedding") if hasattr(init_params, "get") else None
  if pe is not None and "pos_embedding" in params:
    old = params["pos_embedding"]
    if np.shape(old) != tuple(pe.shape) and np.shape(old)[2:] == tuple(pe.shape)[2:]:
      params = {**params, "pos_embedding": ckpt_lib.resample_posemb(old, pe.shape)}
  init = init_params if ckpt_lib.compile_patterns(dont_load) else None
  merged = ckpt_lib.merge_params(params, init_params, dont_load, init)
  return jax.tree.map(_host, merged)


def _host(x):
  """numpy for loaded values; abstract leaves (not loaded, no value) stay abstract."""
  return x if isinstance(x, jax.ShapeDtypeStruct) else np.asarray(x)
