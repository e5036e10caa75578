"""Uniform fake quantization, range calibration and named quantization settings.

Pure ``jax.numpy``; applying the quantizers to a Flax model lives in
``s2d_jax/quant_model.py``.

Quantizer (DESIGN.md item 3). For ``b`` bits and a range ``[lo, hi]`` per scale
group (one group per index of the axes listed in ``axis``; ``axis=None`` = one
group for the whole tensor):

* symmetric (narrow range, zero point 0):
  ``a = max(|lo|, |hi|)``, ``q_max = 2^(b-1) - 1``, ``s = a / q_max``,
  ``x̂ = s · clip(round(x / s), -q_max, q_max)`` — ``2^b - 1`` levels.
* asymmetric: ``q_max = 2^b - 1``, ``s = (hi - lo) / q_max``,
  ``z = clip(round(-lo / s), 0, q_max)``,
  ``x̂ = s · (clip(round(x / s) + z, 0, q_max) - z)`` — ``2^b`` levels.

``round`` is round-half-to-even (``jnp.round``). Values outside the range are
clipped to the nearest level; inside the range ``|x̂ - x| ≤ s / 2``. A group
whose range is all zero gets ``s = 1`` (so it maps exactly to zero, no NaN).
Without an explicit range the group's min/max is used (dynamic quantization).

Non-finite values (NaN, ±Inf). Every range (dynamic min/max and the
calibrators below) is computed from the *finite* values of its group only, so
one NaN or Inf never changes how the other values of its group are quantized;
a group without any finite value gets the range ``[0, 0]``. The non-finite
elements themselves pass through unchanged (NaN stays NaN, ±Inf stays ±Inf,
with ``ste`` their gradient is the identity), so a fault stays visible
downstream instead of being rounded into a plausible number. An explicit
``qrange`` must be finite: host values (Python numbers, numpy arrays) are
checked and a non-finite end raises ``ValueError``; device arrays and tracers
are not inspected (no host sync inside ``jit``) and a non-finite end makes its
group's output NaN (``s`` is NaN or Inf there), never a silent ``s = 1``.

Straight-through estimator (QAT): with ``ste=True`` the forward value is
``x̂`` and the gradient w.r.t. ``x`` is ``1`` for ``x`` inside the clipping
range and ``0`` outside it (``ste_clipped=True``, the default), or ``1``
everywhere (``ste_clipped=False``). Ranges/scales carry no gradient.

Calibrators return a range ``(lo, hi)`` with ``keepdims`` shapes (broadcastable
against ``x``), from the finite values of each group: ``'minmax'``,
``'percentile'`` (``p``-th percentile of ``|x|`` when symmetric, ``(100-p, p)``
percentiles otherwise; linear interpolation, as ``numpy.percentile`` on the
finite values) and ``'mse'`` (grid search over clipping ratios
``r ∈ {1/G, 2/G, ..., 1}`` of the min/max range minimising ``Σ (x̂ - x)²`` over
the finite values of each group).

Inputs: ``x`` must be floating point (integer or bool arrays raise: quantizing
integers is not what this module does); ``bits`` is a static integer (Python
or numpy integer, not bool) in ``[2, 16]``.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Axis = int | Sequence[int] | None

MIN_BITS, MAX_BITS = 2, 16
CALIBRATORS = ("minmax", "percentile", "mse")


def _check_bits(bits, name: str = "bits") -> int:
  """``bits`` as a Python int; Python and numpy integers in [2, 16] only.

  Bools, floats (even integral ones) and traced values are rejected: the bit
  width fixes the grid, so it must be static.
  """
  bad = isinstance(bits, (bool, np.bool_)) or getattr(bits, "dtype", None) == bool
  if not bad:
    try:
      b = operator.index(bits)
    except TypeError:  # floats, strings, None, tracers (TracerIntegerConversionError)
      bad = True
  if bad:
    raise ValueError(f"{name} must be a static integer (Python or numpy int, not "
                     f"bool or float) in [{MIN_BITS}, {MAX_BITS}], got "
                     f"{type(bits).__name__} {bits!r}")
  if not MIN_BITS <= b <= MAX_BITS:
    raise ValueError(f"{name} must be in [{MIN_BITS}, {MAX_BITS}], got {b}")
  return int(b)


def _check_float(x, fn: str):
  """``x`` as an array; raises unless its dtype is floating point."""
  if not hasattr(x, "dtype"):
    x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{fn} needs a floating-point array, got dtype {x.dtype} "
                     f"(shape {tuple(x.shape)}); cast it first, e.g. "
                     "x.astype(jnp.float32)")
  return x


def _check_qrange(qrange):
  """``(lo, hi)`` as float32 arrays; host values must be finite (see module doc)."""
  try:
    lo, hi = qrange
  except (TypeError, ValueError):
    raise ValueError(f"qrange must be a pair (lo, hi), got {qrange!r}") from None
  for end, r in (("lo", lo), ("hi", hi)):
    if isinstance(r, (int, float, np.ndarray, np.number)):
      a = np.asarray(r)
      if a.dtype.kind not in "iuf":
        raise ValueError(f"qrange {end} must be numeric, got dtype {a.dtype}")
      if not np.all(np.isfinite(a)):
        raise ValueError(
            f"qrange {end} is not finite ({int(np.sum(~np.isfinite(a)))} of "
            f"{a.size} value(s) NaN/Inf: {r!r}); a quantization range needs "
            "finite ends")
  return jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)


def normalize_axis(ndim: int, axis: Axis) -> tuple[int, ...]:
  """Axes that keep their own scale, as sorted non-negative ints (() = per tensor)."""
  if axis is None:
    return ()
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  out = []
  for a in axes:
    if not isinstance(a, int) or not -ndim <= a < ndim:
      raise ValueError(f"axis {a!r} out of range for an array of rank {ndim}")
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"repeated axis in {axis!r}")
  return tuple(sorted(out))


def reduce_axes(ndim: int, axis: Axis) -> tuple[int, ...]:
  """Axes reduced over to form one scale group: the complement of ``axis``."""
  keep = normalize_axis(ndim, axis)
  return tuple(i for i in range(ndim) if i not in keep)


def qmax(bits: int, symmetric: bool) -> int:
  """Largest integer level: ``2^(b-1)-1`` (symmetric, narrow) or ``2^b-1``."""
  bits = _check_bits(bits)
  return 2 ** (bits - 1) - 1 if symmetric else 2 ** bits - 1


def scale_zero_point(lo, hi, bits: int, symmetric: bool = True):
  """Scale ``s`` and zero point ``z`` (float, integer valued) of a range.

  Returns ``(s, z)`` broadcast to the shape of ``lo``/``hi``; see module docstring.
  An all-zero range gets ``s = 1``; a non-finite end gives a non-finite ``s``
  (NaN output for that group), never a silent ``s = 1``.
  """
  lo = jnp.asarray(lo, jnp.float32)
  hi = jnp.asarray(hi, jnp.float32)
  qm = qmax(bits, symmetric)
  if symmetric:
    amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    s = amax / qm
    z = jnp.zeros_like(s)
  else:
    lo = jnp.minimum(lo, 0.0)  # the range always contains 0 (exact zero/padding)
    hi = jnp.maximum(hi, 0.0)
    s = (hi - lo) / qm
    z = None
  s = jnp.where(s == 0, 1.0, s)  # NaN / Inf stay: see module docstring
  if z is None:
    z = jnp.clip(jnp.round(-lo / s), 0, qm)
  return s, z


def minmax_range(x, axis: Axis = None):
  """``(min, max)`` of the finite values per scale group, ``keepdims`` shapes.

  A group without finite values gets ``(0, 0)``.
  """
  x = _check_float(x, "minmax_range")
  red = reduce_axes(x.ndim, axis)
  fin = jnp.isfinite(x)
  lo = jnp.min(jnp.where(fin, x, jnp.inf), axis=red, keepdims=True)
  hi = jnp.max(jnp.where(fin, x, -jnp.inf), axis=red, keepdims=True)
  empty = lo > hi  # no finite value: (+inf, -inf)
  return jnp.where(empty, 0.0, lo).astype(x.dtype), jnp.where(
      empty, 0.0, hi).astype(x.dtype)


def _quantize_dequantize(x, s, z, bits, symmetric):
  qm = qmax(bits, symmetric)
  if symmetric:
    return s * jnp.clip(jnp.round(x / s), -qm, qm)
  return s * (jnp.clip(jnp.round(x / s) + z, 0, qm) - z)


def fake_quant(x: jax.Array, bits: int, *, axis: Axis = None,
               symmetric: bool = True, qrange=None, ste: bool = False,
               ste_clipped: bool = True) -> jax.Array:
  """Uniform quantize→dequantize of ``x`` (see module docstring for the math).

  Args:
    x: floating-point array of any shape (integer / bool dtypes raise).
    bits: static integer bit width in [2, 16] (Python or numpy int).
    axis: axes that keep their own scale (``None`` = per tensor). Weights
      ``(in, out)``: ``axis=-1`` (per output channel). Activations
      ``(B, N, D)``: ``axis=(0, 1)`` (per token).
    symmetric: symmetric narrow-range grid (zero point 0) or asymmetric.
    qrange: optional static range ``(lo, hi)`` broadcastable to the scale groups;
      ``None`` = dynamic min/max of the finite values of each group. Host values
      must be finite (``ValueError`` otherwise); a non-finite end in a device
      array gives NaN for its group (module docstring).
    ste: straight-through estimator for the gradient (QAT).
    ste_clipped: with ``ste``, zero gradient outside the quantization range
      (``[-a, a]`` symmetric, ``[min(lo, 0), max(hi, 0)]`` asymmetric); with
      dynamic ranges nothing is outside, so the gradient is the identity.
      ``False``: identity everywhere.

  Returns:
    ``x̂`` with the shape and dtype of ``x``; non-finite elements of ``x`` are
    returned unchanged (their STE gradient is the identity).
  """
  bits = _check_bits(bits)
  x = _check_float(x, "fake_quant")
  dtype = x.dtype
  xf = x.astype(jnp.float32)
  if qrange is None:
    lo, hi = minmax_range(xf, axis)
  else:
    normalize_axis(x.ndim, axis)
    lo, hi = _check_qrange(qrange)
  s, z = scale_zero_point(jax.lax.stop_gradient(lo), jax.lax.stop_gradient(hi),
                          bits, symmetric)
  s, z = jax.lax.stop_gradient(s), jax.lax.stop_gradient(z)
  finite = jnp.isfinite(xf)
  if not ste:
    xq = _quantize_dequantize(xf, s, z, bits, symmetric)
    return jnp.where(finite, xq, xf).astype(dtype)
  if ste_clipped:
    # the clipping range is the range the grid was built from (never the
    # grid's own end points, which may sit one ulp inside it)
    lo, hi = jax.lax.stop_gradient(lo), jax.lax.stop_gradient(hi)
    if symmetric:
      amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
      lo, hi = -amax, amax
    else:
      lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    # d/dx = 1 on [lo, hi] (end points included), 0 outside
    inside = (xf >= lo) & (xf <= hi)
    xc = jnp.where(inside, xf, jax.lax.stop_gradient(jnp.clip(xf, lo, hi)))
  else:
    xc = xf
  xq = _quantize_dequantize(xf, s, z, bits, symmetric)
  out = xc + jax.lax.stop_gradient(xq - xc)
  return jnp.where(finite, out, xf).astype(dtype)


fake_quant_ste = functools.partial(fake_quant, ste=True)
fake_quant_ste.__doc__ = "``fake_quant(..., ste=True)``: forward x̂, STE gradient."


def percentile_range(x, percentile: float = 99.99, *, axis: Axis = None,
                     symmetric: bool = True):
  """Percentile clipping range per scale group (``keepdims`` shapes).

  Percentiles of the finite values of each group (``numpy.percentile``'s linear
  interpolation on them); a group without finite values gets ``(0, 0)``.
  """
  if not 0.0 < percentile <= 100.0:
    raise ValueError(f"percentile must be in (0, 100], got {percentile}")
  x = _check_float(x, "percentile_range")
  red = reduce_axes(x.ndim, axis)
  xf = x.astype(jnp.float32)
  xf = jnp.where(jnp.isfinite(xf), xf, jnp.nan)  # nanpercentile skips them
  pct = lambda v, p: jnp.nan_to_num(
      jnp.nanpercentile(v, p, axis=red, keepdims=True), nan=0.0)
  if symmetric:
    a = pct(jnp.abs(xf), percentile)
    return -a, a
  return pct(xf, 100.0 - percentile), pct(xf, percentile)


def mse_range(x, bits: int, *, axis: Axis = None, symmetric: bool = True,
              grid: int = 64):
  """MSE-optimal clipping range: ``argmin_r Σ_group (Q_r(x) - x)²``.

  Candidates are ``(r·lo, r·hi)`` for ``r = i/grid``, ``i = 1..grid``, with
  ``(lo, hi)`` the min/max of the group's finite values; the sum runs over the
  finite values only; ties go to the widest range. Memory is one copy of ``x``
  (a ``lax.scan`` over the candidates).
  """
  bits = _check_bits(bits)
  if isinstance(grid, (bool, np.bool_)) or not isinstance(
      grid, (int, np.integer)) or grid < 1:
    raise ValueError(f"grid must be an integer >= 1, got {grid!r}")
  x = _check_float(x, "mse_range")
  xf = x.astype(jnp.float32)
  red = reduce_axes(x.ndim, axis)
  lo, hi = minmax_range(xf, axis)
  finite = jnp.isfinite(xf)

  def err(ratio):
    xq = fake_quant(xf, bits, axis=axis, symmetric=symmetric,
                    qrange=(ratio * lo, ratio * hi))
    return jnp.sum(jnp.where(finite, jnp.square(xq - xf), 0.0), axis=red,
                   keepdims=True)

  ratios = jnp.arange(int(grid), 0, -1, dtype=jnp.float32) / grid  # widest first

  def body(carry, r):
    best_e, best_r = carry
    e = err(r)
    better = e < best_e
    return (jnp.where(better, e, best_e), jnp.where(better, r, best_r)), None

  init = (jnp.full(lo.shape, jnp.inf, jnp.float32), jnp.ones(lo.shape, jnp.float32))
  (_, best_r), _ = jax.lax.scan(body, init, ratios)
  return best_r * lo, best_r * hi


def calibrate(x, bits: int, method: str = "minmax", *, axis: Axis = None,
              symmetric: bool = True, percentile: float = 99.99,
              grid: int = 64):
  """Range ``(lo, hi)`` of ``x`` per scale group by ``method`` (see module doc).

  Every calibrator uses the finite values of each group only.
  """
  bits = _check_bits(bits)
  x = _check_float(x, "calibrate")
  if method == "minmax":
    return minmax_range(x.astype(jnp.float32), axis)
  if method == "percentile":
    return percentile_range(x, percentile, axis=axis, symmetric=symmetric)
  if method == "mse":
    return mse_range(x, bits, axis=axis, symmetric=symmetric, grid=grid)
  raise ValueError(f"unknown calibrator {method!r}; choose from {CALIBRATORS}")


# ------------------------------------------------------------------ settings --

# Module paths kept at `keep_bits` when `keep_ends` is on: big_vision's patch
# embedding conv ('embedding') and classifier head ('head'), in any tower.
DEFAULT_KEEP_PATTERNS = (r"(^|/)embedding$", r"(^|/)head$")


@dataclasses.dataclass(frozen=True)
class QuantSetting:
  """One post-training / QAT quantization setting.

  Attributes:
    name: e.g. ``'W4A4'``.
    w_bits, a_bits: weight / activation bit widths (2..16).
    w_granularity: ``'channel'`` (one scale per output channel) or ``'tensor'``.
    w_symmetric: symmetric weight grid.
    a_granularity: ``'token'`` (one scale per row of the matmul input, i.e. per
      token; for convolutions per example) or ``'tensor'``.
    a_symmetric: symmetric activation grid.
    a_mode: ``'dynamic'`` (ranges from each tensor at run time) or ``'static'``
      (per-tensor ranges calibrated on a few batches and stored; needs
      ``a_granularity='tensor'``).
    calibrator: ``'minmax'``, ``'percentile'`` or ``'mse'`` (static ranges).
    percentile: for the percentile calibrator.
    mse_grid: number of clipping ratios the MSE search tries.
    attention: also quantize the attention matmul inputs q, k, softmax
      probabilities (asymmetric, range [0, max]) and v at ``a_bits``.
    keep_ends: keep modules matching ``keep_patterns`` (patch embedding and
      head by default) at ``max(bits, keep_bits)`` — the usual ViT PTQ choice.
    skip_patterns: regexes on the ``/``-joined module path; matching modules
      stay in float.
  """

  name: str
  w_bits: int
  a_bits: int
  w_granularity: str = "channel"
  w_symmetric: bool = True
  a_granularity: str = "token"
  a_symmetric: bool = True
  a_mode: str = "dynamic"
  calibrator: str = "minmax"
  percentile: float = 99.99
  mse_grid: int = 64
  attention: bool = False
  keep_ends: bool = True
  keep_bits: int = 8
  keep_patterns: tuple[str, ...] = DEFAULT_KEEP_PATTERNS
  skip_patterns: tuple[str, ...] = ()

  def __post_init__(self):
    for field in ("w_bits", "a_bits", "keep_bits"):  # numpy ints -> int
      object.__setattr__(self, field, _check_bits(getattr(self, field),
                                                  f"QuantSetting.{field}"))
    choices = dict(w_granularity=("channel", "tensor"),
                   a_granularity=("token", "tensor"),
                   a_mode=("dynamic", "static"), calibrator=CALIBRATORS)
    for field, allowed in choices.items():
      if getattr(self, field) not in allowed:
        raise ValueError(f"QuantSetting.{field}={getattr(self, field)!r}; "
                         f"choose from {allowed}")
    if self.a_mode == "static" and self.a_granularity != "tensor":
      raise ValueError("QuantSetting: a_mode='static' needs "
                       "a_granularity='tensor' (static per-token ranges do not "
                       "exist: tokens differ per example)")
    if not 0.0 < self.percentile <= 100.0:
      raise ValueError(f"QuantSetting.percentile must be in (0, 100], got "
                       f"{self.percentile!r}")
    if isinstance(self.mse_grid, (bool, np.bool_)) or not isinstance(
        self.mse_grid, (int, np.integer)) or self.mse_grid < 1:
      raise ValueError(f"QuantSetting.mse_grid must be an integer >= 1, got "
                       f"{self.mse_grid!r}")
    for p in tuple(self.keep_patterns) + tuple(self.skip_patterns):
      re.compile(p)

  @property
  def needs_calibration(self) -> bool:
    return self.a_mode == "static"

  def bits_for(self, path: str) -> tuple[int, int] | None:
    """``(w_bits, a_bits)`` for a ``/``-joined module path; None = keep float."""
    if any(re.search(p, path) for p in self.skip_patterns):
      return None
    if self.keep_ends and any(re.search(p, path) for p in self.keep_patterns):
      return max(self.w_bits, self.keep_bits), max(self.a_bits, self.keep_bits)
    return self.w_bits, self.a_bits


_NAME_RE = re.compile(r"^W(\d+)A(\d+)$")
NAMED_SETTINGS = ("W16A16", "W8A8", "W6A6", "W4A8", "W4A6", "W4A4", "W3A4",
                  "W3A3", "W2A4")


def get_setting(name: str | QuantSetting, **overrides) -> QuantSetting:
  """A ``QuantSetting`` by name ``'W<w>A<a>'`` (e.g. ``'W4A4'``) plus overrides.

  Defaults: per-channel symmetric weights, dynamic per-token symmetric
  activations, attention matmuls in float, patch embedding and head at ≥ 8 bits.
  A name may carry a suffix ``'-static'`` (per-tensor static activations,
  minmax calibration), ``'-static-mse'`` / ``'-static-percentile'`` or
  ``'-attn'`` (attention q, k, probs, v quantized too), e.g.
  ``'W6A6-static-mse-attn'``.
  """
  if isinstance(name, QuantSetting):
    return dataclasses.replace(name, **overrides) if overrides else name
  if not isinstance(name, str):
    raise ValueError(f"quant setting must be a name like 'W4A4', got {name!r}")
  base, *suffixes = name.split("-")
  m = _NAME_RE.match(base)
  if m is None:
    raise ValueError(
        f"unknown quant setting {name!r}: expected 'W<bits>A<bits>' with "
        f"optional suffixes -static, -static-mse, -static-percentile, -attn "
        f"(e.g. {', '.join(NAMED_SETTINGS)})")
  kw = dict(name=name, w_bits=int(m.group(1)), a_bits=int(m.group(2)))
  for suf in suffixes:
    if suf == "static":
      kw.update(a_mode="static", a_granularity="tensor")
    elif suf in CALIBRATORS:
      if kw.get("a_mode") != "static":
        raise ValueError(
            f"suffix {suf!r} in quant setting {name!r} picks the calibrator of "
            f"static activation ranges, so it needs '-static' before it: "
            f"'{base}-static-{suf}'")
      kw["calibrator"] = suf
    elif suf == "attn":
      kw["attention"] = True
    else:
      raise ValueError(
          f"unknown suffix {suf!r} in quant setting {name!r}; known suffixes: "
          f"-static, -static-mse, -static-percentile, -static-minmax, -attn")
  try:
    kw.update(overrides)
    return QuantSetting(**kw)
  except TypeError as e:
    raise ValueError(f"bad override for quant setting {name!r}: {e}") from None
