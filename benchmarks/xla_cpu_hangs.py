"""Reproductions of the two XLA:CPU hangs that shaped s2d_jax/train.py's workarounds.

Both were seen with an earlier jax on simulated multi-device CPU (tests, the demo):

  donated_step   `train_step` jitted with `donate_argnums=(0, 1)` (params, optimizer
                 state) on a ('data', 'fsdp') mesh, with S2D in the chain and the
                 PCDR refresh (`set_active`) between steps. Workaround in train.py:
                 no donation on CPU (commit be9daf4).
  fused_pcdr     the PCDR refresh as ONE jitted program (capture the matmul inputs,
                 PCDR of every kernel, `set_active`), dispatched asynchronously and
                 followed at once by the training step. Workaround: a jitted capture,
                 host-side selection, `block_until_ready` before the step (1dcfc1c).
  both           the configuration before either workaround (donation + fused refresh,
                 no waiting).

Each (case, device count, fsdp) runs in its own subprocess with a timeout, like the
trainer (tiny ViT in scan layout as configs/demo.py, S2D k_max=3 coupled with AdamW,
batch sharded over all devices, params and optimizer state sharded by
`parallel.tree_shardings`, PCDR refresh every `--refresh_every` steps). A run that does
not finish `--steps` steps within `--timeout` seconds is reported as HANG.

  python -m benchmarks.xla_cpu_hangs                       # all cases, 1/2/8 devices
  python -m benchmarks.xla_cpu_hangs --cases=donated_step --devices=8 --repeats=5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

CASES = ("donated_step", "fused_pcdr", "both")


def child(case: str, steps: int, refresh_every: int, fsdp: int, batch: int, width: int,
          depth: int, res: int, sync_every: int) -> None:
  """Runs one case in this process (XLA_FLAGS already set by the parent)."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from s2d_jax import capture, optim, parallel, pcdr, spectral  # pylint: disable=g-import-not-at-top
  from s2d_jax.models import vit  # pylint: disable=g-import-not-at-top

  donate = case in ("donated_step", "both")
  fused = case in ("fused_pcdr", "both")
  n = jax.device_count()
  mesh = parallel.make_mesh(fsdp)
  repl = NamedSharding(mesh, P())
  model = vit.Model(12, patch_size=(4, 4), width=width, depth=depth, mlp_dim=4 * width,
                    num_heads=4, pool_type="map", scan=True)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (batch, res, res, 3)).astype(np.float32)
  labels = rng.integers(0, 12, batch).astype(np.int32)
  data_sh = parallel.batch_sharding(mesh)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), images[:1])["params"]
  param_sh = parallel.tree_shardings(abstract, mesh)
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), images[:1])["params"],
                   out_shardings=param_sh)()
  mask = spectral.kernel_mask(abstract, ("(^|/)head/",))
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optim.s2d(k=3, k_max=3, strength=5e-2, mask=mask),
                   optax.adamw(1e-3, weight_decay=1e-4))
  opt_sh = parallel.tree_shardings(jax.eval_shape(tx.init, abstract), mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)

  def loss_fn(p, x, y):
    logits, _ = model.apply({"params": p}, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @functools.partial(jax.jit, donate_argnums=(0, 1) if donate else (),
                     out_shardings=(param_sh, opt_sh, repl))
  def train_step(p, s, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  def capture_inputs(p, x):
    _, inputs = capture.capture_matmul_inputs(
        model.apply, {"params": p}, x[:8], train=False,
        include=lambda path: path[-1] != "head")
    return inputs

  if fused:
    @functools.partial(jax.jit, out_shardings=opt_sh)
    def refresh(p, s, x):
      x = jax.lax.with_sharding_constraint(x, repl)
      p_r = jax.lax.with_sharding_constraint(p, repl)
      active = pcdr.select_active(p_r, capture_inputs(p_r, x), k_max=3, tau=0.5, mask=mask)
      return optim.set_active(s, active)
  else:
    capture_fn = jax.jit(capture_inputs, out_shardings=repl)

    def refresh(p, s, x):
      inputs = jax.block_until_ready(capture_fn(p, x))
      active = jax.block_until_ready(
          pcdr.select_active(p, inputs, k_max=3, tau=0.5, mask=mask))
      s = optim.set_active(s, active)
      jax.block_until_ready(s)
      return s

  x = jax.device_put(images, data_sh)
  y = jax.device_put(labels, data_sh)
  t0 = time.perf_counter()
  loss = None
  for step in range(steps):
    if step % refresh_every == 0:
      print(f"progress: step {step} refresh dispatched", flush=True)
      opt_state = refresh(params, opt_state, x)
    params, opt_state, loss = train_step(params, opt_state, x, y)
    print(f"progress: step {step} train_step dispatched ({time.perf_counter() - t0:.1f}s)",
          flush=True)
    if sync_every and (step + 1) % sync_every == 0:
      jax.block_until_ready(loss)
      print(f"progress: step {step} done ({time.perf_counter() - t0:.1f}s)", flush=True)
  loss = float(jax.block_until_ready(loss))
  print(f"ok: {steps} steps on {n} devices (fsdp={fsdp}), loss {loss:.4f}, "
        f"{time.perf_counter() - t0:.1f}s, jax {jax.__version__}", flush=True)


def run_case(case, devices, fsdp, args) -> tuple[str, float, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={devices}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  cmd = [sys.executable, "-m", "benchmarks.xla_cpu_hangs", "--child", case,
         f"--steps={args.steps}", f"--refresh_every={args.refresh_every}",
         f"--fsdp={fsdp}", f"--batch={args.batch}", f"--width={args.width}",
         f"--depth={args.depth}", f"--res={args.res}", f"--sync_every={args.sync_every}"]
  t0 = time.perf_counter()
  try:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout,
                         check=False)
  except subprocess.TimeoutExpired as e:
    stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    last = (stdout.strip().splitlines() or ["(nothing printed)"])[-1]
    return "HANG", time.perf_counter() - t0, f"no result after {args.timeout:.0f}s; last: {last}"
  dt = time.perf_counter() - t0
  if out.returncode != 0:
    # the fatal line (e.g. XLA:CPU's "Termination timeout for `all gather
    # RendezvousKey...`"), not the stack-trace frames after it
    err = [l[:300] for l in out.stderr.strip().splitlines()
           if l.strip() and not l.lstrip().startswith("@") and "stack trace" not in l]
    last = (out.stdout.strip().splitlines() or ["(nothing printed)"])[-1]
    return "ERROR", dt, (f"exit {out.returncode}; last progress: {last}; stderr: "
                         + " | ".join(err[-3:]))
  return "ok", dt, out.stdout.strip().splitlines()[-1]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--cases", default=",".join(CASES))
  ap.add_argument("--devices", default="1,2,8")
  ap.add_argument("--fsdp", default="1,all", help="fsdp sizes: integers or 'all'")
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--refresh_every", type=int, default=5)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--width", type=int, default=64, help="ViT width (demo: 64)")
  ap.add_argument("--depth", type=int, default=4, help="ViT depth (demo: 4)")
  ap.add_argument("--res", type=int, default=32, help="image size (demo: 32)")
  ap.add_argument("--sync_every", type=int, default=0,
                  help="block_until_ready every n steps (0: only at the end, as train.py)")
  ap.add_argument("--timeout", type=float, default=300.0)
  ap.add_argument("--repeats", type=int, default=1)
  ap.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.child:
    fsdp = int(args.fsdp) if args.fsdp.lstrip("-").isdigit() else -1
    child(args.child, args.steps, args.refresh_every, fsdp, args.batch, args.width,
          args.depth, args.res, args.sync_every)
    return
  import jax  # pylint: disable=g-import-not-at-top
  print(f"jax {jax.__version__}; {args.steps} steps, PCDR refresh every "
        f"{args.refresh_every}, timeout {args.timeout:.0f}s per run", flush=True)
  results = []
  for case in args.cases.split(","):
    for d in (int(x) for x in args.devices.split(",")):
      fsdps = sorted({d if f == "all" else int(f) for f in args.fsdp.split(",")})
      for fsdp in fsdps:
        if d % fsdp:
          continue
        for r in range(args.repeats):
          status, dt, msg = run_case(case, d, fsdp, args)
          results.append((case, d, fsdp, status))
          print(f"{case:13s} devices={d} fsdp={fsdp} run {r + 1}: {status:5s} "
                f"({dt:5.1f}s) {msg}", flush=True)
  hangs = [r for r in results if r[3] != "ok"]
  print(f"\n{len(results) - len(hangs)}/{len(results)} runs finished; "
        f"not ok: {hangs if hangs else 'none'}")


if __name__ == "__main__":
  main()
