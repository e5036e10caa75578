"""SentencePiece tokenizers with big_vision's SigLIP / SigLIP2 conventions.

big_vision tokenizes SigLIP text with (``SigLIP_demo.ipynb``)::

  tokenize(max_len=64, model="c4_en", eos="sticky", pad_value=1, inkey="text")

(``lower=True`` by default) and SigLIP2 text with (``SigLIP2_demo.ipynb``)::

  lower(key="text")|tok(length=64, model="gemma", bos="no", eos="sticky", key="text")

which pads with the Gemma model's ``<pad>`` id (0). Both reduce to one rule,
implemented by :class:`Tokenizer`. For a text ``s`` and ``L = max_len``:

1. ``s`` is lower-cased with ``tf.strings.lower`` semantics: ASCII letters
   only (``"ÄB" -> "Äb"``), exactly like big_vision.
2. ``ids = [bos]? + sp.encode(s) + [eos]?`` (``bos`` only if ``add_bos``;
   ``eos`` unless ``eos="none"``).
3. ``len(ids) < L``: right-pad with ``pad_value`` to length ``L``.
   ``len(ids) >= L``: ``eos="sticky"`` keeps ``ids[:L-1] + ids[-1:]`` (the
   final EOS survives truncation); otherwise ``ids[:L]``.

Conventions per known model (``pad_value=None`` picks them):

=========  ===========================================  ====  =====  ===
name       file                                          pad   EOS    BOS
=========  ===========================================  ====  =====  ===
c4_en      gs://t5-data/vocabs/cc_en.32000/...          1     1      no
mc4        gs://t5-data/vocabs/mc4.250000.100extra/...  1     1      no
gemma      gs://big_vision/gemma_tokenizer.model        0     1      no
=========  ===========================================  ====  =====  ===

(``cc_all``, ``t5``, ``mt5`` follow the c4 conventions.) SigLIP text towers
use ``max_len`` 64 (16 for So400m/14 at 224). Model files are read with
``tf.io.gfile`` so local paths and ``gs://`` both work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

KNOWN_MODELS = {
    "c4_en": "gs://t5-data/vocabs/cc_en.32000/sentencepiece.model",
    "cc_all": "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model",
    "t5": "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model",
    "mc4": "gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model",
    "mt5": "gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model",
    "gemma": "gs://big_vision/gemma_tokenizer.model",
}

# pad value per known model name: an int, or "<pad>" = the model's pad id.
_DEFAULT_PAD = {"c4_en": 1, "cc_all": 1, "t5": 1, "mc4": 1, "mt5": 1,
                "gemma": "<pad>"}

# SigLIP / SigLIP2 text tower vocabulary size -> tokenizer name.
VOCAB_TO_MODEL = {32_000: "c4_en", 250_000: "mc4", 256_000: "gemma"}

_EOS_MODES = ("none", "yes", "sticky")
_EOS_ALIASES = {"no": "none"}


def ascii_lower(text: str) -> str:
  """Lower-cases ASCII letters only, like ``tf.strings.lower`` (encoding='')."""
  return text.encode("utf-8").lower().decode("utf-8")


def pad_or_truncate(ids: Sequence[int], max_len: int, *, pad_value: int,
                    sticky_eos: bool) -> np.ndarray:
  """big_vision's fixed-length rule (see module docstring, step 3).

  Args:
    ids: token ids (already with BOS/EOS as wanted).
    max_len: output length L >= 1.
    pad_value: id written after the text.
    sticky_eos: when truncating, keep the last id (the EOS) in position L-1.

  Returns:
    int32 array of shape (L,).
  """
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1, got {max_len}")
  ids = list(ids)
  if len(ids) >= max_len:
    out = ids[:max_len - 1] + ids[-1:] if sticky_eos else ids[:max_len]
  else:
    out = ids + [pad_value] * (max_len - len(ids))
  return np.asarray(out, np.int32)


def _read_bytes(path: str) -> bytes:
  """Reads a local file directly, anything with a scheme (gs://) via tf.io.gfile."""
  if "://" not in path:
    try:
      with open(path, "rb") as f:
        return f.read()
    except FileNotFoundError:
      raise FileNotFoundError(
          f"SentencePiece model file not found: {path!r}") from None
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"SentencePiece model file not found: {path!r}")
  with tf.io.gfile.GFile(path, "rb") as f:
    return f.read()


class Tokenizer:
  """A SentencePiece tokenizer producing fixed-length int32 token arrays.

  Args:
    model: a known name (``"c4_en"``, ``"mc4"``, ``"gemma"``, ``"cc_all"``,
      ``"t5"``, ``"mt5"``) or a path (local or ``gs://``) to a ``.model`` file.
    max_len: output length L (SigLIP: 64, or 16 for So400m/14-224).
    eos: ``"none"`` (alias ``"no"``), ``"yes"`` (append EOS, may be cut off)
      or ``"sticky"`` (append EOS and keep it when truncating).
    add_bos: prepend the model's BOS id (big_vision SigLIP/SigLIP2: no).
    lower: ASCII lower-casing before encoding (big_vision: yes).
    pad_value: int id, or a piece string such as ``"<pad>"`` (looked up in the
      model), or None for the convention of the named model (table above;
      for a plain path: the model's pad id).
    model_path: where to read the file of a *known name* from (e.g. a local
      copy of c4_en); the name still fixes the conventions.
  """

  def __init__(self, model: str = "c4_en", *, max_len: int = 64,
               eos: str = "sticky", add_bos: bool = False, lower: bool = True,
               pad_value: int | str | None = None,
               model_path: str | None = None):
    import sentencepiece  # pylint: disable=g-import-not-at-top
    eos = _EOS_ALIASES.get(eos, eos)
    if eos not in _EOS_MODES:
      raise ValueError(f"eos must be one of {_EOS_MODES} (or 'no'), got {eos!r}")
    if not isinstance(max_len, (int, np.integer)) or max_len < 1:
      raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    self.name = model
    if model in KNOWN_MODELS:
      path = model_path or KNOWN_MODELS[model]
      default_pad = _DEFAULT_PAD[model]
    else:
      if model_path is not None:
        raise ValueError(
            f"model_path is only for known names {sorted(KNOWN_MODELS)}; "
            f"got model={model!r}, model_path={model_path!r}")
      path = model
      default_pad = "<pad>"
    self.path = path
    self._sp = sentencepiece.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(_read_bytes(path))
    except (RuntimeError, OSError) as e:
      if isinstance(e, FileNotFoundError):
        raise
      raise ValueError(f"{path!r} is not a valid SentencePiece model: {e}") from e
    self.max_len = int(max_len)
    self.eos = eos
    self.add_bos = bool(add_bos)
    self.lower = bool(lower)
    if eos != "none" and self._sp.eos_id() < 0:
      raise ValueError(f"eos={eos!r} but the model {path!r} defines no EOS id")
    if self.add_bos and self._sp.bos_id() < 0:
      raise ValueError(f"add_bos=True but the model {path!r} defines no BOS id")
    pad = default_pad if pad_value is None else pad_value
    if isinstance(pad, str):
      pid = self._sp.PieceToId(pad)
      if pad == "<pad>":
        pid = self._sp.pad_id()
      if pid < 0 or (pid == self._sp.unk_id() and pad != self._sp.IdToPiece(pid)):
        raise ValueError(
            f"pad_value {pad!r} is not a piece of the model {path!r}; pass an "
            "int pad_value")
      pad = pid
    pad = int(pad)
    if not 0 <= pad < self.vocab_size:
      raise ValueError(
          f"pad_value {pad} outside the vocabulary [0, {self.vocab_size})")
    self.pad_value = pad

  @classmethod
  def for_vocab_size(cls, vocab_size: int, *, max_len: int = 64,
                     model_path: str | None = None) -> "Tokenizer":
    """The tokenizer a SigLIP/SigLIP2 text tower of ``vocab_size`` expects."""
    if vocab_size not in VOCAB_TO_MODEL:
      raise ValueError(
          f"no known SigLIP tokenizer for vocab_size={vocab_size}; known: "
          f"{VOCAB_TO_MODEL}. Build Tokenizer(path, ...) explicitly.")
    return cls(VOCAB_TO_MODEL[vocab_size], max_len=max_len,
               model_path=model_path)

  # ---- properties -----------------------------------------------------------
  @property
  def vocab_size(self) -> int:
    return self._sp.GetPieceSize()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def pad_id(self) -> int:
    """The model's own ``<pad>`` id (may differ from :attr:`pad_value`)."""
    return self._sp.pad_id()

  def __repr__(self):
    return (f"Tokenizer({self.name!r}, max_len={self.max_len}, eos={self.eos!r},"
            f" add_bos={self.add_bos}, lower={self.lower}, "
            f"pad_value={self.pad_value}, vocab_size={self.vocab_size})")

  # ---- python API -------------------------------------------------------------
  def encode(self, text: str | bytes) -> list[int]:
    """Variable-length ids: ``[bos]? + sp(lower?(text)) + [eos]?``."""
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    if not isinstance(text, str):
      raise TypeError(f"expected a str, got {type(text).__name__}")
    if self.lower:
      text = ascii_lower(text)
    ids = list(self._sp.EncodeAsIds(text))
    if self.add_bos:
      ids = [self.bos_id] + ids
    if self.eos != "none":
      ids = ids + [self.eos_id]
    return ids

  def __call__(self, texts: str | bytes | Sequence[str | bytes] | np.ndarray
               ) -> np.ndarray:
    """Fixed-length int32 tokens: shape (L,) for one text, (*S, L) for an array."""
    if isinstance(texts, (str, bytes)):
      return pad_or_truncate(self.encode(texts), self.max_len,
                             pad_value=self.pad_value,
                             sticky_eos=self.eos == "sticky")
    arr = np.asarray(texts, dtype=object)
    flat = [self(t) for t in arr.reshape(-1)]
    out = np.stack(flat) if flat else np.zeros((0, self.max_len), np.int32)
    return out.reshape(arr.shape + (self.max_len,))

  def decode(self, tokens: Sequence[int] | np.ndarray, *,
             stop_at_eos: bool = True) -> str:
    """Inverse of :meth:`__call__` (up to lower-casing and truncation).

    Stops at the first EOS if ``stop_at_eos``; padding and control ids are
    dropped.
    """
    toks = [int(t) for t in np.asarray(tokens).reshape(-1)]
    if stop_at_eos and self.eos_id >= 0 and self.eos_id in toks:
      toks = toks[:toks.index(self.eos_id)]
    toks = [t for t in toks if t != self.pad_value]
    return self._sp.DecodeIds(toks)

  def id_to_piece(self, idx: int) -> str:
    return self._sp.IdToPiece(int(idx))

  # ---- tf.data API -------------------------------------------------------
  def tf_tokenize(self, text: Any):
    """``__call__`` as a TF op: string tensor of shape S -> int32 (*S, L)."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    text = tf.convert_to_tensor(text)
    if text.dtype != tf.string:
      raise TypeError(f"tf_tokenize expects a tf.string tensor, got {text.dtype}")

    def _np(t):
      t = np.asarray(t, dtype=object)  # 0-d inputs arrive as plain bytes.
      return self(t.item() if t.ndim == 0 else t)

    out = tf.numpy_function(_np, [text], tf.int32, stateful=False)
    out = tf.reshape(out, tf.concat([tf.shape(text), [self.max_len]], 0))
    out.set_shape(text.shape.concatenate([self.max_len]))
    return out
