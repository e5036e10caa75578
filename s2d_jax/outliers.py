"""Activation-outlier statistics that merge exactly across batches and devices.

For every tensor ``x`` observed (the input of each quantized matmul — every
``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Conv`` call — and the output of the
modules matched by ``output_patterns``, by default the encoder blocks, i.e. the
residual stream) we keep, over the real (unmasked) examples only:

* ``n``, ``mean`` and central sums ``M_k = Σ (x - mean)^k`` for k = 2, 3, 4
  over all elements → Pearson kurtosis ``κ = n·M_4 / M_2²`` (3 for a
  Gaussian; not the excess kurtosis).
* ``amax = max |x|`` and the mean per-token infinity norm
  ``mean_t ‖x_t‖∞`` (a token = one index of all axes but the last).
* a histogram of ``|x|`` on fixed log-spaced bins: bin 0 holds
  ``[0, 10^-8)``, then ``HIST_PER_DECADE`` bins per decade up to ``10^8``,
  then ``[10^8, ∞)``. The median ``|x|`` is read from it (log-linear
  interpolation inside the bin; relative error ≤ ``10^(1/64) - 1 ≈ 3.7 %``),
  because an exact median does not merge across batches or devices. The
  "massive activation" ratio is ``amax / median``; a layer is flagged massive
  when ``amax > 100`` and the ratio ``≥ 1000`` (Sun et al., 2024).
* per-channel (last axis) ``min`` and ``max`` → ranges ``r_c = max_c - min_c``,
  their spread ``max_c r_c / median_c r_c`` and the top channels.
* ``nonfinite``: the number of NaN / ±Inf elements. Every other statistic is
  over the *finite* elements only (``n`` counts them), so one NaN does not turn
  the whole layer's max, moments and histogram into NaN; :func:`summary` puts
  ``nonfinite`` (a flag) and ``nonfinite_count`` next to them, and ``massive``
  is then judged on the finite values (check the flag first: a layer with
  non-finite activations is broken whatever ``massive`` says).

Merging is exact: counts, histograms and token sums add; ``amax``/``min``/
``max`` take max/min; moments use the shift formulas (Chan et al. 1979, Pébay
2008). With ``δ = m - μ`` for a group of mean ``m`` moved to center ``μ``::

    S_2 = M_2 + n δ²,   S_3 = M_3 + 3 δ M_2 + n δ³,
    S_4 = M_4 + 4 δ M_3 + 6 δ² M_2 + n δ⁴,

so across devices (:func:`reduce_stats`, inside ``pmap``): ``μ`` is the psum of
``n·m`` over the psum of ``n``, each device shifts its sums to ``μ`` and the
shifted sums are psum-ed (integer counts are gathered and summed in int64 on
the host, :func:`finalize_reduced`, so they cannot overflow); across batches (:func:`merge_stats`, float64 on the
host) the same with ``μ`` the pooled mean. Nothing is averaged per device.

Statistics are recorded through ``flax.linen.intercept_methods`` into the
``'intermediates'`` collection, so scan-layout models give them a leading
layer axis; :func:`summarize` names layers ``encoderblock_<i>`` either way, so
loop and scan reports have the same keys.

Weight spectra (σ_max, σ_1/σ_2, top-3 σ of every kernel's matrix view, views
from :mod:`s2d_jax.spectral`) are in :func:`weight_spectrum`; PCDR_k of the
outlier activations comes from :func:`s2d_jax.pcdr.measure` (see
:func:`pcdr_stats`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from s2d_jax import capture
from s2d_jax import spectral

COLLECTION = "intermediates"
STATS_PREFIX = "outlier_stats_"
HIST_LO, HIST_HI, HIST_PER_DECADE = -8, 8, 64
NUM_BINS = (HIST_HI - HIST_LO) * HIST_PER_DECADE + 2
DEFAULT_OUTPUT_PATTERNS = (r"(^|/)encoderblock(_\d+)?$",)
MASSIVE_AMAX, MASSIVE_RATIO = 100.0, 1000.0


class ActStats(NamedTuple):
  """Mergeable statistics of one tensor (leading layer axes allowed)."""
  n: Any            # int: elements
  mean: Any         # float
  m2: Any           # Σ (x - mean)^2
  m3: Any
  m4: Any
  amax: Any         # max |x|
  tokens: Any       # int: tokens (rows)
  tok_inf_sum: Any  # Σ_t max_c |x_tc|
  hist: Any         # (NUM_BINS,) int counts of |x|
  ch_min: Any       # (channels,)
  ch_max: Any       # (channels,)
  nonfinite: Any    # int: NaN / ±Inf elements (not in any field above)


def _bin_index(absx):
  """Histogram bin of ``|x|`` (see module docstring)."""
  t = (jnp.log10(jnp.maximum(absx, 1e-30)) - HIST_LO) * HIST_PER_DECADE
  idx = jnp.floor(t).astype(jnp.int32) + 1
  return jnp.clip(jnp.where(absx < 10.0 ** HIST_LO, 0, idx), 0, NUM_BINS - 1)


def act_stats(x: jax.Array, mask: jax.Array | None = None) -> ActStats:
  """Statistics of ``x (B, ..., C)`` over the examples with ``mask[b] = 1``.

  ``mask`` is ``(B,)`` (1 = real example) or None (all real). Non-finite
  elements are counted in ``nonfinite`` and left out of every other field.
  """
  x = x.astype(jnp.float32)
  if x.ndim == 0:
    x = x.reshape(1, 1)
  elif x.ndim == 1:
    x = x[None]
  c = x.shape[-1]
  if mask is None:
    w = jnp.ones(x.shape[:-1], jnp.float32)
  else:
    mask = jnp.asarray(mask)
    if mask.ndim != 1 or mask.shape[0] != x.shape[0]:
      raise ValueError(f"mask of shape {mask.shape} does not match the batch "
                       f"axis of an activation of shape {x.shape}")
    w = jnp.broadcast_to(mask.astype(jnp.float32).reshape(
        (-1,) + (1,) * (x.ndim - 2)), x.shape[:-1])
  fin = jnp.isfinite(x)
  real = jnp.broadcast_to(w[..., None] > 0, x.shape)
  nonfinite = jnp.sum(real & ~fin, dtype=jnp.int32)
  x = jnp.where(fin, x, 0.0)   # no NaN * 0 below
  we = w[..., None] * fin      # per element weight: real and finite
  tokens = jnp.sum(w).astype(jnp.int32)
  n = jnp.sum(we > 0, dtype=jnp.int32)
  nf = jnp.maximum(n.astype(jnp.float32), 1.0)
  mean = jnp.sum(x * we) / nf
  mean = mean + jnp.sum((x - mean) * we) / nf  # second pass: float32-accurate
  d = (x - mean) * we
  d2 = d * d
  m2, m3, m4 = jnp.sum(d2), jnp.sum(d2 * d), jnp.sum(d2 * d2)
  absx = jnp.abs(x)
  tok_inf = jnp.max(absx, axis=-1)  # non-finite entries were set to 0
  hist = jnp.zeros((NUM_BINS,), jnp.int32).at[_bin_index(absx).reshape(-1)].add(
      (we > 0).astype(jnp.int32).reshape(-1))
  flat = x.reshape(-1, c)
  fw = (we > 0).reshape(-1, c)
  return ActStats(
      n=n, mean=mean, m2=m2, m3=m3, m4=m4,
      amax=jnp.max(jnp.where(we > 0, absx, 0.0)),
      tokens=tokens, tok_inf_sum=jnp.sum(tok_inf * w), hist=hist,
      ch_min=jnp.min(jnp.where(fw, flat, jnp.inf), axis=0),
      ch_max=jnp.max(jnp.where(fw, flat, -jnp.inf), axis=0),
      nonfinite=nonfinite)


def _shift(n, mean, m2, m3, m4, mu):
  """Central sums about ``mean`` → sums of powers of ``x - mu`` (k = 2, 3, 4)."""
  d = mean - mu
  return (m2 + n * d ** 2, m3 + 3 * d * m2 + n * d ** 3,
          m4 + 4 * d * m3 + 6 * d ** 2 * m2 + n * d ** 4)


def _merge_two(a: ActStats, b: ActStats, xp=jnp) -> ActStats:
  na, nb = a.n, b.n
  n = na + nb
  fa = xp.asarray(na, dtype=xp.float64 if xp is np else jnp.float32)
  fb = xp.asarray(nb, dtype=fa.dtype)
  tot = fa + fb
  mu = xp.where(tot > 0, (fa * a.mean + fb * b.mean) / xp.maximum(tot, 1), 0.0)
  sa = _shift(fa, a.mean, a.m2, a.m3, a.m4, mu)
  sb = _shift(fb, b.mean, b.m2, b.m3, b.m4, mu)
  return ActStats(
      n=n, mean=mu, m2=sa[0] + sb[0], m3=sa[1] + sb[1], m4=sa[2] + sb[2],
      amax=xp.maximum(a.amax, b.amax), tokens=a.tokens + b.tokens,
      tok_inf_sum=a.tok_inf_sum + b.tok_inf_sum, hist=a.hist + b.hist,
      ch_min=xp.minimum(a.ch_min, b.ch_min), ch_max=xp.maximum(a.ch_max, b.ch_max),
      nonfinite=a.nonfinite + b.nonfinite)


def _is_stats(x) -> bool:
  return isinstance(x, ActStats)


def merge_stats(a, b):
  """Exact merge of two stats trees (host side, float64 / int64)."""
  if a is None:
    return jax.tree.map(_to_host, b, is_leaf=_is_stats)
  b = jax.tree.map(_to_host, b, is_leaf=_is_stats)
  return jax.tree.map(lambda x, y: _merge_two(x, y, np), a, b, is_leaf=_is_stats)


def _to_host(s: ActStats) -> ActStats:
  ints = ("n", "tokens", "hist", "nonfinite")
  return ActStats(**{k: np.asarray(v, np.int64 if k in ints else np.float64)
                     for k, v in s._asdict().items()})


def reduce_stats(stats, axis_name):
  """Combine a stats tree across devices inside ``pmap`` (exact).

  Float fields are reduced with collectives (moments: psum of the shifted sums
  about the global mean; amax/channel extremes: pmax/pmin). The integer
  counts (``n``, ``tokens``, ``hist``, ``nonfinite``) are ``all_gather``-ed instead of
  psum-ed, because a global count can overflow int32 (x64 is off); they come
  back with a leading device axis that :func:`finalize_reduced` sums in int64
  on the host.
  """
  def one(s: ActStats) -> ActStats:
    nf = s.n.astype(jnp.float32)
    tot = lax.psum(nf, axis_name)
    mu = lax.psum(nf * s.mean, axis_name) / jnp.maximum(tot, 1.0)
    s2, s3, s4 = _shift(nf, s.mean, s.m2, s.m3, s.m4, mu)
    return ActStats(
        n=lax.all_gather(s.n, axis_name), mean=mu, m2=lax.psum(s2, axis_name),
        m3=lax.psum(s3, axis_name), m4=lax.psum(s4, axis_name),
        amax=lax.pmax(s.amax, axis_name),
        tokens=lax.all_gather(s.tokens, axis_name),
        tok_inf_sum=lax.psum(s.tok_inf_sum, axis_name),
        hist=lax.all_gather(s.hist, axis_name), ch_min=lax.pmin(s.ch_min, axis_name),
        ch_max=lax.pmax(s.ch_max, axis_name),
        nonfinite=lax.all_gather(s.nonfinite, axis_name))
  return jax.tree.map(one, stats, is_leaf=_is_stats)


def finalize_reduced(stats):
  """Host side of :func:`reduce_stats` (one device's copy): int64 device sums."""
  def one(s: ActStats) -> ActStats:
    s = _to_host(s)
    return s._replace(n=s.n.sum(0), tokens=s.tokens.sum(0), hist=s.hist.sum(0),
                      nonfinite=s.nonfinite.sum(0))
  return jax.tree.map(one, stats, is_leaf=_is_stats)


# ------------------------------------------------------------ model capture --



def stats_apply(apply_fn: Callable, *, output_patterns: Sequence[str] =
                DEFAULT_OUTPUT_PATTERNS, include: Callable[[str], bool] | None = None,
                collection: str = COLLECTION) -> Callable:
  """``f(variables, mask, *args, **kwargs) -> (outputs, stats)`` for one batch.

  ``stats`` is a nested dict mirroring module paths with leaves
  ``outlier_stats_input`` (matmul inputs) and ``outlier_stats_output``
  (outputs of modules whose ``/``-joined path matches ``output_patterns``; a
  tuple output contributes its first element), each an :class:`ActStats`
  (with a leading layer axis under ``nn.scan``). ``mask (B,)`` marks real
  examples on axis 0 of every recorded tensor; a tensor whose axis 0 is not
  ``B`` is counted in full. ``include(path)`` filters module paths.
  Compose with quantization interceptors freely (statistics of a quantized
  model see the quantized activations when its interceptor is outermost).
  """
  pats = [re.compile(p) for p in output_patterns]

  def f(variables, mask, *args, **kwargs):
    def record(module, name, x):
      if not hasattr(x, "ndim") or not jnp.issubdtype(x.dtype, jnp.floating):
        return
      m = mask if (mask is not None and x.ndim >= 1
                   and x.shape[0] == mask.shape[0]) else None
      s = act_stats(x, m)
      key = STATS_PREFIX + name
      if module.has_variable(collection, key):
        s = _merge_two(ActStats(*module.get_variable(collection, key)), s)
      module.put_variable(collection, key, tuple(s))

    def interceptor(next_fun, a, kw, context):
      mod = context.module
      if context.method_name != "__call__":
        return next_fun(*a, **kw)
      path = "/".join(mod.path)
      if include is not None and not include(path):
        return next_fun(*a, **kw)
      if capture.is_matmul(mod) and a:
        record(mod, "input", jnp.asarray(a[0]))
      out = next_fun(*a, **kw)
      if any(p.search(path) for p in pats):
        record(mod, "output", out[0] if isinstance(out, tuple) else out)
      return out

    variables = {k: v for k, v in variables.items() if k != collection}
    with nn.intercept_methods(interceptor):
      outputs, state = apply_fn(variables, *args, mutable=[collection], **kwargs)
    return outputs, _extract(dict(state.get(collection, {})))

  return f


def _extract(tree):
  out = {}
  for k, v in tree.items():
    if k.startswith(STATS_PREFIX):
      out[k[len(STATS_PREFIX):]] = ActStats(*v)
    elif isinstance(v, Mapping):
      sub = _extract(v)
      if sub:
        out[k] = sub
  return out


# ---------------------------------------------------------------- summaries --

def _hist_median(hist: np.ndarray) -> float:
  total = hist.sum()
  if total == 0:
    return float("nan")
  cum = np.cumsum(hist)
  b = int(np.searchsorted(cum, total / 2.0))
  prev = cum[b - 1] if b > 0 else 0
  frac = (total / 2.0 - prev) / max(hist[b], 1)
  if b == 0:
    return float(frac * 10.0 ** HIST_LO)
  if b == NUM_BINS - 1:
    return float(10.0 ** HIST_HI)
  lo = HIST_LO + (b - 1) / HIST_PER_DECADE
  return float(10.0 ** (lo + frac / HIST_PER_DECADE))


def hist_median(hist) -> float:
  """Median of ``|x|`` read from a (merged) histogram (see module docstring)."""
  return _hist_median(np.asarray(hist, np.int64))


def summary(s: ActStats) -> dict[str, Any]:
  """Plain-float summary of one tensor's stats (no layer axes).

  ``count`` and every statistic are over the finite values; ``nonfinite_count``
  is the number of NaN / ±Inf values and ``nonfinite`` flags a layer that has
  any (its ``massive`` verdict then speaks for the finite values only).
  """
  s = _to_host(s)
  n = int(s.n)
  m2 = float(s.m2)
  var = m2 / n if n else float("nan")
  kurt = n * float(s.m4) / m2 ** 2 if (n and m2 > 0) else float("nan")
  median = hist_median(s.hist)
  amax = float(s.amax)
  ratio = amax / median if median > 0 else float("inf")
  rng = s.ch_max - s.ch_min
  rmed = float(np.median(rng)) if rng.size else float("nan")
  top = np.argsort(-rng)[:3]
  return dict(
      count=n, mean=float(s.mean), std=float(np.sqrt(var)),
      kurtosis=kurt, max_abs=amax,
      mean_token_inf_norm=float(s.tok_inf_sum) / max(int(s.tokens), 1),
      median_abs=median, top1_median_ratio=ratio,
      massive=bool(amax > MASSIVE_AMAX and ratio >= MASSIVE_RATIO),
      channel_range_spread=float(rng.max()) / rmed if rmed > 0 else float("inf"),
      top_channels=[int(i) for i in top],
      top_channel_ranges=[float(rng[i]) for i in top],
      nonfinite=bool(s.nonfinite > 0), nonfinite_count=int(s.nonfinite))


def _layer_name(path: tuple[str, ...], idx: tuple[int, ...]) -> str:
  """'encoderblock' + layer index → 'encoderblock_<i>' (loop-layout names)."""
  parts, it = [], iter(idx)
  for p in path:
    if p in spectral.SCAN_AXIS_NAMES:
      parts.append(f"{p}_{next(it)}")
    else:
      parts.append(p)
  return "/".join(parts)


def _walk(tree, path=()):
  for k, v in tree.items():
    if isinstance(v, ActStats):
      yield path, k, v
    elif isinstance(v, Mapping):
      yield from _walk(v, path + (k,))


def summarize(stats) -> dict[str, dict[str, Any]]:
  """``{'<layer path>/<input|output>': summary}``, scanned layers unrolled."""
  out = {}
  for path, kind, s in _walk(stats):
    nlead = sum(1 for p in path if p in spectral.SCAN_AXIS_NAMES)
    lead = np.shape(s.n)[:nlead]
    for idx in np.ndindex(*lead):
      one = ActStats(*(np.asarray(v)[idx] for v in s))
      out[_layer_name(path, idx) + "/" + kind] = summary(one)
  return out


def weight_spectrum(params, *, views: spectral.ViewsArg = None,
                    top: int = 3) -> dict[str, dict[str, Any]]:
  """σ_max, σ_1/σ_2 and the top singular values of every kernel's matrix view.

  Keys are module paths (the kernel's parent) with scanned layers unrolled
  (``encoderblock_<i>``), matching the keys of :func:`summarize`.
  """
  out = {}
  for path, leaf in spectral.leaves_with_paths(params):
    if not spectral.default_selected(path, leaf):
      continue
    view = spectral.matrix_view(path, leaf.shape, views)
    if view is None:
      continue
    mats = view.to_matrix(jnp.asarray(leaf, jnp.float32))
    sv = np.asarray(jnp.linalg.svd(mats, compute_uv=False))
    for idx in np.ndindex(*view.batch_shape):
      s = sv[idx]
      out[_layer_name(path[:-1], idx)] = dict(
          sigma_max=float(s[0]),
          sigma_ratio_12=float(s[0] / s[1]) if s.size > 1 and s[1] > 0 else
          float("inf"),
          top_sigma=[float(v) for v in s[:top]], shape=list(view.shape))
  return out


def pcdr_stats(params, inputs, k_max: int = 3, **kwargs) -> dict[str, list[float]]:
  """``{module path (unrolled): [PCDR_1..PCDR_k]}`` via :func:`s2d_jax.pcdr.measure`.

  ``inputs`` is the second output of
  :func:`s2d_jax.capture.capture_matmul_inputs` on one batch.
  """
  from s2d_jax import pcdr  # pylint: disable=g-import-not-at-top
  ratios = pcdr.measure(params, inputs, k_max, **kwargs)
  out = {}
  for name, r in ratios.items():
    path = tuple(name.split("/"))[:-1]  # module path (drop 'kernel')
    r = np.asarray(r)
    for idx in np.ndindex(*r.shape[:-1]):
      out[_layer_name(path, idx)] = [float(v) for v in r[idx]]
  return out
