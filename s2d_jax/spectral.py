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
basis ``Q`` (q, K) of the *smaller* side (right singular vectors of ``M``). One
iteration (block power / orthogonal iteration on ``M^T M``) is::

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


# ----------------------------------------------------------------------------
# Subspace iteration.
# ----------------------------------------------------------------------------


def _mm(a, b):
  return jnp.matmul(a, b, precision=HIGHEST)


def _orth(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Thin QR of ``x`` (n, K): orthonormal ``Q`` (n, K) and ``R`` (K, K).

  For K == 1 a normalisation (``e_1`` for a zero column, R = 0).
  """
  if x.shape[-1] == 1:
    nrm = jnp.sqrt(jnp.sum(x * x))
    e1 = jnp.zeros_like(x).at[0, 0].set(1.0)
    q = jnp.where(nrm > 0, x / jnp.where(nrm > 0, nrm, 1.0), e1)
    return q, nrm.reshape(1, 1)
  return jnp.linalg.qr(x, mode="reduced")


def _track_one(m: jax.Array, q0: jax.Array, iters) -> tuple[jax.Array, ...]:
  """Warm-started subspace iteration + Rayleigh-Ritz on one ``(p, q)`` matrix.

  Returns ``(u (p,K), s (K,), v (q,K), valid, ok)``; see :func:`track`.
  """
  p, k = m.shape[0], q0.shape[-1]
  finite = jnp.all(jnp.isfinite(m))
  m = jnp.where(finite, m, 0.0)

  def body(_, carry):
    q, _, _ = carry
    uz, _ = _orth(_mm(m, q))
    vy, ry = _orth(_mm(m.T, uz))
    return vy, uz, ry

  init = (q0, jnp.zeros((p, k), m.dtype), jnp.zeros((k, k), m.dtype))
  vy, uz, ry = jax.lax.fori_loop(0, iters, body, init)
  if k == 1:  # R_y = [[|M^T u_z|]] >= 0: already the SVD.
    u, s, v = uz, ry[0], vy
  else:
    uc, s, vct = jnp.linalg.svd(ry.T, full_matrices=False)
    u, v = _mm(uz, uc), _mm(vy, vct.T)
  valid = finite & jnp.all(jnp.isfinite(s))
  return u, s, v, valid, valid & (s[0] > 0)


def effective_k(view: MatrixView, k: int) -> int:
  """Tracked components for this kernel: ``min(k, rows, cols)``."""
  return max(1, min(int(k), view.rows, view.cols))


def basis_shape(view: MatrixView, k: int) -> tuple[int, ...]:
  """Shape of the stored (smaller side) basis: ``(*batch, min(rows, cols), K_eff)``."""
  return view.batch_shape + (min(view.rows, view.cols), effective_k(view, k))


def init_basis(view: MatrixView, k: int, seed: int = 0, path: str = "") -> jax.Array:
  """Deterministic random orthonormal basis of :func:`basis_shape` (float32).

  Drawn with numpy from ``(seed, crc32(path))``: identical on every host and
  replica, different per kernel, and no XLA program is compiled for it.
  """
  shape = basis_shape(view, k)
  rng = np.random.default_rng([int(seed), zlib.crc32(path.encode())])
  g = rng.standard_normal(shape)
  q, _ = np.linalg.qr(g.reshape((-1,) + shape[-2:]))
  return jnp.asarray(q.reshape(shape), jnp.float32)


class Tracked(NamedTuple):
  """Output of :func:`track` (all float32 except the flags)."""
  u: jax.Array          # (*batch, rows, K_eff) left singular vectors
  s: jax.Array          # (*batch, K_eff) singular values, descending
  v: jax.Array          # (*batch, cols, K_eff) right singular vectors
  basis: jax.Array      # new stored basis (old one where not ok)
  valid: jax.Array      # (*batch,) bool: matrix and estimates finite
  ok: jax.Array         # (*batch,) bool: valid and sigma_1 > 0


def track(view: MatrixView, w: jax.Array, basis: jax.Array, iters) -> Tracked:
  """Refine the tracked top-K triplets of every matrix of the leaf ``w``.

  Args:
    view: the leaf's matrix view.
    w: the leaf (any float dtype), shape ``view.shape``.
    basis: the stored basis, :func:`basis_shape`, orthonormal columns.
    iters: subspace iterations (int, may be traced).

  Returns:
    :class:`Tracked` ``(u, s, v, basis, valid, ok)`` in the view's orientation:
    ``u (*batch, rows, K_eff)``, ``s (*batch, K_eff)`` (descending),
    ``v (*batch, cols, K_eff)``, ``basis`` like the input (the old one where
    ``ok`` is False), ``valid (*batch,)``: the matrix (and hence ``s``) is
    finite; ``ok``: valid and not all-zero. A non-finite matrix is replaced by
    zeros inside (``s = 0``), so nothing non-finite leaves this function.
  """
  mats = view.to_matrix(w.astype(jnp.float32))
  mats = mats.reshape((-1, view.rows, view.cols))
  q0 = basis.reshape((-1,) + basis.shape[-2:]).astype(jnp.float32)
  if view.transposed:
    mats = jnp.swapaxes(mats, -1, -2)
  u, s, v, valid, ok = jax.vmap(lambda m, q: _track_one(m, q, iters))(mats, q0)
  new_basis = jnp.where(ok[:, None, None], v, q0)
  if view.transposed:
    u, v = v, u
  b = view.batch_shape
  return Tracked(u.reshape(b + u.shape[1:]), s.reshape(b + s.shape[1:]),
                 v.reshape(b + v.shape[1:]), new_basis.reshape(basis.shape),
                 valid.reshape(b), ok.reshape(b))


def top_k(w_mat: jax.Array, k: int, iters: int = 100, seed: int = 0) -> tuple[jax.Array, ...]:
  """Cold-start top-k singular triplets of matrices ``(*batch, m, n)`` by iteration.

  Returns ``(u (*batch, m, K), s (*batch, K), v (*batch, n, K))`` with
  ``K = min(k, m, n)``; accuracy depends on ``iters`` and the spectral gap.
  """
  *b, m, n = w_mat.shape
  view = MatrixView(tuple(w_mat.shape), len(b), 1)
  basis = init_basis(view, k, seed)
  t = track(view, w_mat, basis, iters)
  return t.u, t.s, t.v
