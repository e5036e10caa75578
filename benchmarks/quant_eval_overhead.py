"""Evaluation throughput: fake quantization vs float, same model, one run.

    python benchmarks/quant_eval_overhead.py [--variant Ti/16] [--res 224]
        [--batches 4,32] [--reps 7] [--setting W4A4] [--scan]

Per batch size, three steps, each what ``s2d_jax.evaluate`` runs per batch on one
device (``argmax(model(images))`` compared with labels, summed):

* ``float``;
* ``prequantized``: weights quantized once (``quant_model.prequantize``), the step
  only quantizes activations (``quantized_apply(..., prequantized=True)``): the
  evaluation path;
* ``in-pass``: weights re-quantized inside every step (``quantized_apply``; what
  QAT needs for its STE gradients), for comparison.

Steps are compiled first, then timed interleaved (float, prequantized, in-pass,
float, ...) so that load changes on a shared machine hit all alike; the median of
``--reps`` timings is reported with the ratios to float (target for the evaluation
path: ≤ 1.5 at every batch size). Static settings (``-static``) are calibrated on
the benchmark batch first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from s2d_jax import quant as q
from s2d_jax import quant_model
from s2d_jax.models import vit


def run(variant="Ti/16", res=224, batch=32, reps=7, setting="W4A4", classes=1000,
        scan=False, verbose=True):
  """Median step times (s) for float / prequantized / in-pass at one batch size."""
  model = vit.Model(classes, variant=variant, pool_type="map", scan=scan,
                    head_zeroinit=False)
  rng = np.random.RandomState(0)
  images = jnp.asarray(rng.uniform(-1, 1, (batch, res, res, 3)), jnp.float32)
  labels = jnp.asarray(rng.randint(0, classes, batch), jnp.int32)
  variables = jax.jit(model.init)(jax.random.key(0), images[:1])
  s = q.get_setting(setting)

  def forward(v, x):
    return model.apply(v, x)[0]

  calib = (quant_model.calibrate(forward, s, variables, [(images,)])
           if s.needs_calibration else None)
  pre_vars = quant_model.prequantize(forward, s, variables, images[:1])
  pre = quant_model.quantized_apply(forward, s, calibration=calib, prequantized=True)
  inpass = quant_model.quantized_apply(forward, s, calibration=calib)

  def step(apply):
    @jax.jit
    def f(v, x, y):
      return jnp.sum(jnp.argmax(apply(v, x), -1) == y)
    return f

  steps = {"float": (step(forward), variables),
           "prequantized": (step(pre), pre_vars),
           "in-pass": (step(inpass), variables)}
  diff = jnp.abs(jax.jit(pre)(pre_vars, images) - jax.jit(inpass)(variables, images))
  if verbose:
    print(f"sanity: max |logit_prequantized - logit_in-pass| = {float(diff.max()):.3g} "
          "(identical paths: ~0)")
  times = {k: [] for k in steps}
  for k, (f, v) in steps.items():  # compile
    t0 = time.perf_counter()
    f(v, images, labels).block_until_ready()
    if verbose:
      print(f"compiled {k} in {time.perf_counter() - t0:.1f}s")
  for _ in range(reps):
    for k, (f, v) in steps.items():
      t0 = time.perf_counter()
      f(v, images, labels).block_until_ready()
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variant", default="Ti/16")
  p.add_argument("--res", type=int, default=224)
  p.add_argument("--batches", default="4,32", help="comma-separated batch sizes")
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--setting", default="W4A4")
  p.add_argument("--classes", type=int, default=1000)
  p.add_argument("--scan", action="store_true")
  args = p.parse_args(argv)
  dev = jax.devices()[0]
  ratios = {}
  for b in [int(v) for v in args.batches.split(",")]:
    med = run(args.variant, args.res, b, args.reps, args.setting, args.classes,
              args.scan)
    print(f"ViT-{args.variant} {args.res}px, batch {b}, {args.reps} interleaved "
          f"reps on {dev.platform} ({dev.device_kind}), {args.setting}")
    for k, t in med.items():
      print(f"  {k:13s} {1e3 * t:9.1f} ms/batch  {b / t:9.1f} img/s  "
            f"x{t / med['float']:.2f}")
    ratios[b] = med["prequantized"] / med["float"]
    print(f"ratio prequantized/float: {ratios[b]:.3f} (target <= 1.5); "
          f"in-pass/float: {med['in-pass'] / med['float']:.3f}")
  return ratios


if __name__ == "__main__":
  main()
