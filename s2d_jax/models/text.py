"""Text transformer tower, compatible with big_vision's `proj/image_text/text_transformer.py`.

For int32 tokens t of shape (B, L):

    x = Embed_0(t) + pos_embedding              (B, L, D); pos_embedding (1, L, D)
    x, enc = Encoder_0(x)                       the ViT encoder (no causal mask), final LN
    pooled = x[:, -1]  ('last': with "sticky" EOS padding the last token is EOS)
           | x[:, 0] ('first') | mean ('mean'/'gap') | max ('max'/'gmp') | MAPHead ('map')
    logits = head(pooled)                       Dense(num_classes), if num_classes

Parameter names: `Embed_0/embedding` (vocab, D), `pos_embedding`, `Encoder_0/...`
(`encoderblock_{i}` or scanned `encoderblock`, `encoder_norm`), `MAPHead_0`, `head`.
Vocabularies of the public checkpoints: 32_000 (SigLIP en, c4_en sentencepiece),
250_000 (SigLIP i18n, mc4), 256_000 (SigLIP2, Gemma); lengths 64 (16 for SigLIP
So400m/14 @224). The sequence length is fixed by `pos_embedding`.

`out` holds 'embedded', 'transformed', the encoder's 'blockNN' (and 'pre_ln'),
'vocab_logits' (x @ embedding^T, tied weights), 'pre_logits' and 'logits'.
`dtype_mm` is an extension (big_vision's text tower always runs in float32, the
default here).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from s2d_jax.models import vit

POOL_TYPES = ("last", "first", "mean", "gap", "max", "gmp", "map")


class _Model(nn.Module):
  """Text transformer (see the module docstring)."""

  num_classes: Optional[int]
  width: int = 512
  depth: int = 12
  mlp_dim: int = 2048
  num_heads: int = 8
  dropout: float = 0.0
  vocab_size: int = 32_000
  pool_type: str = "last"
  scan: bool = False
  remat_policy: str = "nothing_saveable"
  dtype_mm: Any = "float32"

  @nn.compact
  def __call__(self, text, *, train=False):
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f"Cannot do pooling {self.pool_type!r}; expected one of "
                       f"{POOL_TYPES}")
    text = jnp.asarray(text)
    if text.ndim != 2:
      raise ValueError(f"Text tower expects int tokens of shape (B, L), got {text.shape}")
    out = {}
    embedding = nn.Embed(num_embeddings=self.vocab_size, features=self.width)
    x = out["embedded"] = embedding(text)

    _, l, d = x.shape
    x = x + self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(d)),
                       (1, l, d), x.dtype)

    x, encoder_out = vit.Encoder(
        depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        scan=self.scan, remat_policy=self.remat_policy, dropout=self.dropout,
        dtype_mm=self.dtype_mm)(x, deterministic=not train)
    out.update({"transformed": x, **encoder_out})

    # Tied output projection; dead code (removed by XLA) unless someone reads it.
    out["vocab_logits"] = embedding.attend(x)

    if self.pool_type == "last":
      x = out["pre_logits"] = x[:, -1, :]
    elif self.pool_type == "first":
      x = out["pre_logits"] = x[:, 0, :]
    elif self.pool_type in ("mean", "gap"):
      x = out["pre_logits"] = x.mean(axis=1)
    elif self.pool_type in ("max", "gmp"):
      x = out["pre_logits"] = x.max(axis=1)
    else:  # map
      x = out["pre_logits"] = vit.MAPHead(num_heads=self.num_heads,
                                          mlp_dim=self.mlp_dim)(x)

    if self.num_classes:
      x = out["logits"] = nn.Dense(self.num_classes, name="head")(x)
    return x, out


def Model(num_classes: Optional[int] = None, *, variant: Optional[str] = None,
          **kw) -> _Model:  # pylint: disable=invalid-name
  """Text tower factory: `Model(768, variant="B", vocab_size=32_000)`.

  The variant sets width/depth/mlp_dim/num_heads (a patch size in it is ignored,
  e.g. "So400m/14" == "So400m"); kw override it.
  """
  dims = vit.decode_variant(variant)
  dims.pop("patch_size", None)
  return _Model(num_classes, **{**dims, **kw})
