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

from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from s2d_jax import spectral

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]


class S2DState(NamedTuple):
  """State of :func:`s2d`. Dicts are keyed by ``'/'``-joined kernel paths.

  Attributes:
    count: int32 step counter (drives a ``learning_rate`` schedule).
    basis: per kernel, ``(*layers, K_eff, min(rows, cols))`` float32: the
      tracked singular vectors (rows) of the smaller side of the matrix view.
    sigma: per kernel, ``(*layers, K)`` float32: the singular values from the
      last step (at init: from ``init_iters`` iterations), largest first, 0
      beyond the matrix rank.
    active: per kernel, ``(*layers,)`` int32 in ``[0, K]``: number of
      penalised components.
  """
  count: jax.Array
  basis: dict[str, jax.Array]
  sigma: dict[str, jax.Array]
  active: dict[str, jax.Array]


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
) -> optax.GradientTransformation:
  r"""Selective Spectral Decay: add ``strength * sum_{i<k} sigma_i^power u_i v_i^T``.

  ``update(updates, state, params)`` returns, for every selected kernel with
  matrix view ``W (rows, cols)`` (per layer for scan-layout kernels)::

      updates + c * strength * sum_{i < active} sigma_i^power * u_i v_i^T

  with ``c = 1`` (coupled) or ``c = -learning_rate(count)`` (decoupled), and
  ``updates`` unchanged for every other leaf. ``sigma_i, u_i, v_i`` are the
  current estimates of the top singular triplets of ``W`` (float32; the result
  is cast back to the incoming update's dtype).

  Args:
    k: initial number of penalised components per matrix (``active``).
    strength: lambda, float or (under ``inject_hyperparams``) array; for a
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

  Returns:
    An ``optax.GradientTransformation`` with :class:`S2DState`.

  Raises:
    ValueError: invalid options; ``params`` missing in ``update``; a kernel's
      shape differs from init; mask selecting non-float or non-matrix leaves.
    KeyError: a kernel present at init is missing from ``params``.
  """
  _validate(k, strength, power, iters, k_max)
  if decoupled and learning_rate is None:
    raise ValueError("s2d: decoupled=True needs learning_rate (float or schedule)")
  if not decoupled and learning_rate is not None:
    raise ValueError("s2d: learning_rate is only used with decoupled=True")

  def init_impl(params):
    kk = _static_int(k_max if k_max is not None else k, "k_max" if k_max is not None else "k")
    if kk < 1:
      raise ValueError("s2d: k_max must be >= 1 (pass k_max when k=0)")
    n_init = _static_int(init_iters, "init_iters")
    sd = _static_int(seed, "seed")
    leaves = {spectral.path_str(p): x for p, x in spectral.leaves_with_paths(params)}
    basis, sigma, active = {}, {}, {}
    for name, (_, view) in spectral.select_kernels(params, mask, views).items():
      b0 = spectral.init_basis(view, kk, sd, name)
      if n_init > 0:
        t = spectral.track(view, leaves[name], b0, n_init)
        basis[name] = t.basis
        sigma[name] = _pad(jnp.where(t.valid[..., None], t.s, 0.0), kk)
      else:
        basis[name] = b0
        sigma[name] = jnp.zeros(view.batch_shape + (kk,), jnp.float32)
      active[name] = jnp.full(view.batch_shape, jnp.clip(jnp.asarray(k, jnp.int32), 0, kk),
                              jnp.int32)
    return S2DState(jnp.zeros([], jnp.int32), basis, sigma, active)

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
    new_leaves = [leaf for _, leaf in flat]
    if decoupled:
      lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
      scale = -jnp.asarray(lr, jnp.float32) * jnp.asarray(strength, jnp.float32)
    else:
      scale = jnp.asarray(strength, jnp.float32)
    pw = jnp.asarray(power, jnp.float32)
    basis, sigma = {}, {}
    for name, b in state.basis.items():
      if name not in pleaves:
        raise KeyError(f"s2d: kernel {name!r} (selected at init) is missing from params")
      w = pleaves[name]
      path = tuple(name.split("/"))
      view = spectral.matrix_view(path, w.shape, views)
      kk = state.sigma[name].shape[-1]
      if view is None or spectral.basis_shape(view, kk) != tuple(b.shape):
        raise ValueError(
            f"s2d: kernel {name!r} has shape {tuple(w.shape)}, incompatible with the "
            f"state from init (basis {tuple(b.shape)}); re-run init")
      t = spectral.track(view, w, b, iters)
      keff = t.s.shape[-1]
      on = jnp.arange(keff) < state.active[name][..., None]
      coef = jnp.where(on, scale * jnp.power(t.s, pw), 0.0)
      coef = jnp.where(t.ok[..., None], coef, 0.0)
      term = spectral.rank_k_term(t.u, coef, t.v)
      g = new_leaves[index[name]]
      new_leaves[index[name]] = (g.astype(jnp.float32) + view.from_matrix(term)).astype(g.dtype)
      basis[name] = t.basis
      sigma[name] = jnp.where(t.valid[..., None], _pad(t.s, kk), state.sigma[name])
    new_state = S2DState(optax.safe_increment(state.count), basis, sigma, dict(state.active))
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


def sigma_estimates(opt_state: Any) -> dict[str, jax.Array]:
  """``{kernel path: sigma (*layers, K)}`` (largest first) from every S2DState.

  Under ``pmap`` the arrays carry the leading device axis.
  """
  out = {}
  for st in find_s2d_states(opt_state):
    out.update(st.sigma)
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
    committed arrays, shardings, so a jitted step does not recompile).
  """
  flat = _flatten_active(active)
  used = set()

  def replace(st):
    if not _is_s2d(st):
      return st
    new = dict(st.active)
    for key, val in flat.items():
      if key not in new:
        continue
      used.add(key)
      old = new[key]
      kk = st.sigma[key].shape[-1]
      v = _concrete(val)
      if v is not None:
        if v.dtype == bool or not (np.issubdtype(v.dtype, np.integer) or np.all(v == np.round(v))):
          raise ValueError(f"set_active: count for {key!r} must be integer, got {val!r}")
        if v.size and (v.min() < 0 or v.max() > kk):
          raise ValueError(f"set_active: count for {key!r} must be in [0, {kk}], got {val!r}")
        try:
          arr = np.broadcast_to(v.astype(np.int32), old.shape)
        except ValueError as e:
          raise ValueError(
              f"set_active: count for {key!r} has shape {v.shape}, not broadcastable "
              f"to the kernel's layer shape {tuple(old.shape)}") from e
        arr = jnp.asarray(arr, jnp.int32)
        sharding = getattr(old, "sharding", None)
        if sharding is not None and not isinstance(old, jax.core.Tracer):
          arr = jax.device_put(arr, sharding)
      else:
        arr = jnp.broadcast_to(jnp.clip(jnp.asarray(val).astype(jnp.int32), 0, kk), old.shape)
      new[key] = arr
    return st._replace(active=new)

  out = jax.tree_util.tree_map(replace, opt_state, is_leaf=_is_s2d)
  if strict:
    unknown = sorted(set(flat) - used)
    if unknown:
      known = sorted(k for st in find_s2d_states(opt_state) for k in st.active)
      raise KeyError(f"set_active: no S2D-tracked kernel named {unknown[:5]}; "
                     f"tracked kernels include {known[:5]}")
  return out
