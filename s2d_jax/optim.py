"""S2D (Selective Spectral Decay) as an optax ``GradientTransformation``.

For every selected kernel, in its matrix view ``W = U diag(sigma) V^T``
(see :mod:`s2d_jax.spectral`), S2D is the gradient of

    L_S2D(W) = strength / (power + 1) * sum_{i <= k} sigma_i^(power + 1),
    dL/dW    = strength * sum_{i <= k} sigma_i^power * u_i v_i^T,

which :func:`s2d` adds to the incoming updates (mapped back to the kernel's
shape). The top singular triplets are tracked by warm-started subspace
iteration whose bases live in :class:`S2DState` (``iters`` iterations per
step), so each step uses fresh estimates for a few matrix products per kernel.

Selection per kernel: the state tracks ``K = k_max`` components and holds an
``active`` count in ``[0, K]`` per matrix (``k`` at init); only the first
``active`` components are penalised. :func:`set_active` changes the counts
(e.g. from :func:`s2d_jax.pcdr.select_active`) without recompiling a jitted
step, since only array values change.

Coupled vs decoupled
--------------------
* Coupled (the paper; ``decoupled=False``): chain *before* the optimizer,
  ``optax.chain(s2d(k=1), optax.adamw(lr, weight_decay=wd))``. The S2D term
  is added to the task gradient and goes through Adam's preconditioner, like
  L2 regularisation. The paper's ``strength=5e-4`` is calibrated for this
  form. Use it to reproduce the paper.
* Decoupled (``decoupled=True, learning_rate=lr``): chain *after* the complete
  optimizer, ``optax.chain(optax.adamw(lr, ...), s2d(decoupled=True,
  learning_rate=lr))``; it adds ``-lr_t * strength * G`` to the final update,
  like AdamW's decoupled weight decay. Each step then shrinks the tracked
  ``sigma_i`` by about ``lr_t * strength * sigma_i^power``, independently of
  the gradient statistics: predictable, and ``strength`` and the learning rate
  can be tuned separately; ``strength`` needs to be far larger than in the
  coupled form (it is no longer amplified by Adam's ``1/sqrt(v)``). Placing a
  coupled ``s2d`` between ``optax.scale_by_adam()`` and
  ``optax.scale_by_learning_rate(lr)`` is the same thing; :func:`s2d_adamw`
  builds either form.

Leaves left alone by default: everything not named ``kernel`` with at least 2
axes besides layer axes, i.e. biases, LayerNorm scales, embedding tables,
position embeddings, MAP probes, and non-float leaves.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from s2d_jax import spectral

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]


@dataclasses.dataclass(frozen=True)
class KernelLayout:
  """Static description of the kernels an :class:`S2DState` tracks (no arrays).

  Registered as a static pytree node: it lives in the state's tree structure
  (so ``jit`` specialises on it and checkpoints restore it from the target
  structure), holds no leaves, and records every kernel's exact shape and
  matrix view for the checks in ``update``.

  Attributes:
    k: tracked components K (``k_max``).
    groups: the shape groups (:func:`s2d_jax.spectral.group_kernels`), whose
      members are the kernels in tree order within each group.
  """
  k: int
  groups: tuple[spectral.KernelGroup, ...]

  def members(self):
    """``(group, index, member)`` for every kernel."""
    return [(g, i, m) for g in self.groups for i, m in enumerate(g.members)]


jax.tree_util.register_static(KernelLayout)


class S2DState(NamedTuple):
  """State of :func:`s2d`; every array is stacked per shape group.

  Read it through :func:`sigma_estimates`, :func:`active_counts` and
  :func:`tracked_bases` (keyed by ``'/'``-joined kernel path); change the
  counts with :func:`set_active`. Group ``g`` (key ``f'{p}x{q}'``, see
  :class:`s2d_jax.spectral.KernelGroup`) holds its ``N`` matrices in member
  order; ``layout`` says which rows belong to which kernel.

  Attributes:
    count: int32 step counter (drives a ``learning_rate`` schedule).
    basis: per group, ``(N, K_eff, q)`` float32: the tracked singular vectors
      (rows) of the smaller side of each matrix.
    sigma: per group, ``(N, K)`` float32: the singular values from the last
      step (at init: from ``init_iters`` iterations), largest first, 0 beyond
      the matrix rank.
    active: per group, ``(N,)`` int32 in ``[0, K]``: number of penalised
      components per matrix.
    offset: per kernel path, int32 scalar: the kernel's first matrix in its
      group's arrays (``layout`` has the same number). Kept as runtime data on
      purpose: each kernel then reads its slice of the group's results with
      a ``dynamic_slice`` whose compiled kernel is identical for all kernels
      of one shape, so XLA compiles it once (distinct constant offsets cost
      a separately compiled kernel per kernel, ~15-25 ms each on XLA:CPU).
    layout: :class:`KernelLayout` (static: no arrays).
  """
  count: jax.Array
  basis: dict[str, jax.Array]
  sigma: dict[str, jax.Array]
  active: dict[str, jax.Array]
  offset: dict[str, jax.Array]
  layout: KernelLayout


def _concrete(x) -> Optional[np.ndarray]:
  """``x`` as numpy if its value is known at trace time, else None."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x)
  except Exception:  # pylint: disable=broad-except
    return None


def _static_int(x, name: str) -> int:
  v = _concrete(x)
  if v is None or v.shape != () or not np.issubdtype(v.dtype, np.number) or v != int(v):
    raise ValueError(
        f"s2d: {name} must be a static integer (got {x!r}); under "
        f"optax.inject_hyperparams pass static_args=('{name}',)")
  return int(v)


def _validate(k, strength, power, iters, k_max):
  if callable(strength):
    raise TypeError(
        "s2d: strength is a schedule (a callable); s2d takes a number. For a "
        "scheduled strength wrap the transform: "
        "optax.inject_hyperparams(s2d)(strength=schedule, ...)")
  for name, val, lo, strict in (("k", k, 0, False), ("strength", strength, 0, False),
                                ("power", power, 0, True), ("iters", iters, 1, False),
                                ("k_max", k_max, 1, False)):
    if val is None or callable(val):
      continue
    v = _concrete(val)
    if v is None or v.ndim:
      continue
    if not np.isfinite(v) or (v <= lo if strict else v < lo):
      raise ValueError(f"s2d: {name} must be {'>' if strict else '>='} {lo}, got {val!r}")
  kk = _concrete(k)
  km = None if k_max is None else _concrete(k_max)
  if kk is not None and km is not None and kk.ndim == 0 and km.ndim == 0 and kk > km:
    raise ValueError(f"s2d: k={k} exceeds k_max={k_max}")


def _pad(s: jax.Array, k: int) -> jax.Array:
  extra = k - s.shape[-1]
  if extra == 0:
    return s
  return jnp.concatenate([s, jnp.zeros(s.shape[:-1] + (extra,), s.dtype)], axis=-1)


def s2d(
    k: int = 1,
    strength: ScalarOrSchedule = 5e-4,
    power: float = 2.0,
    iters: int = 1,
    mask: Any = None,
    *,
    views: spectral.ViewsArg = None,
    k_max: Optional[int] = None,
    decoupled: bool = False,
    learning_rate: Optional[ScalarOrSchedule] = None,
    init_iters: int = 8,
    seed: int = 0,
    strategy: str = "auto",
) -> optax.GradientTransformation:
  r"""Selective Spectral Decay: add ``strength * sum_{i<k} sigma_i^power u_i v_i^T``.

  ``update(updates, state, params)`` returns, for every selected kernel with
  matrix view ``W (rows, cols)`` (per layer for scan-layout kernels)::

      updates + c * strength * sum_{i < active} sigma_i^power * u_i v_i^T

  with ``c = 1`` (coupled) or ``c = -learning_rate(count)`` (decoupled), and
  ``updates`` unchanged for every other leaf. ``sigma_i, u_i, v_i`` are the
  current estimates of the top singular triplets of ``W`` (float32; the result
  is cast back to the incoming update's dtype).

  Kernels whose matrices share a shape (up to transposition) are tracked as
  one group: one stacked subspace iteration per group and step, so the
  compiled update's size does not grow with depth (see "Shape groups and
  backends" in :mod:`s2d_jax.spectral`).

  Args:
    k: initial number of penalised components per matrix (``active``).
    strength: lambda, a float or (under ``inject_hyperparams``) an array; for a
      schedule use ``optax.inject_hyperparams(s2d)(strength=schedule, ...)``.
    power: n > 0 (the paper uses 2).
    iters: subspace iterations per step (1 tracks slowly drifting weights).
    mask: None selects float leaves named ``kernel`` with a matrix view;
      otherwise an optax-style tree of booleans (or prefix) or callable
      ``params -> tree``; see :func:`s2d_jax.spectral.select_kernels`.
    views: matrix-view overrides, see :func:`s2d_jax.spectral.matrix_view`.
    k_max: tracked components K (default ``k``); must be a static int.
      Clamped per kernel to ``min(K, rows, cols)``; the missing ``sigma`` are 0.
    decoupled: see the module docstring; requires ``learning_rate``.
    learning_rate: float or schedule ``count -> lr`` (decoupled form only).
    init_iters: subspace iterations run by ``init`` on the initial params so
      that the first step starts from good estimates (0: random bases, sigma 0).
    seed: seed of the deterministic initial bases (same on every host/replica).
    strategy: how the products with the kernels run: ``'batched'`` (kernels
      of one role stacked, one batched matmul each; compiled size flat in
      depth), ``'per_kernel'`` (no copies, separate matmuls), or ``'auto'``:
      ``'per_kernel'`` on CPU, ``'batched'`` on GPU/TPU. See "Shape groups
      and backends" in :mod:`s2d_jax.spectral`.

  Returns:
    An ``optax.GradientTransformation`` with :class:`S2DState`.

  Raises:
    ValueError: invalid options; ``params`` missing in ``update``; a kernel's
      shape differs from init; a selected kernel is empty; mask selecting
      non-float or non-matrix leaves.
    TypeError: ``strength`` is a schedule (use ``inject_hyperparams``).
    KeyError: a kernel present at init is missing from ``params``.
  """
  _validate(k, strength, power, iters, k_max)
  if decoupled and learning_rate is None:
    raise ValueError("s2d: decoupled=True needs learning_rate (float or schedule)")
  if not decoupled and learning_rate is not None:
    raise ValueError("s2d: learning_rate is only used with decoupled=True")
  if strategy not in spectral.STRATEGIES:
    raise ValueError(f"s2d: strategy must be one of {spectral.STRATEGIES}, got {strategy!r}")

  def init_impl(params):
    kk = _static_int(k_max if k_max is not None else k, "k_max" if k_max is not None else "k")
    if kk < 1:
      raise ValueError("s2d: k_max must be >= 1 (pass k_max when k=0)")
    n_init = _static_int(init_iters, "init_iters")
    sd = _static_int(seed, "seed")
    selected = spectral.select_kernels(params, mask, views)
    try:
      groups = spectral.group_kernels({n: v for n, (_, v) in selected.items()}, kk)
    except ValueError as e:
      raise ValueError(f"s2d: {e}") from None
    layout = KernelLayout(kk, groups)
    leaves = {spectral.path_str(p): x for p, x in spectral.leaves_with_paths(params)}
    k0 = jnp.clip(jnp.asarray(k, jnp.int32), 0, kk)
    basis, sigma, active = {}, {}, {}
    for g in groups:
      b0 = spectral.init_group_basis(g, sd)
      if n_init > 0:
        t = spectral.track_group(g, [leaves[m.name] for m in g.members], b0, n_init, strategy)
        basis[g.key] = t.basis
        sigma[g.key] = _pad(t.s, kk)      # zeros where invalid
      else:
        basis[g.key] = b0
        sigma[g.key] = jnp.zeros((g.num_matrices, kk), jnp.float32)
      active[g.key] = jnp.full((g.num_matrices,), k0, jnp.int32)
    offset = {m.name: jnp.asarray(m.offset, jnp.int32) for _, _, m in layout.members()}
    return S2DState(jnp.zeros([], jnp.int32), basis, sigma, active, offset, layout)

  # With init_iters > 0: one compiled program for all kernels (init is usually
  # called eagerly); without, init only builds numpy constants.
  init_jit = jax.jit(init_impl)

  def init_fn(params):
    if _static_int(init_iters, "init_iters") > 0:
      return init_jit(params)
    return init_impl(params)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("s2d needs params: call update(updates, state, params)")
    if jax.tree.structure(updates) != jax.tree.structure(params):
      raise ValueError(
          "s2d: updates and params have different tree structures: "
          f"{jax.tree.structure(updates)} vs {jax.tree.structure(params)}")
    pleaves = {spectral.path_str(p): x for p, x in spectral.leaves_with_paths(params)}
    flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
    index = {spectral.path_str(spectral.path_tuple(kp)): i for i, (kp, _) in enumerate(flat)}
    layout = state.layout
    for _, _, m in layout.members():
      if m.name not in pleaves:
        raise KeyError(f"s2d: kernel {m.name!r} (selected at init) is missing from params")
      shape = tuple(pleaves[m.name].shape)
      if shape != tuple(m.view.shape):
        raise ValueError(
            f"s2d: kernel {m.name!r} has shape {shape}, but the S2D state was "
            f"initialised for shape {tuple(m.view.shape)}; re-run init")
    new_leaves = [leaf for _, leaf in flat]
    if decoupled:
      lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
      scale = -jnp.asarray(lr, jnp.float32) * jnp.asarray(strength, jnp.float32)
    else:
      scale = jnp.asarray(strength, jnp.float32)
    pw = jnp.asarray(power, jnp.float32)
    kk = layout.k
    basis, sigma = {}, {}
    for g in layout.groups:
      t = spectral.track_group(g, [pleaves[m.name] for m in g.members], state.basis[g.key],
                               iters, strategy)
      on = (jnp.arange(g.k) < state.active[g.key][:, None]) & t.ok[:, None]
      coef = jnp.where(on, scale * jnp.power(t.s, pw), 0.0)                 # (N, k)
      basis[g.key] = t.basis
      sigma[g.key] = jnp.where(t.valid[:, None], _pad(t.s, kk), state.sigma[g.key])
      offsets = [state.offset[m.name] for m in g.members]
      for m, term in zip(g.members, spectral.group_terms(g, t, coef, offsets)):
        j = index[m.name]
        upd = new_leaves[j]
        new_leaves[j] = (upd.astype(jnp.float32) + m.view.from_matrix(term)).astype(upd.dtype)
    new_state = S2DState(optax.safe_increment(state.count), basis, sigma, dict(state.active),
                         dict(state.offset), layout)
    return jax.tree_util.tree_unflatten(treedef, new_leaves), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def s2d_adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    weight_decay_mask: Any = None,
    *,
    decoupled: bool = False,
    **s2d_kwargs,
) -> optax.GradientTransformation:
  """AdamW with S2D, coupled (the paper) or decoupled; see the module docstring.

  Coupled: ``chain(s2d(**s2d_kwargs), adamw(learning_rate, ...))``.
  Decoupled: ``chain(adamw(learning_rate, ...), s2d(decoupled=True,
  learning_rate=learning_rate, **s2d_kwargs))``.
  """
  adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                      weight_decay=weight_decay, mask=weight_decay_mask)
  if decoupled:
    return optax.chain(adamw, s2d(decoupled=True, learning_rate=learning_rate, **s2d_kwargs))
  return optax.chain(s2d(**s2d_kwargs), adamw)


# ----------------------------------------------------------------------------
# Working on an optimizer state that contains S2DState(s).
# ----------------------------------------------------------------------------


def _is_s2d(x) -> bool:
  return isinstance(x, S2DState)


def find_s2d_states(opt_state: Any) -> list[S2DState]:
  """All :class:`S2DState` nodes in ``opt_state`` (chain, inject_hyperparams, ...)."""
  return [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_s2d) if _is_s2d(x)]


def find_s2d_state(opt_state: Any) -> S2DState:
  """The single :class:`S2DState` inside ``opt_state``.

  Raises:
    ValueError: none or several are present.
  """
  found = find_s2d_states(opt_state)
  if len(found) != 1:
    raise ValueError(f"expected exactly one S2DState in the optimizer state, found {len(found)}")
  return found[0]


def _per_kernel(st: S2DState, field: dict[str, jax.Array], tail: int) -> dict[str, jax.Array]:
  """Split group arrays ``(*lead, N, *tail)`` into ``{path: (*lead, *layers, *tail)}``."""
  out = {}
  for g in st.layout.groups:
    arr = field[g.key]
    nd = arr.ndim - tail
    lead, rest = arr.shape[:nd - 1], arr.shape[nd:]
    for m in g.members:
      part = jax.lax.slice_in_dim(arr, m.offset, m.offset + m.view.num_matrices, axis=nd - 1)
      out[m.name] = part.reshape(lead + m.view.batch_shape + rest)
  return out


def sigma_estimates(opt_state: Any) -> dict[str, jax.Array]:
  """``{kernel path: sigma (*layers, K)}`` (largest first) from every S2DState.

  Under ``pmap`` the arrays carry the leading device axis.
  """
  out = {}
  for st in find_s2d_states(opt_state):
    out.update(_per_kernel(st, st.sigma, 1))
  return out


def active_counts(opt_state: Any) -> dict[str, jax.Array]:
  """``{kernel path: active count (*layers,) int32}`` from every S2DState.

  The number of penalised components per matrix (what :func:`set_active`
  sets). Under ``pmap`` the arrays carry the leading device axis.
  """
  out = {}
  for st in find_s2d_states(opt_state):
    out.update(_per_kernel(st, st.active, 0))
  return out


def tracked_bases(opt_state: Any) -> dict[str, jax.Array]:
  """``{kernel path: basis (*layers, K_eff, min(rows, cols))}`` from every S2DState.

  Orthonormal rows spanning the tracked right singular subspace of each
  matrix's ``M`` (see :mod:`s2d_jax.spectral`). Under ``pmap`` the arrays
  carry the leading device axis.
  """
  out = {}
  for st in find_s2d_states(opt_state):
    out.update(_per_kernel(st, st.basis, 2))
  return out


def _flatten_active(active: Any) -> dict[str, Any]:
  if not isinstance(active, Mapping):
    raise TypeError(f"active must be a dict (path -> count) or a nested dict, got {type(active)}")
  out = {}
  for key, val in active.items():
    if isinstance(val, Mapping):
      for sub, v in _flatten_active(val).items():
        out[f"{key}/{sub}"] = v
    else:
      out[str(key)] = val
  return out


def _check_count(name: str, v: np.ndarray, kk: int, shape: tuple[int, ...]) -> np.ndarray:
  if v.dtype == bool or not (np.issubdtype(v.dtype, np.integer) or np.all(v == np.round(v))):
    raise ValueError(f"set_active: count for {name!r} must be integer, got {v!r}")
  if v.size and (v.min() < 0 or v.max() > kk):
    raise ValueError(f"set_active: count for {name!r} must be in [0, {kk}], got {v!r}")
  try:
    return np.broadcast_to(v.astype(np.int32), shape)
  except ValueError as e:
    raise ValueError(
        f"set_active: count for {name!r} has shape {v.shape}, not broadcastable "
        f"to the kernel's layer shape {shape}") from e


@jax.jit
def _merge(old, new, mask):
  return jnp.where(mask, new, old)


def _put_like(x: np.ndarray, old: jax.Array) -> jax.Array:
  """``x`` on ``old``'s devices with ``old``'s sharding (no recompilation downstream)."""
  sharding = getattr(old, "sharding", None)
  return jax.device_put(x, sharding) if sharding is not None else jnp.asarray(x)


def set_active(opt_state: Any, active: Any, *, strict: bool = True) -> Any:
  """Set the number of penalised components per kernel, without changing shapes.

  Args:
    opt_state: an optimizer state containing one or more :class:`S2DState`.
    active: ``{kernel path: count}`` with ``'/'``-joined paths (as returned by
      :func:`s2d_jax.pcdr.select_active`), or a nested dict mirroring params.
      A count is an int or an int array broadcastable to the kernel's layer
      shape (``(depth,)`` for scan layout); values in ``[0, K]``. Kernels not
      named keep their counts. Traced counts are clipped to ``[0, K]``.
    strict: raise KeyError for paths that no S2DState tracks.

  Returns:
    ``opt_state`` with the counts replaced (same shapes, dtypes and, for
    committed arrays, shardings, so a jitted step does not recompile). With
    concrete counts the group arrays are rebuilt on the host when they are
    fully addressable, else merged on device (multi-host), never by reading
    other processes' shards.
  """
  flat = _flatten_active(active)
  used = set()

  def replace(st):
    if not _is_s2d(st):
      return st
    kk = st.layout.k
    new_active = dict(st.active)
    for g in st.layout.groups:
      named = [m for m in g.members if m.name in flat]
      if not named:
        continue
      used.update(m.name for m in named)
      old = st.active[g.key]
      lead = tuple(old.shape[:-1])
      vals = {m.name: _concrete(flat[m.name]) for m in named}
      if isinstance(old, jax.core.Tracer) or any(v is None for v in vals.values()):
        arr = old
        for m in named:
          a, b = m.offset, m.offset + m.view.num_matrices
          if vals[m.name] is not None:
            v = jnp.asarray(_check_count(m.name, vals[m.name], kk, lead + m.view.batch_shape))
          else:
            v = jnp.broadcast_to(jnp.clip(jnp.asarray(flat[m.name]).astype(jnp.int32), 0, kk),
                                 lead + m.view.batch_shape)
          arr = arr.at[..., a:b].set(v.reshape(lead + (b - a,)))
        new_active[g.key] = arr
        continue
      new = np.zeros(old.shape, np.int32)
      mask = np.zeros(old.shape, bool)
      for m in named:
        a, b = m.offset, m.offset + m.view.num_matrices
        v = _check_count(m.name, vals[m.name], kk, lead + m.view.batch_shape)
        new[..., a:b] = v.reshape(lead + (b - a,))
        mask[..., a:b] = True
      if mask.all():
        new_active[g.key] = _put_like(new, old)
      elif getattr(old, "is_fully_addressable", True):
        new_active[g.key] = _put_like(np.where(mask, new, np.asarray(old)), old)
      else:
        new_active[g.key] = _merge(old, _put_like(new, old), _put_like(mask, old))
    return st._replace(active=new_active)

  out = jax.tree_util.tree_map(replace, opt_state, is_leaf=_is_s2d)
  if strict:
    unknown = sorted(set(flat) - used)
    if unknown:
      known = sorted(m.name for st in find_s2d_states(opt_state) for _, _, m in st.layout.members())
      raise KeyError(f"set_active: no S2D-tracked kernel named {unknown[:5]}; "
                     f"tracked kernels include {known[:5]}")
  return out
