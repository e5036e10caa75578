"""Evaluation throughput: W4A4 fake quantization vs float, same model, one run.

    python benchmarks/quant_eval_overhead.py [--variant Ti/16] [--res 224]
        [--batch 32] [--reps 7] [--setting W4A4] [--scan]

Both steps are what ``s2d_jax.evaluate`` runs per batch, on one device:
``argmax(model(images))`` compared with labels, summed (the float step without
the optional outlier statistics). Steps are compiled first, then timed
interleaved (float, quant, float, quant, ...) so that load changes on a shared
machine hit both alike; the median of ``--reps`` timings is reported and the
ratio quant/float printed (target ≤ 1.5).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from s2d_jax import quant_model
from s2d_jax.models import vit


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variant", default="Ti/16")
  p.add_argument("--res", type=int, default=224)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--setting", default="W4A4")
  p.add_argument("--classes", type=int, default=1000)
  p.add_argument("--scan", action="store_true")
  args = p.parse_args(argv)

  model = vit.Model(args.classes, variant=args.variant, pool_type="map",
                    scan=args.scan, head_zeroinit=False)
  rng = np.random.RandomState(0)
  images = jnp.asarray(rng.uniform(-1, 1, (args.batch, args.res, args.res, 3)),
                       jnp.float32)
  labels = jnp.asarray(rng.randint(0, args.classes, args.batch), jnp.int32)
  variables = jax.jit(model.init)(jax.random.key(0), images[:1])

  def forward(v, x):
    return model.apply(v, x)[0]

  def step(apply):
    @jax.jit
    def f(v, x, y):
      return jnp.sum(jnp.argmax(apply(v, x), -1) == y)
    return f

  qforward = quant_model.quantized_apply(forward, args.setting)
  steps = {"float": step(forward), args.setting: step(qforward)}
  diff = jnp.abs(jax.jit(qforward)(variables, images) -
                 jax.jit(forward)(variables, images)).max()
  print(f"sanity: max |logit_{args.setting} - logit_float| = {float(diff):.3g} "
        "(> 0: quantization is active)")
  times = {k: [] for k in steps}
  for k, f in steps.items():  # compile
    t0 = time.perf_counter()
    f(variables, images, labels).block_until_ready()
    print(f"compiled {k} in {time.perf_counter() - t0:.1f}s")
  for _ in range(args.reps):
    for k, f in steps.items():
      t0 = time.perf_counter()
      f(variables, images, labels).block_until_ready()
      times[k].append(time.perf_counter() - t0)
  med = {k: statistics.median(v) for k, v in times.items()}
  dev = jax.devices()[0]
  print(f"ViT-{args.variant} {args.res}px, batch {args.batch}, {args.reps} "
        f"interleaved reps on {dev.platform} ({dev.device_kind})")
  for k, t in med.items():
    print(f"  {k:8s} {1e3 * t:9.1f} ms/batch  {args.batch / t:9.1f} img/s")
  ratio = med[args.setting] / med["float"]
  print(f"ratio {args.setting}/float time: {ratio:.3f} (target <= 1.5)")
  return ratio


if __name__ == "__main__":
  main()
