"""Matrix views of kernels and warm-started top-k subspace (orthogonal) iteration.

This module is the single source of truth for how a parameter leaf is seen as a
matrix (used by :mod:`s2d_jax.optim`, :mod:`s2d_jax.pcdr` and
:mod:`s2d_jax.capture`), and holds the numerics that track the top-k singular
triplets of those matrices.

Matrix views
------------
A leaf of shape ``(*batch, *row_axes, *col_axes)`` is viewed as a stack of
matrices ``(*batch, rows, cols)`` with ``rows = prod(row_axes)`` and
``cols = prod(col_axes)``: a pure reshape, so ``x_rows @ W_mat`` is the layer's
output for an input ``x`` flattened the same way. The default rules, as data in
:data:`DEFAULT_VIEW_RULES` (first match wins), for big_vision / Flax trees:

=================  ======================  =================================
rule               kernel shape            matrix view
=================  ======================  =================================
attention_qkv      ``(in, heads, hd)``     ``(in, heads*hd)``
attention_out      ``(heads, hd, out)``    ``(heads*hd, out)``
dense              ``(in, out)``           ``(in, out)``
conv               ``(kh, kw, cin, cout)``  ``(kh*kw*cin, cout)`` (any ndim>=3:
                                           all but the last axis are rows)
=================  ======================  =================================

``attention_qkv`` / ``attention_out`` apply when the kernel's parent module is
named ``query``/``key``/``value`` resp. ``out`` (Flax
``MultiHeadDotProductAttention``) and the kernel has 3 axes besides layer axes.
Scan layout: a leaf with a path component named exactly ``encoderblock``
(big_vision's ``nn.scan`` over blocks) carries one leading layer axis, which is
a batch axis of the view: each layer's matrix is treated separately.

Users override views with ``views``: a dict ``{regex: spec}`` (``re.fullmatch``
against the ``'/'``-joined path, first match wins) or a callable
``views(path: tuple[str, ...], shape) -> spec``; ``spec`` is a
:class:`ViewSpec` / ``(batch_ndim, row_ndim)`` tuple, or ``None`` to fall back
to the default rules.

Tracking the top-k singular triplets
------------------------------------
For one matrix ``W`` (m, n), let ``M = W`` if ``n <= m`` and ``M = W^T``
otherwise, so ``M`` is ``(p, q)`` with ``q = min(m, n)``; the state keeps the
basis ``Q`` (q, K) of the *smaller* side (right singular vectors of ``M``),
stored as K rows. One iteration (block power / orthogonal iteration on
``M^T M``; ``qr`` is Gram-Schmidt applied twice, fine for small K) is::

    U_z R_z = qr(M Q)              (p, K)   left subspace
    V_y R_y = qr(M^T U_z)          (q, K)   right subspace, becomes the new Q

and Rayleigh-Ritz on the pair of subspaces costs no further pass over ``M``:
since ``U_z^T M = (M^T U_z)^T = R_y^T V_y^T``, the projected matrix is
``C = U_z^T M V_y = R_y^T`` (K, K). With the small SVD ``C = U_c S V_c^T``::

    U = U_z U_c,   sigma = diag(S),   V = V_y V_c,   U diag(sigma) V^T = U_z U_z^T M

so ``sigma_i`` are the singular values of the projection of ``M`` onto the
tracked left subspace (they converge to the true ``sigma_i`` from below, with
error ``O(sin^2)`` of the subspace angle), not only the subspace. Each step
multiplies the angle to the true subspace by about ``(sigma_{K+1}/sigma_i)^2``,
so warm-starting ``Q`` from the previous optimizer step with ``iters=1`` tracks
weights that drift slowly. All arithmetic is float32 with
``Precision.HIGHEST`` matmuls, whatever the parameter dtype.

Degenerate inputs: ``K`` larger than ``min(m, n)`` is clamped per kernel to
``K_eff = min(K, m, n)`` (the missing singular values are 0 by definition);
rank-deficient matrices give exact zeros for the missing ``sigma_i`` (QR keeps
the bases orthonormal); for an all-zero or non-finite matrix the previous basis
is kept, ``ok`` is False and callers add no term.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST

# Path components that mark big_vision's scan layout (one leading layer axis).
SCAN_AXIS_NAMES: tuple[str, ...] = ("encoderblock",)


# ----------------------------------------------------------------------------
# Paths.
# ----------------------------------------------------------------------------


def key_to_str(key: Any) -> str:
  """One jax key-path entry (DictKey, GetAttrKey, SequenceKey, ...) as a string."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_tuple(keypath: Sequence[Any]) -> tuple[str, ...]:
  """A jax key path (from ``tree_flatten_with_path``) as a tuple of strings."""
  return tuple(key_to_str(k) for k in keypath)


def path_str(path: Sequence[str]) -> str:
  """``('a', 'b', 'kernel') -> 'a/b/kernel'``; the key used in S2D state dicts."""
  return "/".join(path)


def leaves_with_paths(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
  """All leaves of ``tree`` with their string path tuples, in tree order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_tuple(kp), leaf) for kp, leaf in flat]


# ----------------------------------------------------------------------------
# Matrix views.
# ----------------------------------------------------------------------------


class ViewSpec(NamedTuple):
  """How to see a leaf as matrices: ``(*batch[:batch_ndim], *rows[:row_ndim], *cols)``."""
  batch_ndim: int
  row_ndim: int


class MatrixView(NamedTuple):
  """A leaf of ``shape`` seen as matrices ``(*batch_shape, rows, cols)`` by reshape."""
  shape: tuple[int, ...]
  batch_ndim: int
  row_ndim: int

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[:self.batch_ndim])

  @property
  def rows(self) -> int:
    return math.prod(self.shape[self.batch_ndim:self.batch_ndim + self.row_ndim])

  @property
  def cols(self) -> int:
    return math.prod(self.shape[self.batch_ndim + self.row_ndim:])

  @property
  def num_matrices(self) -> int:
    return math.prod(self.batch_shape)

  @property
  def transposed(self) -> bool:
    """True when the state stores the left basis (``cols > rows``)."""
    return self.cols > self.rows

  def to_matrix(self, x: jax.Array) -> jax.Array:
    """``shape -> (*batch_shape, rows, cols)``."""
    if tuple(x.shape) != tuple(self.shape):
      raise ValueError(f"to_matrix: expected shape {self.shape}, got {x.shape}")
    return x.reshape(self.batch_shape + (self.rows, self.cols))

  def from_matrix(self, m: jax.Array) -> jax.Array:
    """``(*batch_shape, rows, cols) -> shape``."""
    want = self.batch_shape + (self.rows, self.cols)
    if tuple(m.shape) != want:
      raise ValueError(f"from_matrix: expected shape {want}, got {m.shape}")
    return m.reshape(self.shape)

  def inputs_to_rows(self, x: jax.Array) -> jax.Array:
    """Layer inputs ``(*batch_shape, ..., rows)`` -> ``(*batch_shape, tokens, rows)``."""
    nb = self.batch_ndim
    if x.ndim < nb + 1 or tuple(x.shape[:nb]) != self.batch_shape or (
        x.shape[-1] != self.rows):
      raise ValueError(
          f"inputs of shape {tuple(x.shape)} do not fit a matrix view with "
          f"batch {self.batch_shape} and rows={self.rows} (kernel {self.shape})")
    return x.reshape(self.batch_shape + (-1, self.rows))


@dataclasses.dataclass(frozen=True)
class ViewRule:
  """A default view rule.

  Attributes:
    name: rule name (for messages and tests).
    parents: names of the kernel's parent module this rule applies to, or None
      for any.
    core_ndim: number of axes besides layer axes this rule applies to; None
      means ``>= 3``.
    row_ndim: number of leading (non-layer) axes forming the rows; negative
      counts from the end (``-1``: all but the last axis).
  """
  name: str
  parents: Optional[frozenset[str]]
  core_ndim: Optional[int]
  row_ndim: int

  def matches(self, path: tuple[str, ...], core_ndim: int) -> bool:
    if self.core_ndim is None:
      ok_ndim = core_ndim >= 3
    else:
      ok_ndim = core_ndim == self.core_ndim
    parent = path[-2] if len(path) >= 2 else None
    ok_parent = self.parents is None or parent in self.parents
    return ok_ndim and ok_parent


DEFAULT_VIEW_RULES: tuple[ViewRule, ...] = (
    ViewRule("attention_qkv", frozenset({"query", "key", "value"}), 3, 1),
    ViewRule("attention_out", frozenset({"out"}), 3, 2),
    ViewRule("dense", None, 2, 1),
    ViewRule("conv", None, None, -1),
)

ViewsArg = Union[None, Mapping[str, Any], Callable[[tuple[str, ...], tuple[int, ...]], Any]]


def num_layer_axes(path: Sequence[str]) -> int:
  """Leading layer axes implied by the path (1 under ``encoderblock``, else 0)."""
  return sum(1 for p in path if p in SCAN_AXIS_NAMES)


def default_view(path: Sequence[str], shape: Sequence[int]) -> Optional[MatrixView]:
  """The default matrix view of a leaf, or None if no rule applies (< 2 core axes)."""
  path, shape = tuple(path), tuple(int(s) for s in shape)
  nb = num_layer_axes(path)
  core = len(shape) - nb
  if core < 2:
    return None
  for rule in DEFAULT_VIEW_RULES:
    if rule.matches(path, core):
      row_ndim = rule.row_ndim if rule.row_ndim > 0 else core + rule.row_ndim
      return MatrixView(shape, nb, row_ndim)
  return None


def _check_spec(path, shape, spec) -> MatrixView:
  try:
    batch_ndim, row_ndim = (int(spec[0]), int(spec[1]))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"view for {path_str(path)!r} must be a ViewSpec / (batch_ndim, row_ndim)"
        f" tuple or None, got {spec!r}") from e
  if batch_ndim < 0 or row_ndim < 1 or batch_ndim + row_ndim >= len(shape):
    raise ValueError(
        f"view {ViewSpec(batch_ndim, row_ndim)} is invalid for {path_str(path)!r}"
        f" of shape {tuple(shape)}: need batch_ndim >= 0, row_ndim >= 1 and at "
        "least one column axis")
  return MatrixView(tuple(int(s) for s in shape), batch_ndim, row_ndim)


def matrix_view(path: Sequence[str], shape: Sequence[int],
                views: ViewsArg = None) -> Optional[MatrixView]:
  """The matrix view of the leaf at ``path`` with ``shape``, or None.

  Args:
    path: the leaf's path as a tuple of strings (see :func:`path_tuple`).
    shape: the leaf's shape.
    views: user overrides (see module docstring); None for the defaults.

  Returns:
    A :class:`MatrixView`, or None when no rule gives the leaf at least one
    row and one column axis besides its layer axes.
  """
  path, shape = tuple(path), tuple(int(s) for s in shape)
  if views is not None:
    if callable(views) and not isinstance(views, Mapping):
      spec = views(path, shape)
      if spec is not None:
        return _check_spec(path, shape, spec)
    elif isinstance(views, Mapping):
      joined = path_str(path)
      for pattern, spec in views.items():
        if re.fullmatch(pattern, joined):
          if spec is None:
            break
          return _check_spec(path, shape, spec)
    else:
      raise TypeError(f"views must be None, a dict or a callable, got {type(views)}")
  return default_view(path, shape)


def is_float(x: Any) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def default_selected(path: Sequence[str], leaf: Any) -> bool:
  """Default S2D selection: float leaves named ``kernel`` with a matrix view.

  Biases, LayerNorm scales, embedding tables (``embedding``), position
  embeddings (``pos_embedding``), MAP probes and scalars are not selected.
  """
  return bool(path) and path[-1] == "kernel" and is_float(leaf) and (
      getattr(leaf, "ndim", 0) >= 2)


def _mask_leaves(params: Any, mask: Any) -> list[tuple[bool, bool]]:
  """Per params leaf: (selected, explicit) from an optax-style mask.

  ``explicit`` is True when the mask's boolean sits on the leaf itself rather
  than on an enclosing subtree (a prefix).
  """
  mask_tree = mask(params) if callable(mask) else mask
  try:
    full = jax.tree_util.tree_map(
        lambda m, sub: jax.tree_util.tree_map(
            lambda _: (bool(m), jax.tree_util.tree_structure(sub).num_nodes == 1), sub),
        mask_tree, params)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "mask must be a tree of booleans with the structure of params (or a "
        f"prefix of it), or a callable returning one: {e}") from e
  return jax.tree_util.tree_leaves(full, is_leaf=lambda x: isinstance(x, tuple))


def select_kernels(params: Any, mask: Any = None,
                   views: ViewsArg = None) -> dict[str, tuple[tuple[str, ...], MatrixView]]:
  """The leaves S2D regularises: ``{path_str: (path, MatrixView)}`` in tree order.

  Args:
    params: the parameter tree (``optax.MaskedNode`` subtrees are skipped).
    mask: None for :func:`default_selected`; otherwise an optax-style tree of
      booleans (or a prefix of it), or a callable ``params -> tree``. A True
      on a subtree selects its floating-point leaves that have a matrix view
      (others, e.g. biases, are skipped); a True on a leaf itself requires
      that leaf to be floating point with a matrix view.
    views: view overrides (see :func:`matrix_view`).

  Raises:
    ValueError: a leaf selected by its own mask entry is not floating point or
      has no matrix view; a malformed mask.
  """
  items = leaves_with_paths(params)
  chosen = None if mask is None else _mask_leaves(params, mask)
  out = {}
  for i, (path, leaf) in enumerate(items):
    if chosen is None:
      if not default_selected(path, leaf):
        continue
      view = matrix_view(path, leaf.shape, views)
      if view is None:
        continue
    else:
      on, explicit = chosen[i]
      if not on:
        continue
      if not explicit and (not is_float(leaf) or matrix_view(path, leaf.shape, views) is None):
        continue
      if not is_float(leaf):
        raise ValueError(
            f"mask selects {path_str(path)!r} with dtype "
            f"{getattr(leaf, 'dtype', type(leaf))}; S2D needs floating-point leaves")
      view = matrix_view(path, leaf.shape, views)
      if view is None:
        raise ValueError(
            f"mask selects {path_str(path)!r} of shape {tuple(leaf.shape)}, which"
            " has no matrix view (needs >= 2 axes besides layer axes); pass views=")
    out[path_str(path)] = (path, view)
  return out


def kernel_mask(params: Any, exclude: Sequence[str] = (),
                views: ViewsArg = None) -> Any:
  """Boolean tree like ``params``: True on the kernels :func:`select_kernels` picks.

  The one definition of "a kernel" shared by the trainer's weight-decay mask, the
  S2D mask, σ logging and the PCDR capture: a floating-point leaf named
  ``kernel`` with a matrix view, whose ``'/'``-joined path matches none of the
  ``exclude`` regexes (``re.search``). Works on abstract trees
  (``jax.ShapeDtypeStruct`` leaves).

  Raises:
    ValueError: an ``exclude`` entry is not a valid regex (naming it).
  """
  pats = []
  for e in exclude:
    try:
      pats.append(re.compile(e))
    except re.error as err:
      raise ValueError(f"exclude pattern {e!r} is not a valid regex: {err}") from None
  chosen = {name for name in select_kernels(params, views=views)
            if not any(p.search(name) for p in pats)}
  return jax.tree_util.tree_map_with_path(
      lambda kp, _: path_str(path_tuple(kp)) in chosen, params)


# ----------------------------------------------------------------------------
# Subspace iteration.
# ----------------------------------------------------------------------------


def _replacement(n: int, i: int) -> jax.Array:
  """A fixed dense unit-scale vector (n,), used when column i degenerates to 0."""
  t = jnp.arange(n, dtype=jnp.float32)
  return jnp.cos(0.7548776662 * (i + 1) * t + 0.5698402910 * (i + 1))


def _orth_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Orthonormalise the K rows of ``x`` (K, n): ``x_i = sum_{j<=i} R[j, i] q_j``.

  Classical Gram-Schmidt applied twice ("twice is enough"), written with
  elementwise ops and reductions so that it fuses and never re-lays-out ``x``.
  Returns ``q`` (K, n) with orthonormal rows and upper-triangular ``R`` (K, K)
  (the thin QR of ``x^T``). A row whose residual is exactly 0 (rank deficiency,
  zero matrix) gets a fixed vector orthogonalised against the previous rows,
  and ``R[i, i] = 0``.
  """
  k, n = x.shape
  qs, rcols = [], []
  for i in range(k):
    v = x[i]
    coef = jnp.zeros((k,), x.dtype)
    if qs:
      q_prev = jnp.stack(qs)
      for _ in range(2):
        c = jnp.sum(q_prev * v[None, :], axis=1)
        v = v - jnp.sum(c[:, None] * q_prev, axis=0)
        coef = coef.at[:i].add(c)
    nrm = jnp.sqrt(jnp.sum(v * v))
    alt = _replacement(n, i)
    if qs:
      for _ in range(2):
        alt = alt - jnp.sum(jnp.sum(q_prev * alt[None, :], axis=1)[:, None] * q_prev, axis=0)
    alt = alt / jnp.sqrt(jnp.sum(alt * alt))
    good = nrm > 0
    qs.append(jnp.where(good, v / jnp.where(good, nrm, 1.0), alt))
    rcols.append(coef.at[i].set(nrm))
  return jnp.stack(qs), jnp.stack(rcols, axis=1)


def _track_one(w: jax.Array, q0: jax.Array, iters, transposed: bool) -> tuple[jax.Array, ...]:
  """Warm-started subspace iteration + Rayleigh-Ritz on one ``(rows, cols)`` matrix.

  ``M = W^T`` if ``transposed`` else ``W`` (``M`` is ``(p, q)``, ``q <= p``);
  ``q0`` (K, q) holds the right basis of ``M`` as rows. All bases are K-major
  ``(K, n)`` and ``W`` is only contracted in its stored layout (``einsum``
  ``'kc,rc->kr'`` for ``W x``, ``'kr,rc->kc'`` for ``W^T y``), which keeps XLA
  from transposing ``W`` (a 30x slowdown on CPU). A non-finite entry of ``W``
  makes ``M q`` non-finite (``nan * 0 = nan``), hence ``s``; such results are
  flagged invalid instead of screening ``W`` in a separate pass.

  Returns ``(u (K,p), s (K,), v (K,q), valid, ok)`` in ``M``'s orientation.
  """
  w_x = lambda x: jnp.einsum("kc,rc->kr", x, w, precision=HIGHEST)    # (W x)^T
  wt_x = lambda y: jnp.einsum("kr,rc->kc", y, w, precision=HIGHEST)   # (W^T y)^T
  m_x, mt_x = (wt_x, w_x) if transposed else (w_x, wt_x)
  k = q0.shape[0]
  p = w.shape[1] if transposed else w.shape[0]

  def body(_, carry):
    q, _, _ = carry
    uz, _ = _orth_rows(m_x(q))
    vy, ry = _orth_rows(mt_x(uz))
    return vy, uz, ry

  init = (q0, jnp.zeros((k, p), w.dtype), jnp.zeros((k, k), w.dtype))
  if isinstance(iters, int) and iters <= 2:   # unrolled: a while loop costs ~1 ms on CPU
    carry = init
    for i in range(iters):
      carry = body(i, carry)
    vy, uz, ry = carry
  else:
    vy, uz, ry = jax.lax.fori_loop(0, iters, body, init)
  if k == 1:  # R_y = [[|M^T u_z|]] >= 0: already the SVD.
    u, s, v = uz, ry[0], vy
  else:
    # C = U_z^T M V_y = R_y^T = U_c S V_c^T;  U = U_z U_c, V = V_y V_c (rows: U_c^T U_z).
    uc, s, vct = jnp.linalg.svd(ry.T, full_matrices=False)
    u = jnp.einsum("jk,jn->kn", uc, uz, precision=HIGHEST)
    v = jnp.einsum("kj,jn->kn", vct, vy, precision=HIGHEST)
  valid = jnp.all(jnp.isfinite(s))
  return u, s, v, valid, valid & (s[0] > 0)


def effective_k(view: MatrixView, k: int) -> int:
  """Tracked components for this kernel: ``min(k, rows, cols)``."""
  return max(1, min(int(k), view.rows, view.cols))


def basis_shape(view: MatrixView, k: int) -> tuple[int, ...]:
  """Shape of the stored (smaller side) basis: ``(*batch, K_eff, min(rows, cols))``."""
  return view.batch_shape + (effective_k(view, k), min(view.rows, view.cols))


def init_basis(view: MatrixView, k: int, seed: int = 0, path: str = "") -> jax.Array:
  """Deterministic random orthonormal basis (rows) of :func:`basis_shape`, float32.

  Drawn with numpy from ``(seed, crc32(path))``: identical on every host and
  replica, different per kernel, and no XLA program is compiled for it.
  """
  shape = basis_shape(view, k)
  rng = np.random.default_rng([int(seed), zlib.crc32(path.encode())])
  g = rng.standard_normal(shape[:-2] + shape[-1:] + shape[-2:-1])   # (..., n, K)
  q, _ = np.linalg.qr(g.reshape((-1,) + g.shape[-2:]))
  return jnp.asarray(np.swapaxes(q, -1, -2).reshape(shape), jnp.float32)


class Tracked(NamedTuple):
  """Output of :func:`track` (float32 except the flags). Vectors are rows."""
  u: jax.Array          # (*batch, K_eff, rows) left singular vectors
  s: jax.Array          # (*batch, K_eff) singular values, descending
  v: jax.Array          # (*batch, K_eff, cols) right singular vectors
  basis: jax.Array      # new stored basis (old one where not ok)
  valid: jax.Array      # (*batch,) bool: matrix and estimates finite
  ok: jax.Array         # (*batch,) bool: valid and sigma_1 > 0


def track(view: MatrixView, w: jax.Array, basis: jax.Array, iters) -> Tracked:
  """Refine the tracked top-K triplets of every matrix of the leaf ``w``.

  Args:
    view: the leaf's matrix view.
    w: the leaf (any float dtype), shape ``view.shape``.
    basis: the stored basis, :func:`basis_shape`, orthonormal rows.
    iters: subspace iterations (int, may be traced).

  Returns:
    :class:`Tracked` ``(u, s, v, basis, valid, ok)`` in the view's orientation,
    singular vectors as rows (``W ~ sum_i s_i u_i^T v_i`` per matrix):
    ``u (*batch, K_eff, rows)``, ``s (*batch, K_eff)`` (descending),
    ``v (*batch, K_eff, cols)``, ``basis`` like the input (the old one where
    ``ok`` is False), ``valid (*batch,)``: the matrix (and hence ``s``) is
    finite; ``ok``: valid and not all-zero. For an invalid matrix ``u, s, v``
    are zeros, so nothing non-finite leaves this function.
  """
  mats = view.to_matrix(w.astype(jnp.float32))
  mats = mats.reshape((-1, view.rows, view.cols))
  q0 = basis.reshape((-1,) + basis.shape[-2:]).astype(jnp.float32)
  one = lambda a: _track_one(a[0], a[1], iters, view.transposed)
  if mats.shape[0] == 1:
    u, s, v, valid, ok = jax.tree.map(lambda x: x[None], one((mats[0], q0[0])))
  else:
    # Per layer, sequentially: the work is memory-bound matrix-vector products
    # either way, and batched small-K dots are slow on CPU (3-8x).
    u, s, v, valid, ok = jax.lax.map(one, (mats, q0))
  new_basis = jnp.where(ok[:, None, None], v, q0)
  # Invalid (non-finite) matrices: report zeros, never NaN.
  u = jnp.where(valid[:, None, None], u, 0.0)
  v = jnp.where(valid[:, None, None], v, 0.0)
  s = jnp.where(valid[:, None], s, 0.0)
  if view.transposed:
    u, v = v, u
  b = view.batch_shape
  return Tracked(u.reshape(b + u.shape[1:]), s.reshape(b + s.shape[1:]),
                 v.reshape(b + v.shape[1:]), new_basis.reshape(basis.shape),
                 valid.reshape(b), ok.reshape(b))


def rank_k_term(u: jax.Array, coef: jax.Array, v: jax.Array) -> jax.Array:
  """``sum_i coef_i u_i v_i^T`` for rows ``u (..., K, r)``, ``v (..., K, c)``, ``coef (..., K)``.

  A sum of K outer products (one fused elementwise pass for small K).
  """
  k = u.shape[-2]
  if k > 4:
    return jnp.einsum("...kr,...kc->...rc", u * coef[..., None], v, precision=HIGHEST)
  out = 0.0
  for i in range(k):
    out = out + (u[..., i, :] * coef[..., i, None])[..., :, None] * v[..., i, None, :]
  return out


def top_k(w_mat: jax.Array, k: int, iters: int = 100, seed: int = 0) -> tuple[jax.Array, ...]:
  """Cold-start top-k singular triplets of matrices ``(*batch, m, n)`` by iteration.

  Returns ``(u (*batch, m, K), s (*batch, K), v (*batch, n, K))`` (columns,
  like ``np.linalg.svd``'s ``u`` and ``vt.T``) with ``K = min(k, m, n)``;
  accuracy depends on ``iters`` and the spectral gap.
  """
  *b, m, n = w_mat.shape
  view = MatrixView(tuple(w_mat.shape), len(b), 1)
  basis = init_basis(view, k, seed)
  t = track(view, w_mat, basis, iters)
  return jnp.swapaxes(t.u, -1, -2), t.s, jnp.swapaxes(t.v, -1, -2)
