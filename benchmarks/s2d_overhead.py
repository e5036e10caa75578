"""Cost of S2D in a jitted ViT training step, measured against AdamW in one run.

Variants (all `optax.chain(<regulariser>, optax.adamw(...))`, one compiled step
each, timed interleaved round-robin so machine load affects all alike):

  adamw        AdamW alone.
  s2d_k1       s2d(k=1): warm-started subspace iteration, iters=1.
  s2d_k3       s2d(k=3).
  svd_naive    a full jnp.linalg.svd of every kernel's matrix view every step.
  svd_amort    the paper's amortised scheme: full SVD every --refresh_every
               steps (lax.cond inside the one compiled step), stale U, S, V in
               between.

Prints per-variant step-time median / p95 / max / mean, the ratios to AdamW,
the optimizer-update time alone (a separately jitted `tx.update`), and the
optimizer-state memory each variant adds relative to AdamW's state.

  python -m benchmarks.s2d_overhead --variant=B/16 --batch=2 --res=224 --rounds=20
"""

from __future__ import annotations

import argparse
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from s2d_jax import optim, spectral
from s2d_jax.models import vit


class FullSVDState(NamedTuple):
  count: jax.Array
  usv: dict[str, tuple[jax.Array, jax.Array, jax.Array]]


def full_svd_s2d(k: int = 1, strength: float = 5e-4, power: float = 2.0,
                 refresh_every: int = 1) -> optax.GradientTransformation:
  """Baseline S2D from full SVDs: every step (1) or every `refresh_every` steps."""

  def svd_top(view, w):
    m = view.to_matrix(w.astype(jnp.float32))
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    kk = min(k, s.shape[-1])
    return u[..., :kk], s[..., :kk], jnp.swapaxes(vt[..., :kk, :], -1, -2)

  def init(params):
    usv = {}
    for name, (_, view) in spectral.select_kernels(params).items():
      kk = min(k, view.rows, view.cols)
      b = view.batch_shape
      usv[name] = (jnp.zeros(b + (view.rows, kk)), jnp.zeros(b + (kk,)),
                   jnp.zeros(b + (view.cols, kk)))
    return FullSVDState(jnp.zeros([], jnp.int32), usv)

  def update(updates, state, params):
    leaves = {spectral.path_str(p): x for p, x in spectral.leaves_with_paths(params)}
    views = {n: spectral.matrix_view(tuple(n.split("/")), leaves[n].shape) for n in state.usv}

    def compute():
      return {n: svd_top(views[n], leaves[n]) for n in state.usv}

    if refresh_every == 1:
      usv = compute()
    else:
      usv = jax.lax.cond(state.count % refresh_every == 0, compute, lambda: state.usv)
    flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
    out = []
    for kp, g in flat:
      name = spectral.path_str(spectral.path_tuple(kp))
      if name in usv:
        u, s, v = usv[name]
        term = jnp.matmul(u * (strength * s ** power)[..., None, :], jnp.swapaxes(v, -1, -2))
        g = (g.astype(jnp.float32) + views[name].from_matrix(term)).astype(g.dtype)
      out.append(g)
    return jax.tree_util.tree_unflatten(treedef, out), FullSVDState(state.count + 1, usv)

  return optax.GradientTransformation(init, update)


def tree_bytes(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def stats(ts):
  ts = np.asarray(ts)
  return dict(median=np.median(ts), p95=np.percentile(ts, 95), max=ts.max(), mean=ts.mean(),
              n=len(ts))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--variant", default="B/16")
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--res", type=int, default=224)
  ap.add_argument("--scan", action="store_true", help="scan layout (encoderblock)")
  ap.add_argument("--rounds", type=int, default=20, help="timed steps per variant")
  ap.add_argument("--naive_rounds", type=int, default=4, help="timed steps of svd_naive")
  ap.add_argument("--refresh_every", type=int, default=100)
  ap.add_argument("--update_reps", type=int, default=10, help="timed optimizer-only updates")
  ap.add_argument("--updates_only", action="store_true", help="skip the training-step timing")
  ap.add_argument("--skip_naive", action="store_true", help="leave out svd_naive")
  args = ap.parse_args(argv)

  model = vit.Model(num_classes=1000, variant=args.variant, pool_type="map", scan=args.scan)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (args.batch, args.res, args.res, 3)), jnp.float32)
  labels = jax.nn.one_hot(rng.integers(0, 1000, args.batch), 1000)
  params0 = jax.jit(model.init)(jax.random.PRNGKey(0), images)["params"]
  # Non-zero head so that every kernel has a spectrum (the zero-init head is skipped).
  params0["head"]["kernel"] = 0.02 * jax.random.normal(jax.random.PRNGKey(1),
                                                       params0["head"]["kernel"].shape)
  n_params = sum(x.size for x in jax.tree.leaves(params0))
  n_kernels = len(spectral.select_kernels(params0))
  print(f"ViT-{args.variant} scan={args.scan}: {n_params / 1e6:.1f}M params, {n_kernels} "
        f"S2D kernels; batch {args.batch} at {args.res}px; devices {jax.devices()}")

  adamw = lambda: optax.adamw(1e-4, weight_decay=1e-4)
  variants = {
      "adamw": adamw(),
      "s2d_k1": optax.chain(optim.s2d(k=1), adamw()),
      "s2d_k3": optax.chain(optim.s2d(k=3), adamw()),
      "svd_naive": optax.chain(full_svd_s2d(k=1, refresh_every=1), adamw()),
      "svd_amort": optax.chain(full_svd_s2d(k=1, refresh_every=args.refresh_every), adamw()),
  }
  if args.skip_naive:
    del variants["svd_naive"]

  def loss_fn(p):
    logits, _ = model.apply({"params": p}, images, train=True)
    return optax.softmax_cross_entropy(logits, labels).mean()

  def make_step(tx):
    def step(p, s):
      loss, g = jax.value_and_grad(loss_fn)(p)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s, loss
    return jax.jit(step, donate_argnums=(0, 1))

  # Memory of the optimizer states (shapes only).
  mem = {n: tree_bytes(jax.eval_shape(tx.init, params0)) for n, tx in variants.items()}
  print("\noptimizer-state memory (MiB) and extra vs AdamW's state:")
  for n, b in mem.items():
    print(f"  {n:10s} {b / 2**20:9.2f}  extra {100 * (b - mem['adamw']) / mem['adamw']:+.3f} %")

  if not args.updates_only:
    base = time_steps(args, variants, params0, make_step)
  else:
    base = float("nan")
  time_updates(args, variants, params0, base)


def time_steps(args, variants, params0, make_step):
  """Interleaved training-step timing; returns AdamW's median step time."""
  runs = {}
  for name, tx in variants.items():
    p = jax.tree.map(jnp.copy, params0)
    s = tx.init(p)
    step = make_step(tx)
    t0 = time.perf_counter()
    p, s, loss = step(p, s)
    jax.block_until_ready(loss)
    print(f"compiled+ran {name} in {time.perf_counter() - t0:.1f}s (loss {float(loss):.3f})")
    runs[name] = [step, p, s, []]

  # The amortised variant refreshed at count 0 during the warm-up step above;
  # its count now runs 1..rounds, so a refresh lands every refresh_every steps.
  for r in range(args.rounds):
    for name in variants:
      if name == "svd_naive" and r >= args.naive_rounds:
        continue
      step, p, s, ts = runs[name]
      t0 = time.perf_counter()
      p, s, loss = step(p, s)
      jax.block_until_ready((p, s, loss))
      ts.append(time.perf_counter() - t0)
      runs[name][1:3] = [p, s]
    print(f"round {r + 1}/{args.rounds}: " + ", ".join(
        f"{n} {runs[n][3][-1]:.2f}s" for n in variants if runs[n][3] and len(runs[n][3]) == r + 1))

  st = {n: stats(runs[n][3]) for n in variants}
  base = st["adamw"]["median"]
  print("\ntraining step (s): median / p95 / max / mean over n, and median ratio to AdamW")
  for n, x in st.items():
    print(f"  {n:10s} {x['median']:7.3f} {x['p95']:7.3f} {x['max']:7.3f} {x['mean']:7.3f} "
          f"n={x['n']:3d}  ratio {x['median'] / base:.4f} ({100 * (x['median'] / base - 1):+.2f} %)")
  amort = st["svd_amort"]
  print(f"  svd_amort spikes: max/median {amort['max'] / amort['median']:.2f}x "
        f"(refresh every {args.refresh_every} steps)")
  return base


def time_updates(args, variants, params0, base):
  """Optimizer update alone (same gradients), interleaved; min over reps."""
  grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params0)
  upd = {}
  for name, tx in variants.items():
    f = jax.jit(tx.update)
    _, s = f(grads, tx.init(params0), params0)   # count 1: no amortised refresh
    for _ in range(2):
      jax.block_until_ready(f(grads, s, params0))
    upd[name] = (f, s, [])
  for _ in range(args.update_reps):
    for name, (f, s, ts) in upd.items():
      if name == "svd_naive" and len(ts) >= 2:
        continue
      t0 = time.perf_counter()
      jax.block_until_ready(f(grads, s, params0))
      ts.append(time.perf_counter() - t0)
  print("\noptimizer update alone (ms, min over reps), and its extra cost vs AdamW's update, "
        "as % of the AdamW training step:")
  ub = np.min(upd["adamw"][2])
  for name, (_, _, ts) in upd.items():
    m = np.min(ts)
    print(f"  {name:10s} {1e3 * m:9.1f} ms   extra {100 * (m - ub) / base:+.2f} % of a step")


if __name__ == "__main__":
  main()
