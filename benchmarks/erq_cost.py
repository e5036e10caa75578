"""Cost of ERQ calibration: time per stage and per layer kind, memory of the statistics.

    python -m benchmarks.erq_cost [--variant Ti/16] [--res 224] [--calib 32]
        [--bits W4A4] [--scan] [--pool map]

On a big_vision ViT (random weights: the numbers are costs, not accuracies), with
everything measured in one run against one *float pass over the calibration set*
(a compiled forward over ``--calib`` images, compilation excluded, median of 3):

* ``ERQ/<bits>`` end to end, cold (compilation included) and warm (a second call:
  the per-layer error-reduction steps are already compiled, the calibration and
  moment passes are traced and compiled again), and its stages: activation
  calibration (RepQ-ViT's forward-order pass), the streamed-moments pass, the
  error reduction (Aqer + weight grid + Wqer for every layer);
* the streamed-moments pass alone, compiled (a float forward that forms every
  layer's ``ĀᵀĀ``, ``ĀᵀF`` with its activation quantizer applied);
* per layer kind (patch embedding, qkv = attention q/k/v fused, proj = attention
  out, fc1, fc2, the MAP head's layers, head): the warm time of one layer's
  Aqer + grid + Wqer (median over the layers of that kind), in seconds and as a
  multiple of the float pass, with the layer's shape;
* memory: the streamed statistics ``ĀᵀĀ`` and ``ĀᵀF`` per layer ``(d+1)² · 4 B``
  each, per kind and in total, next to what holding the layers' float inputs and
  outputs over the calibration set would take (the official code stores them).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from s2d_jax import ptq
from s2d_jax.models import vit
from s2d_jax.ptq import error_reduction as er

from benchmarks.ptq_cost import _median_time  # one timing helper for both



def layer_kind(path: str) -> str:
  """qkv / proj / fc1 / fc2 / head / embedding / map-* from a unit's first path."""
  name = path.rsplit("/", 1)[-1]
  prefix = "map-" if path.startswith("MAPHead") else ""
  if name in ("query", "key", "value"):
    return prefix + ("qkv" if name == "query" and not prefix else name)
  if name == "out":
    return prefix + "proj"
  if name == "Dense_0":
    return prefix + "fc1"
  if name == "Dense_1":
    return prefix + "fc2"
  return name


def _mb(n: float) -> str:
  return f"{n / 2**20:.1f} MB"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variant", default="Ti/16")
  p.add_argument("--res", type=int, default=224)
  p.add_argument("--calib", type=int, default=32)
  p.add_argument("--classes", type=int, default=1000)
  p.add_argument("--bits", default="W4A4")
  p.add_argument("--pool", default="map")
  p.add_argument("--scan", action="store_true")
  args = p.parse_args(argv)
  warnings.simplefilter("ignore")

  model = vit.Model(args.classes, variant=args.variant, pool_type=args.pool,
                    scan=args.scan, head_zeroinit=False)
  rng = np.random.RandomState(0)
  calib = jnp.asarray(rng.uniform(-1, 1, (args.calib, args.res, args.res, 3)),
                      jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), calib[:1])
  fwd = jax.jit(lambda v, x: model.apply(v, x)[0])
  jax.block_until_ready(fwd(variables, calib))
  float_pass = _median_time(fwd, variables, calib)
  dev = jax.devices()[0]
  name = f"ERQ/{args.bits}"
  print(f"ViT-{args.variant} {args.res}px, pool {args.pool}, "
        f"{'scan' if args.scan else 'loop'} layout, {args.calib} calibration images, "
        f"{dev.platform} ({dev.device_kind}); one float pass over the calibration set: "
        f"{float_pass:.3f}s")

  runs = {}
  for label in ("cold", "warm"):
    t0 = time.perf_counter()
    qapply, qvars = ptq.quantize(model.apply, variables, calib, name)
    jax.block_until_ready(qvars)
    runs[label] = (time.perf_counter() - t0, qapply.info)
  for label, (total, info) in runs.items():
    t = info["timing_s"]
    print(f"{name} {label}: {total:.1f}s = {total / float_pass:.0f}x float pass "
          f"(activation calibration {t['act_calibration']:.1f}s, reparameterisation "
          f"{t['reparameterize']:.1f}s, layer discovery + moments pass "
          f"{t['moments']:.1f}s, error reduction {t['error_reduction']:.1f}s = "
          f"{t['error_reduction'] / float_pass:.1f}x; all with compilation)")

  info = runs["warm"][1]
  # the moments pass alone (same shapes, so the same cost as inside ERQ)
  paths = sorted({u["layers"][0] for u in info["units"]})
  stream = er.MomentStream(model.apply, paths, act_provider=qapply.provider,
                           with_float=True)
  t0 = time.perf_counter()
  jax.block_until_ready(stream(qvars, calib, args.calib))
  first = time.perf_counter() - t0
  moments_pass = _median_time(lambda: stream(qvars, calib, args.calib))
  print(f"moments pass alone: {moments_pass:.3f}s = {moments_pass / float_pass:.2f}x "
        f"float pass (first call {first:.1f}s with compilation)")
  by_kind = collections.OrderedDict()
  for u in info["units"]:
    by_kind.setdefault(layer_kind(u["layers"][0]), []).append(u)
  print(f"\nper layer (warm; Aqer + weight grid + Wqer), float pass = {float_pass:.3f}s")
  print(f"{'kind':10s} {'layers':>6s} {'d x out':>12s} {'s/layer':>9s} {'x float':>8s}"
        f" {'stats/layer':>12s} {'acts/layer':>12s}")
  total_stats = total_acts = 0
  for kind, us in by_kind.items():
    u = us[0]
    sec = statistics.median(x["seconds"] for x in us)
    d, out = u["rows"], u["cols"]
    acts = u["tokens"] * (d + out) * 4   # float inputs + outputs, as stored officially
    total_stats += sum(x["moments_bytes"] for x in us)
    total_acts += acts * len(us)
    print(f"{kind:10s} {len(us):6d} {f'{d}x{out}':>12s} {sec:9.3f} "
          f"{sec / float_pass:8.2f} {_mb(u['moments_bytes']):>12s} {_mb(acts):>12s}")
  print(f"\nstreamed statistics, all layers: {_mb(total_stats)} "
        f"(reported by ERQ: {_mb(info['moments_bytes'])}); holding the float inputs "
        f"and outputs instead: {_mb(total_acts)}")
  return runs


if __name__ == "__main__":
  main()
