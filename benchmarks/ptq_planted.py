"""Every PTQ protocol on the planted-outlier test model: agreement with the float model.

    python -m benchmarks.ptq_planted [--settings W4A4-static,RepQ-ViT/W4A4,...]

The model is the PTQ tests' tiny ViT (tests/ptq_fixtures.py: 32 px, width 32, depth 2,
MAP head, uneven LayerNorm scales) with one massive post-LayerNorm channel planted in
every block by an exact function-preserving rescaling (float outputs unchanged). Each
setting is calibrated on 32 images and scored on 256 held-out images by

* top-1 agreement with the float model (chance: 0.1), and
* the relative logit error ``‖ŷ − y‖ / ‖y‖``,

with the same numbers for the model *without* the planted outlier next to it, so the
table shows what the outlier costs each method. Random weights: these are not
accuracies, they show the mechanism (min-max static ranges are wasted on the outlier
channel; RepQ-ViT's reparameterisation and ERQ's error reduction recover it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tests"))
import ptq_fixtures as F  # pylint: disable=g-import-not-at-top,wrong-import-position

from s2d_jax import ptq  # pylint: disable=g-import-not-at-top,wrong-import-position
from s2d_jax import quant_model as qm  # pylint: disable=wrong-import-position

DEFAULT = ("W8A8-static,W4A4-static,W4A4,RepQ-ViT/W4A4,RepQ-ViT/W6A6,PTQ4ViT/W4A4,"
           "PTQ4ViT/W6A6,ERQ/W4A4,GPTQ/W4A16")


def quantized_logits(model, params, setting, calib, x):
  variables = {"params": params}
  if ptq.is_ptq_name(setting):
    return F.logits(*ptq.quantize(model.apply, variables, calib, setting), x)
  cal = None
  if "static" in setting:
    cal = qm.calibrate(model.apply, setting, variables, [(calib,)])
  return F.logits(qm.quantized_apply(model.apply, setting, calibration=cal),
                  variables, x)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--settings", default=DEFAULT)
  p.add_argument("--magnitude", type=float, default=100.0,
                 help="planted channel scale (tests/ptq_fixtures.planted_outlier)")
  args = p.parse_args(argv)
  model, clean = F.vit_model("map", scan=False)
  planted = F.planted_outlier(clean, magnitude=args.magnitude)
  calib, x = F.images(32, seed=1), F.images(256, seed=2)
  print(f"{'setting':16s} {'agree clean':>11s} {'agree planted':>13s} "
        f"{'rel.err clean':>13s} {'rel.err planted':>15s} {'seconds':>8s}")
  for setting in args.settings.split(","):
    row = []
    t0 = time.perf_counter()
    for params in (clean, planted):
      y = F.logits(model.apply, {"params": params}, x)
      yq = quantized_logits(model, params, setting, calib, x)
      row.append((F.agreement(yq, y), float(np.linalg.norm(yq - y) / np.linalg.norm(y))))
    print(f"{setting:16s} {row[0][0]:11.3f} {row[1][0]:13.3f} {row[0][1]:13.3f} "
          f"{row[1][1]:15.3f} {time.perf_counter() - t0:8.1f}", flush=True)


if __name__ == "__main__":
  main()
