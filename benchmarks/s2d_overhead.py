"""Cost of S2D next to AdamW, measured side by side in one run.

Sections (``--sections``, default all):

  hlo      size of the compiled optimizer update at depth 4/12/24 (tiny width, loop
           and scan layouts): HLO instructions, heavy ops (matmuls, solver calls,
           loops) and distinct compiled computations, AdamW vs chain(s2d, AdamW);
           S2D's part should be flat in depth.
  compile  lower+compile time of the optimizer update alone and of the full training
           step, AdamW vs AdamW+S2D (k=3), per layout.
  step     training-step time AdamW+S2D / AdamW at k=1 and k=3, per layout and batch.
  pcdr     the PCDR refresh (jitted capture of the matmul inputs on --pcdr_batch
           images, host-side selection, set_active; as s2d_jax/train.py does it) as
           a multiple of one training step, for the --variant model and the demo
           model (configs/demo.py).

Variants are timed interleaved, round-robin, so that machine load hits all alike;
medians are reported with the spread (p10-p90 over median) as the noise level.
S2D runs with ``strategy=auto`` and, with ``--strategies=auto,batched``, also the
other strategy (see s2d_jax/spectral.py, "Shape groups and backends").

On CPU only ratios are printed (absolute CPU times say little about a training
machine); on GPU/TPU (``--device=gpu|tpu``) absolute times too.

  python -m benchmarks.s2d_overhead --batches=2,8 --layouts=loop,scan
  python -m benchmarks.s2d_overhead --device=gpu --batches=32,128
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from s2d_jax import capture, hlo_stats, optim, pcdr, spectral
from s2d_jax.models import vit

NUM_CLASSES = 1000


def stats(ts) -> dict[str, float]:
  ts = np.asarray(ts, np.float64)
  med = float(np.median(ts))
  return dict(median=med, p10=float(np.percentile(ts, 10)), p90=float(np.percentile(ts, 90)),
              max=float(ts.max()), noise=float((np.percentile(ts, 90) - np.percentile(ts, 10)) / med),
              n=len(ts))


def timed_compile(fn, *args) -> tuple[Any, float, float]:
  """``(compiled, wall s, process cpu s)`` of lowering + compiling ``fn(*args)``."""
  t0, c0 = time.perf_counter(), time.process_time()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - t0, time.process_time() - c0


def make_model(variant, scan, depth=None, width=None):
  kw = {}
  if depth is not None:
    kw.update(depth=depth, width=width, mlp_dim=4 * width, num_heads=max(1, width // 32))
  return vit.Model(num_classes=NUM_CLASSES, variant=variant, pool_type="map", scan=scan, **kw)


def init_params(model, res):
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)))["params"]
  # Non-zero head so that every kernel has a spectrum (the zero-init head is skipped).
  params["head"]["kernel"] = 0.02 * jax.random.normal(jax.random.PRNGKey(1),
                                                      params["head"]["kernel"].shape)
  return params


def optimizers(ks, strategies) -> dict[str, optax.GradientTransformation]:
  adamw = lambda: optax.adamw(1e-4, weight_decay=1e-4)
  out = {"adamw": adamw()}
  for strategy in strategies:
    for k in ks:
      name = f"s2d_k{k}" + ("" if strategy == "auto" else f"_{strategy}")
      out[name] = optax.chain(optim.s2d(k=k, strategy=strategy), adamw())
  return out


def make_step(model, tx, donate):
  def loss_fn(p, images, labels):
    logits, _ = model.apply({"params": p}, images, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def step(p, s, images, labels):
    loss, g = jax.value_and_grad(loss_fn)(p, images, labels)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss
  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


# ----------------------------------------------------------------------------
# Sections.
# ----------------------------------------------------------------------------


def section_hlo(args):
  print(f"\n== hlo: compiled optimizer update vs depth (width {args.hlo_width}, k=3)")
  print(f"{'layout':6s} {'depth':>5s} {'kernels':>7s} {'variant':18s} {'instructions':>12s} "
        f"{'heavy':>6s} {'distinct':>8s}   S2D part: instructions / heavy / distinct")
  for layout in args.layouts:
    for depth in args.hlo_depths:
      model = make_model(None, layout == "scan", depth, args.hlo_width)
      params = jax.eval_shape(lambda m=model: m.init(
          jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"])
      n_kernels = sum(v.num_matrices for _, v in spectral.select_kernels(params).values())
      sizes = {}
      for name, tx in optimizers([3], args.strategies).items():
        state = jax.eval_shape(tx.init, params)
        hlo = jax.jit(tx.update).lower(params, state, params).compile().as_text()
        sizes[name] = hlo_stats.program_size(hlo)
      base = sizes["adamw"]
      for name, sz in sizes.items():
        extra = "" if name == "adamw" else "   " + " / ".join(
            f"{sz[k] - base[k]:+d}" for k in ("instructions", "heavy", "distinct"))
        print(f"{layout:6s} {depth:5d} {n_kernels:7d} {name:18s} {sz['instructions']:12d} "
              f"{sz['heavy']:6d} {sz['distinct']:8d}{extra}", flush=True)


def section_compile(args, layout):
  model = make_model(args.variant, layout == "scan")
  params = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, args.res, args.res, 3)))["params"])
  images = jax.ShapeDtypeStruct((args.batches[0], args.res, args.res, 3), jnp.float32)
  labels = jax.ShapeDtypeStruct((args.batches[0],), jnp.int32)
  txs = optimizers([3], args.strategies)
  res = {name: {"update": [], "step": []} for name in txs}
  for _ in range(args.compile_reps):
    for name, tx in txs.items():
      state = jax.eval_shape(tx.init, params)
      _, wall, cpu = timed_compile(jax.jit(tx.update), params, state, params)
      res[name]["update"].append((wall, cpu))
      _, wall, cpu = timed_compile(make_step(model, tx, args.donate), params, state,
                                   images, labels)
      res[name]["step"].append((wall, cpu))
  print(f"\n== compile ({layout} layout, ViT-{args.variant}, batch {args.batches[0]}; "
        f"lower+compile, median of {args.compile_reps}; wall and process-CPU seconds)")
  for what in ("update", "step"):
    bw = np.median([w for w, _ in res["adamw"][what]])
    bc = np.median([c for _, c in res["adamw"][what]])
    for name, r in res.items():
      w, c = np.median([x for x, _ in r[what]]), np.median([x for _, x in r[what]])
      absolute = f"  {w:6.1f}s wall {c:6.1f}s cpu" if args.absolute else ""
      print(f"  {what:6s} {name:18s} ratio to AdamW: wall {w / bw:5.2f}x  cpu {c / bc:5.2f}x"
            f"{absolute}", flush=True)


def section_step(args, layout, batch):
  model = make_model(args.variant, layout == "scan")
  params0 = init_params(model, args.res)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (batch, args.res, args.res, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, NUM_CLASSES, batch), jnp.int32)
  runs = {}
  for name, tx in optimizers(args.ks, args.strategies).items():
    p = jax.tree.map(jnp.copy, params0)
    s = tx.init(p)
    step = make_step(model, tx, args.donate)
    p, s, loss = step(p, s, images, labels)          # compile + first step
    jax.block_until_ready(loss)
    runs[name] = [step, p, s, [], []]
  for _ in range(args.rounds):
    for name, run in runs.items():
      step, p, s, walls, cpus = run
      t0, c0 = time.perf_counter(), time.process_time()
      p, s, loss = step(p, s, images, labels)
      jax.block_until_ready((p, s, loss))
      walls.append(time.perf_counter() - t0)
      cpus.append(time.process_time() - c0)
      run[1:3] = [p, s]
  base = stats(runs["adamw"][3])
  base_cpu = stats(runs["adamw"][4])
  print(f"\n== step ({layout} layout, ViT-{args.variant}, batch {batch}, {args.rounds} "
        f"interleaved rounds; AdamW noise p10-p90/median: wall {100 * base['noise']:.0f} %, "
        f"cpu {100 * base_cpu['noise']:.0f} %)")
  for name, run in runs.items():
    w, c = stats(run[3]), stats(run[4])
    absolute = (f"  median {1e3 * w['median']:8.1f} ms  p90 {1e3 * w['p90']:8.1f}  max "
                f"{1e3 * w['max']:8.1f}" if args.absolute else "")
    print(f"  {name:18s} ratio of medians: wall {w['median'] / base['median']:.4f}  "
          f"cpu {c['median'] / base_cpu['median']:.4f}   max/median {w['max'] / w['median']:.2f}"
          f"{absolute}", flush=True)
  return {name: stats(run[3])["median"] for name, run in runs.items()}


def _refresh_fn(model, k_max, tau, nb):
  """The trainer's PCDR refresh: jitted capture, host-side selection, set_active."""
  capture_fn = jax.jit(lambda p, x: capture.capture_matmul_inputs(
      model.apply, {"params": p}, x[:nb], train=False,
      include=lambda path: path[-1] != "head")[1])

  def refresh(params, opt_state, images):
    inputs = jax.block_until_ready(capture_fn(params, images))
    mask = jax.tree_util.tree_map_with_path(
        lambda kp, x: (spectral.path_tuple(kp)[-1] == "kernel" and x.ndim >= 2
                       and "head" not in spectral.path_tuple(kp)), params)
    active = jax.block_until_ready(pcdr.select_active(params, inputs, k_max=k_max, tau=tau,
                                                      mask=mask))
    return jax.block_until_ready(optim.set_active(opt_state, active))
  return refresh


def section_pcdr(args):
  setups = [(f"ViT-{args.variant} {args.res}px, batch {args.batches[0]}",
             make_model(args.variant, True), args.res, args.batches[0]),
            ("demo (configs/demo.py: width 64, depth 4, 32px), batch 64",
             vit.Model(12, patch_size=(4, 4), width=64, depth=4, mlp_dim=256, num_heads=4,
                       pool_type="map", scan=True), 32, 64)]
  print(f"\n== pcdr refresh (k_max=3, tau=0.95, {args.pcdr_batch} images, scan layout) as a "
        "multiple of one AdamW+S2D(k=3) training step; first call includes compilation")
  for title, model, res, batch in setups:
    params = init_params(model, res) if "ViT" in title else jax.jit(model.init)(
        jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)))["params"]
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (batch, res, res, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, model.num_classes, batch), jnp.int32)
    tx = optax.chain(optim.s2d(k=3), optax.adamw(1e-4))
    state = tx.init(params)
    step = make_step(model, tx, args.donate)
    refresh = _refresh_fn(model, 3, 0.95, args.pcdr_batch)
    t0 = time.perf_counter()
    state = refresh(params, state, images)
    first_refresh = time.perf_counter() - t0
    params, state, loss = step(params, state, images, labels)
    jax.block_until_ready(loss)
    steps, refreshes = [], []
    for _ in range(args.pcdr_rounds):
      t0 = time.perf_counter()
      params, state, loss = step(params, state, images, labels)
      jax.block_until_ready((params, state))
      steps.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      state = refresh(params, state, images)
      refreshes.append(time.perf_counter() - t0)
    s, r = stats(steps), stats(refreshes)
    absolute = (f"  (refresh {1e3 * r['median']:.0f} ms, step {1e3 * s['median']:.0f} ms)"
                if args.absolute else "")
    print(f"  {title}: refresh / step = {r['median'] / s['median']:.2f} (median of "
          f"{args.pcdr_rounds}; first refresh incl. compile = {first_refresh / s['median']:.1f}"
          f" steps){absolute}", flush=True)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--device", default=None, help="cpu | gpu | tpu (default: jax's default)")
  ap.add_argument("--sections", default="hlo,compile,step,pcdr")
  ap.add_argument("--variant", default="B/16")
  ap.add_argument("--res", type=int, default=224)
  ap.add_argument("--batches", default="2,8", help="step section batches; first one for compile")
  ap.add_argument("--layouts", default="loop,scan")
  ap.add_argument("--ks", default="1,3")
  ap.add_argument("--strategies", default="auto", help="s2d strategies, e.g. auto,batched")
  ap.add_argument("--rounds", type=int, default=10, help="timed steps per variant")
  ap.add_argument("--compile_reps", type=int, default=1)
  ap.add_argument("--hlo_width", type=int, default=64)
  ap.add_argument("--hlo_depths", default="4,12,24")
  ap.add_argument("--pcdr_batch", type=int, default=8)
  ap.add_argument("--pcdr_rounds", type=int, default=5)
  ap.add_argument("--donate", default="auto", choices=("auto", "yes", "no"),
                  help="donate params/state to the step (auto: not on CPU, where a "
                       "donated S2D step can deadlock XLA:CPU, see "
                       "benchmarks/xla_cpu_hangs.py; as s2d_jax/train.py does)")
  args = ap.parse_args(argv)
  if args.device:
    jax.config.update("jax_platforms", args.device)
  args.batches = [int(b) for b in args.batches.split(",")]
  args.layouts = args.layouts.split(",")
  args.ks = [int(k) for k in args.ks.split(",")]
  args.strategies = args.strategies.split(",")
  args.hlo_depths = [int(d) for d in args.hlo_depths.split(",")]
  backend = jax.default_backend()
  args.absolute = backend != "cpu"
  args.donate = (backend != "cpu") if args.donate == "auto" else args.donate == "yes"
  sections = args.sections.split(",")
  print(f"jax {jax.__version__} on {backend} ({jax.device_count()} devices: "
        f"{jax.devices()[0].device_kind}); S2D strategy auto = "
        f"{spectral.default_strategy(backend)}", flush=True)
  if "hlo" in sections:
    section_hlo(args)
  for layout in args.layouts:
    if "compile" in sections:
      section_compile(args, layout)
    if "step" in sections:
      for batch in args.batches:
        section_step(args, layout, batch)
  if "pcdr" in sections:
    section_pcdr(args)


if __name__ == "__main__":
  main()
