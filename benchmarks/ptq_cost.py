"""Cost of the paper's PTQ protocols: calibration and evaluation, per method, one run.

    python -m benchmarks.ptq_cost [--variant Ti/16] [--res 224] [--calib 32]
        [--batches 4,32] [--reps 5] [--methods RepQ-ViT,PTQ4ViT,ERQ] [--bits W4A4]

For every method in ``s2d_jax.ptq.METHODS`` that imports and calibrates (or those
named by ``--methods``), on a big_vision ViT with a MAP head (random weights, so the
numbers are costs, not accuracies):

* calibration: wall time of ``ptq.quantize`` (compilation included) as a multiple of
  one float pass over the calibration set (a compiled forward over ``--calib``
  images, compilation excluded, median of 3) and of that pass with its compilation
  (on small inputs compilation dominates both), also printed in seconds;
* evaluation: per batch size, the compiled step ``argmax(qapply(images))`` vs the
  float step, timed interleaved (float, method, float, ...), median of ``--reps``
  (target ≤ 1.5x: weights are quantized once, the step only quantizes activations).

A method that fails is reported with its error and skipped.
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from s2d_jax import ptq
from s2d_jax.models import vit


def _median_time(f, *args, reps=3):
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variant", default="Ti/16")
  p.add_argument("--res", type=int, default=224)
  p.add_argument("--calib", type=int, default=32)
  p.add_argument("--batches", default="4,32")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--classes", type=int, default=1000)
  p.add_argument("--methods", default=",".join(ptq.METHODS))
  p.add_argument("--bits", default="W4A4")
  p.add_argument("--scan", action="store_true")
  args = p.parse_args(argv)

  model = vit.Model(args.classes, variant=args.variant, pool_type="map",
                    scan=args.scan, head_zeroinit=False)
  rng = np.random.RandomState(0)
  calib = jnp.asarray(rng.uniform(-1, 1, (args.calib, args.res, args.res, 3)),
                      jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), calib[:1])
  batches = [int(b) for b in args.batches.split(",")]
  evals = {b: jnp.asarray(rng.uniform(-1, 1, (b, args.res, args.res, 3)), jnp.float32)
           for b in batches}
  fwd = jax.jit(lambda v, x: model.apply(v, x)[0])
  t0 = time.perf_counter()
  jax.block_until_ready(fwd(variables, calib))
  float_compile = time.perf_counter() - t0
  float_pass = _median_time(fwd, variables, calib)
  dev = jax.devices()[0]
  print(f"ViT-{args.variant} {args.res}px MAP head, {args.calib} calibration images, "
        f"{dev.platform} ({dev.device_kind}); one float pass over the calibration set: "
        f"{float_pass:.2f}s (+{float_compile:.1f}s compile)")

  def step(apply):
    return jax.jit(lambda v, x: jnp.argmax(apply(v, x)[0], -1))

  float_step = step(model.apply)
  results = {}
  for method in [m for m in args.methods.split(",") if m]:
    name = ptq.setting_name(method, args.bits)   # GPTQ: W<w>A16
    try:
      t0 = time.perf_counter()
      qapply, qvars = ptq.quantize(model.apply, variables, calib, name)
      jax.block_until_ready(qvars)
      calib_s = time.perf_counter() - t0
    except Exception as e:  # pylint: disable=broad-except
      print(f"{name}: failed: {type(e).__name__}: {e}")
      traceback.print_exc(limit=3)
      continue
    q_step = step(qapply)
    row = dict(calib_s=calib_s, calib_x_float_pass=calib_s / float_pass,
               calib_x_float_pass_with_compile=calib_s / (float_pass + float_compile))
    for b in batches:
      x = evals[b]
      jax.block_until_ready(float_step(variables, x))
      jax.block_until_ready(q_step(qvars, x))
      tf, tq = [], []
      for _ in range(args.reps):
        tf.append(_median_time(float_step, variables, x, reps=1))
        tq.append(_median_time(q_step, qvars, x, reps=1))
      row[f"eval_x_float_b{b}"] = statistics.median(tq) / statistics.median(tf)
    results[name] = row
    print(f"{name}: calibration {calib_s:.1f}s = {row['calib_x_float_pass']:.0f}x one "
          f"float pass ({row['calib_x_float_pass_with_compile']:.1f}x with its compile); "
          "evaluation vs float: " + ", ".join(
              f"batch {b} x{row[f'eval_x_float_b{b}']:.2f}" for b in batches))
  return results


if __name__ == "__main__":
  main()
