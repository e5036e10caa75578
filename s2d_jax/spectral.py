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
``M^T M``; ``qr`` is a thin Householder QR) is::

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
is kept, ``ok`` is False and callers add no term. A kernel with no entries
(e.g. ``(0, 5)``) is rejected by name.

Shape groups and backends
-------------------------
Kernels whose matrices ``M`` share a shape ``(p, q)`` form a group
(:func:`group_kernels`; a ``(768, 3072)`` and a ``(3072, 768)`` kernel share
``'3072x768'``) and are tracked together by :func:`track_group`: one stacked
basis ``(N, K, q)`` for the group's ``N`` matrices, and one batched QR, one
batched ``K x K`` SVD and one set of elementwise ops per group and iteration,
whatever the depth. Only the products with ``W`` (and each kernel's final
rank-K term) touch individual kernels; ``strategy`` says how:

* ``'batched'`` (default on GPU/TPU): loop-layout kernels of one role (equal
  views, e.g. every block's ``MlpBlock_0/Dense_0``) are stacked into one
  operand, and each operand (a stack, or a scan-layout leaf with its layer
  axis) gets one batched matmul per product. The compiled update then has a
  fixed number of matmuls per group, and its size does not grow with depth
  (``tests/test_s2d_scale.py``). The stacking is one extra read and write of
  those kernels per step: negligible in HBM next to a training step, and
  cheaper than ~8 tiny kernel launches per kernel per step. Kernels of one
  role are sharded alike under FSDP, so the stack needs no collective.
* ``'per_kernel'`` (default on CPU): each kernel's products are computed on
  the kernel itself, no copies; a scan-layout leaf is processed one layer at
  a time (``lax.map``). Measured on XLA:CPU (2 cores, ViT-B/16 shapes):
  stacking costs ~4 ms per (768, 3072) kernel and step (the copy runs at
  memcpy speed, slower than the products), and a batched matmul over a scan
  stack was 1.6x slower than ``lax.map`` over it; but each separate matmul is
  its own compiled XLA:CPU kernel (~50-100 ms of compile time each, never
  shared), so in loop layout compile time grows with depth (~75 ms per
  kernel). ``benchmarks/s2d_overhead.py`` reports both strategies.

Each kernel's term reads its slice of the group's results through a runtime
offset (``S2DState.offset``), so the per-kernel fused code is identical for
all kernels of one shape and XLA compiles it once (XLA deduplicates identical
fused computations; distinct constant offsets cost ~15-25 ms of XLA:CPU
compile time per kernel).
"""

from __future__ import annotations

import dataclasses
import functools
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
# Shape groups.
# ----------------------------------------------------------------------------

STRATEGIES: tuple[str, ...] = ("auto", "batched", "per_kernel")


def default_strategy(backend: Optional[str] = None) -> str:
  """The strategy ``'auto'`` picks on ``backend`` (default ``jax.default_backend()``).

  See "Shape groups and backends" in the module docstring for the
  measurements behind the choice.
  """
  backend = jax.default_backend() if backend is None else backend
  return "per_kernel" if backend == "cpu" else "batched"


def _resolve_strategy(strategy: str) -> str:
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  return default_strategy() if strategy == "auto" else strategy


def effective_k(view: MatrixView, k: int) -> int:
  """Tracked components for this kernel: ``min(k, rows, cols)``."""
  return max(1, min(int(k), view.rows, view.cols))


def basis_shape(view: MatrixView, k: int) -> tuple[int, ...]:
  """Shape of the stored (smaller side) basis: ``(*batch, K_eff, min(rows, cols))``."""
  return view.batch_shape + (effective_k(view, k), min(view.rows, view.cols))


class GroupMember(NamedTuple):
  """One kernel of a :class:`KernelGroup`: its matrices are ``offset:offset + n``."""
  name: str
  view: MatrixView
  offset: int


@dataclasses.dataclass(frozen=True)
class KernelGroup:
  """Kernels whose matrices share a shape up to transposition, tracked together.

  Every matrix of the group is handled as ``M (p, q)`` with ``q <= p`` (``M =
  W`` or ``W^T``, see the module docstring), so a ``(768, 3072)`` and a
  ``(3072, 768)`` kernel share the group ``'3072x768'``. The group's ``N``
  matrices are its members' matrices in member order (layers in order within a
  scan-layout member); its stacked basis is ``(N, k, q)``.

  Attributes:
    p: larger side of the matrices.
    q: smaller side (the stored basis' side).
    k: tracked components ``K_eff = min(K, q)``.
    members: the kernels, in tree order.
  """
  p: int
  q: int
  k: int
  members: tuple[GroupMember, ...]

  @property
  def key(self) -> str:
    """Name of the group in the S2D state: ``f'{p}x{q}'``."""
    return f"{self.p}x{self.q}"

  @property
  def num_matrices(self) -> int:
    return sum(m.view.num_matrices for m in self.members)

  @property
  def basis_shape(self) -> tuple[int, int, int]:
    return (self.num_matrices, self.k, self.q)

  def stacks(self) -> tuple[tuple[int, ...], ...]:
    """Member indices in runs that can be stacked: equal views of one matrix each.

    Loop-layout kernels of one role (e.g. every block's ``Dense_0``) form one
    run; a multi-matrix (scan-layout) member is a run of its own.
    """
    runs, cur = [], []
    for i, m in enumerate(self.members):
      single = m.view.num_matrices == 1
      if cur and (not single or self.members[cur[-1]].view != m.view):
        runs.append(tuple(cur))
        cur = []
      cur.append(i)
      if not single:
        runs.append(tuple(cur))
        cur = []
    if cur:
      runs.append(tuple(cur))
    return tuple(runs)


def group_kernels(views: Union[Mapping[str, MatrixView], Sequence[tuple[str, MatrixView]]],
                  k: int) -> tuple[KernelGroup, ...]:
  """Group kernels by matrix shape up to transposition.

  Groups come in order of their first kernel; within a group, kernels with
  equal views (same leaf shape and view) are adjacent, in tree order, so that
  loop-layout kernels of one role form one stackable run
  (:meth:`KernelGroup.stacks`).

  Args:
    views: ``{name: MatrixView}`` (or ``(name, view)`` pairs) in tree order.
    k: tracked components K (clamped per group to ``min(K, q)``).

  Raises:
    ValueError: a kernel's matrices have no entries (e.g. shape ``(0, 5)``),
      naming it.
  """
  items = list(views.items()) if isinstance(views, Mapping) else list(views)
  by_key: dict[tuple[int, int], dict[MatrixView, list[str]]] = {}
  for name, view in items:
    if view.rows == 0 or view.cols == 0 or view.num_matrices == 0:
      raise ValueError(
          f"kernel {name!r} of shape {tuple(view.shape)} is empty (matrix view "
          f"{view.batch_shape} x ({view.rows}, {view.cols})): it has no singular "
          "values to decay; leave it out with mask= (or the trainer's s2d.exclude)")
    pq = (max(view.rows, view.cols), min(view.rows, view.cols))
    by_key.setdefault(pq, {}).setdefault(view, []).append(name)
  groups = []
  for (p, q), by_view in by_key.items():
    members, off = [], 0
    for view, names in by_view.items():
      for name in names:
        members.append(GroupMember(name, view, off))
        off += view.num_matrices
    groups.append(KernelGroup(p, q, max(1, min(int(k), q)), tuple(members)))
  return tuple(groups)


def _init_basis_np(view: MatrixView, k: int, seed: int, path: str) -> np.ndarray:
  shape = basis_shape(view, k)
  rng = np.random.default_rng([int(seed), zlib.crc32(path.encode())])
  g = rng.standard_normal(shape[:-2] + shape[-1:] + shape[-2:-1])   # (..., n, K)
  q, _ = np.linalg.qr(g.reshape((-1,) + g.shape[-2:]))
  return np.swapaxes(q, -1, -2).reshape(shape).astype(np.float32)


def init_basis(view: MatrixView, k: int, seed: int = 0, path: str = "") -> jax.Array:
  """Deterministic random orthonormal basis (rows) of :func:`basis_shape`, float32.

  Drawn with numpy from ``(seed, crc32(path))``: identical on every host and
  replica, different per kernel, and no XLA program is compiled for it.
  """
  return jnp.asarray(_init_basis_np(view, k, seed, path))


def init_group_basis(group: KernelGroup, seed: int = 0) -> jax.Array:
  """The group's stacked basis ``(N, k, q)``: each member's :func:`init_basis`."""
  parts = [_init_basis_np(m.view, group.k, seed, m.name).reshape((-1, group.k, group.q))
           for m in group.members]
  return jnp.asarray(np.concatenate(parts, axis=0))


# ----------------------------------------------------------------------------
# Subspace iteration.
# ----------------------------------------------------------------------------


def _orth_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Orthonormalise the K rows of every ``x[..., :, :]`` (..., K, n): thin QR of ``x^T``.

  Returns ``q`` (..., K, n) with orthonormal rows and upper-triangular ``R``
  (..., K, K) with ``x_i = sum_{j<=i} R[j, i] q_j``. Householder QR
  (``jnp.linalg.qr``: LAPACK on CPU, the vendor solver on GPU, XLA's expander
  on TPU), batched over the leading axes: the rows stay orthonormal when ``x``
  is rank deficient or zero (``R[i, i] = 0`` there), and its signs are
  LAPACK's (``R[i, i]`` may be negative). Measured on CPU against the
  Gram-Schmidt-twice it replaces: 4x cheaper to compile, 5x faster.
  """
  q, r = jnp.linalg.qr(jnp.swapaxes(x, -1, -2))
  return jnp.swapaxes(q, -1, -2), r


def _rows_times(a: jax.Array, b: jax.Array) -> jax.Array:
  """``out[..., k, :] = sum_j a[..., j, k] b[..., j, :]`` for small square ``a`` (..., K, K)."""
  if a.shape[-1] > 4:
    return jnp.einsum("...jk,...jn->...kn", a, b, precision=HIGHEST)
  return jnp.sum(a[..., :, :, None] * b[..., :, None, :], axis=-3)


def _products(mats: jax.Array, transposed: bool, batched: bool):
  """``(m_x, mt_x)``: ``(n, K, q) -> (n, K, p)`` and back, for n matrices ``(n, rows, cols)``.

  ``W`` is contracted only in its stored layout (``'kc,rc->kr'`` for ``W x``,
  ``'kr,rc->kc'`` for ``W^T y``, bases K-major), which keeps XLA from
  transposing ``W`` (a 30x slowdown on CPU). Float32 whatever ``mats``' dtype.
  ``batched``: one batched matmul over the n matrices, else ``lax.map`` (one
  at a time).
  """
  n = mats.shape[0]

  def apply(spec, x):
    f = lambda m, v: jnp.einsum(spec, v, m.astype(jnp.float32), precision=HIGHEST)
    if n == 1:
      return f(mats[0], x[0])[None]
    if not batched:
      return jax.lax.map(lambda a: f(*a), (mats, x))
    return jax.vmap(f)(mats, x)

  w_x = functools.partial(apply, "kc,rc->kr")     # (W x)^T
  wt_x = functools.partial(apply, "kr,rc->kc")    # (W^T y)^T
  return (wt_x, w_x) if transposed else (w_x, wt_x)


def _group_products(group: KernelGroup, leaves: Sequence[jax.Array], strategy: str):
  """``(m_x, mt_x)`` over the whole group: ``(N, K, q) -> (N, K, p)`` and back."""
  units = []   # ((first, end) matrix span, (m_x, mt_x))
  for run in group.stacks():
    ms = [group.members[i] for i in run]
    if strategy == "per_kernel" or len(run) == 1:
      parts = [([i], m) for i, m in zip(run, ms)]
    else:
      parts = [(list(run), ms[0])]
    for idx, m in parts:
      v = m.view
      if len(idx) == 1:
        mats = leaves[idx[0]].reshape((v.num_matrices, v.rows, v.cols))
      else:   # loop-layout kernels of one role: one stacked operand
        mats = jnp.stack([leaves[i].reshape((v.rows, v.cols)) for i in idx])
      span = (m.offset, m.offset + mats.shape[0])
      units.append((span, _products(mats, v.transposed, strategy == "batched")))

  def products(which, x):
    outs = [fns[which](x[a:b]) for (a, b), fns in units]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)

  return functools.partial(products, 0), functools.partial(products, 1)


class GroupTracked(NamedTuple):
  """Output of :func:`track_group`, in the ``M (p, q)`` orientation, rows as vectors."""
  u: jax.Array          # (N, k, p)
  s: jax.Array          # (N, k) descending
  v: jax.Array          # (N, k, q)
  basis: jax.Array      # (N, k, q) new stored basis (old one where not ok)
  valid: jax.Array      # (N,) bool: matrix and estimates finite
  ok: jax.Array         # (N,) bool: valid and sigma_1 > 0


def track_group(group: KernelGroup, leaves: Sequence[jax.Array], basis: jax.Array,
                iters, strategy: str = "auto") -> GroupTracked:
  """Refine the tracked top-k triplets of all ``N`` matrices of a group together.

  Args:
    group: the group (see :func:`group_kernels`).
    leaves: the members' leaves (any float dtype), shapes ``member.view.shape``.
    basis: the group's stored basis ``(N, k, q)``, orthonormal rows.
    iters: subspace iterations (int, may be traced).
    strategy: ``'auto'``, ``'batched'`` or ``'per_kernel'`` (module docstring).

  Returns:
    :class:`GroupTracked`; for an invalid (non-finite) matrix ``u, s, v`` are
    zeros and its basis is kept, so nothing non-finite leaves this function.
  """
  strategy = _resolve_strategy(strategy)
  if len(leaves) != len(group.members):
    raise ValueError(f"group {group.key}: {len(group.members)} members, {len(leaves)} leaves")
  for m, w in zip(group.members, leaves):
    if tuple(w.shape) != tuple(m.view.shape):
      raise ValueError(f"kernel {m.name!r}: expected shape {m.view.shape}, got {tuple(w.shape)}")
  m_x, mt_x = _group_products(group, leaves, strategy)
  n, k, p = group.num_matrices, group.k, group.p
  q0 = basis.astype(jnp.float32)
  if tuple(q0.shape) != group.basis_shape:
    raise ValueError(f"group {group.key}: basis shape {q0.shape}, expected {group.basis_shape}")

  def body(_, carry):
    q, _, _ = carry
    uz, _ = _orth_rows(m_x(q))
    vy, ry = _orth_rows(mt_x(uz))
    return vy, uz, ry

  init = (q0, jnp.zeros((n, k, p), jnp.float32), jnp.zeros((n, k, k), jnp.float32))
  if isinstance(iters, int) and iters <= 2:   # unrolled: a while loop costs ~1 ms on CPU
    carry = init
    for i in range(iters):
      carry = body(i, carry)
    vy, uz, ry = carry
  else:
    vy, uz, ry = jax.lax.fori_loop(0, iters, body, init)
  if k == 1:  # M^T u_z = r v_y: the SVD of the 1x1 C = [[r]] is (1, |r|, sign r).
    r = ry[..., 0]
    u, s, v = uz, jnp.abs(r), vy * jnp.where(r < 0, -1.0, 1.0)[..., None]
  else:
    # C = U_z^T M V_y = R_y^T = U_c S V_c^T;  U = U_z U_c, V = V_y V_c (rows: U_c^T U_z).
    uc, s, vct = jnp.linalg.svd(jnp.swapaxes(ry, -1, -2), full_matrices=False)
    u = _rows_times(uc, uz)
    v = _rows_times(jnp.swapaxes(vct, -1, -2), vy)
  valid = jnp.all(jnp.isfinite(s), axis=-1)
  ok = valid & (s[..., 0] > 0)
  new_basis = jnp.where(ok[:, None, None], v, q0)
  u = jnp.where(valid[:, None, None], u, 0.0)
  v = jnp.where(valid[:, None, None], v, 0.0)
  s = jnp.where(valid[:, None], s, 0.0)
  return GroupTracked(u, s, v, new_basis, valid, ok)


class Tracked(NamedTuple):
  """One kernel's triplets (float32 except the flags), in its view's orientation. Rows."""
  u: jax.Array          # (*batch, K_eff, rows) left singular vectors
  s: jax.Array          # (*batch, K_eff) singular values, descending
  v: jax.Array          # (*batch, K_eff, cols) right singular vectors
  basis: jax.Array      # (*batch, K_eff, min(rows, cols)) new stored basis
  valid: jax.Array      # (*batch,) bool: matrix and estimates finite
  ok: jax.Array         # (*batch,) bool: valid and sigma_1 > 0


def member_tracked(group: KernelGroup, t: GroupTracked, index: int) -> Tracked:
  """Member ``index``'s part of a :class:`GroupTracked`, in its view's orientation and shape."""
  m = group.members[index]
  a, b = m.offset, m.offset + m.view.num_matrices
  u, s, v, basis, valid, ok = (x[a:b] for x in t)
  if m.view.transposed:
    u, v = v, u
  bs = m.view.batch_shape
  return Tracked(u.reshape(bs + u.shape[1:]), s.reshape(bs + s.shape[1:]),
                 v.reshape(bs + v.shape[1:]), basis.reshape(bs + basis.shape[1:]),
                 valid.reshape(bs), ok.reshape(bs))


def track(view: MatrixView, w: jax.Array, basis: jax.Array, iters,
          strategy: str = "auto") -> Tracked:
  """Refine the tracked top-K triplets of every matrix of the leaf ``w``.

  A one-kernel :func:`track_group`.

  Args:
    view: the leaf's matrix view.
    w: the leaf (any float dtype), shape ``view.shape``.
    basis: the stored basis, :func:`basis_shape`, orthonormal rows.
    iters: subspace iterations (int, may be traced).
    strategy: see :func:`track_group`.

  Returns:
    :class:`Tracked` ``(u, s, v, basis, valid, ok)`` in the view's orientation,
    singular vectors as rows (``W ~ sum_i s_i u_i^T v_i`` per matrix):
    ``u (*batch, K_eff, rows)``, ``s (*batch, K_eff)`` (descending),
    ``v (*batch, K_eff, cols)``, ``basis`` like the input (the old one where
    ``ok`` is False), ``valid (*batch,)``: the matrix (and hence ``s``) is
    finite; ``ok``: valid and not all-zero. For an invalid matrix ``u, s, v``
    are zeros, so nothing non-finite leaves this function.
  """
  view.to_matrix(w)   # shape check
  (group,) = group_kernels([("", view)], basis.shape[-2])
  if tuple(basis.shape) != basis_shape(view, group.k):
    raise ValueError(f"basis shape {tuple(basis.shape)} does not fit view {view}")
  t = track_group(group, [w], basis.reshape(group.basis_shape), iters, strategy)
  return member_tracked(group, t, 0)


def rank_k_term(u: jax.Array, coef: Optional[jax.Array], v: jax.Array) -> jax.Array:
  """``sum_i coef_i u_i v_i^T`` for rows ``u (..., K, r)``, ``v (..., K, c)``, ``coef (..., K)``.

  ``coef=None`` means all ones. A sum of K outer products (one fused
  elementwise pass for K <= 4, a matmul beyond).
  """
  if coef is not None:
    u = u * coef[..., None]
  k = u.shape[-2]
  if k > 4:
    return jnp.einsum("...kr,...kc->...rc", u, v, precision=HIGHEST)
  out = 0.0
  for i in range(k):
    out = out + u[..., i, :, None] * v[..., i, None, :]
  return out


def group_terms(group: KernelGroup, t: GroupTracked, coef: jax.Array,
                offsets: Optional[Sequence[Any]] = None) -> list[jax.Array]:
  """Per member, ``sum_i coef_i u_i v_i^T`` in its matrix view ``(*batch, rows, cols)``.

  ``coef`` is ``(N, k)``. The group's small per-matrix factors are packed as
  ``[coef * u | v]`` (``(N, k, p + q)``); each member's term (K outer
  products, fused by XLA into whatever consumes the update, e.g. Adam's moment
  updates) reads its slice of them.

  ``offsets``: each member's first row as traced int32 scalars (default: the
  static ``member.offset``). With runtime offsets the slice is a
  ``dynamic_slice`` whose compiled kernel is the same for every member of one
  shape, so XLA compiles it once instead of once per member. On CPU the
  slices are also materialised (inside a ``lax.cond`` on a runtime predicate,
  which XLA:CPU neither fuses across nor folds; ``optimization_barrier`` is
  expanded before fusion there): fused into the consumer, a dynamic slice
  made each element of the kernel-sized update pass ~1.6x slower (measured).
  """
  packed = jnp.concatenate([t.u * coef[..., None], t.v], axis=-1)
  static = offsets is None
  if static:
    offsets = [m.offset for m in group.members]

  def pieces():
    return [jax.lax.dynamic_slice_in_dim(packed, off, m.view.num_matrices, axis=0)
            for m, off in zip(group.members, offsets)]

  if not static and jax.default_backend() == "cpu":
    parts = jax.lax.cond(jnp.asarray(offsets[0]) >= 0, pieces,
                         lambda: [jnp.zeros((m.view.num_matrices,) + packed.shape[1:])
                                  for m in group.members])
  else:
    parts = pieces()
  out = []
  for m, pk in zip(group.members, parts):
    mu, mv = pk[..., :group.p], pk[..., group.p:]
    if m.view.transposed:
      mu, mv = mv, mu
    term = rank_k_term(mu, None, mv)                                    # (n, rows, cols)
    out.append(term.reshape(m.view.batch_shape + term.shape[-2:]))
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
