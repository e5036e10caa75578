"""Plots of an evaluation report (matplotlib `Figure`s, no pyplot: no display needed,
and importing this module leaves the caller's backend alone, e.g. inline in notebooks).

* ``activations.png``: per layer (x: layers in forward order) max |x| (log
  scale) and kurtosis of every recorded tensor kind (matmul inputs, block
  outputs).
* ``sigma_max.png``: σ_max of every kernel (log scale), in parameter order.
* ``accuracy_vs_bits.png``: top-1 of each quant setting against its activation
  bits (marker per weight bits), float as a horizontal line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from matplotlib.figure import Figure

_LAYER = re.compile(r"encoderblock_(\d+)")


def _order(name: str) -> tuple:
  """Forward order: stem, then blocks by index, then the rest by name."""
  m = _LAYER.search(name)
  if name.startswith("embedding"):
    return (0, 0, name)
  if m:
    return (1, int(m.group(1)), name)
  return (2, 0, name)


def plot_activations(layers: Mapping[str, Mapping[str, Any]], path: str) -> str:
  names = sorted(layers, key=_order)
  fig = Figure(figsize=(max(8, 0.12 * len(names)), 7))
  axes = fig.subplots(2, 1, sharex=True)
  for kind, marker in (("input", "o"), ("output", "s")):
    idx = [i for i, n in enumerate(names) if n.endswith("/" + kind)]
    if not idx:
      continue
    axes[0].plot(idx, [layers[names[i]]["max_abs"] for i in idx], marker,
                 ms=3, label=kind)
    axes[1].plot(idx, [layers[names[i]]["kurtosis"] for i in idx], marker,
                 ms=3, label=kind)
  axes[0].set_yscale("log")
  axes[0].set_ylabel("max |x|")
  axes[1].set_yscale("log")
  axes[1].set_ylabel("kurtosis")
  axes[1].set_xlabel("layer (forward order)")
  axes[0].legend()
  blocks = [i for i, n in enumerate(names) if _LAYER.search(n)]
  if blocks:
    ticks = {}
    for i in blocks:
      ticks.setdefault(int(_LAYER.search(names[i]).group(1)), i)
    axes[1].set_xticks(list(ticks.values()), [f"b{k}" for k in ticks],
                       fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def plot_sigma(weights: Mapping[str, Mapping[str, Any]], path: str) -> str:
  names = sorted(weights, key=_order)
  fig = Figure(figsize=(max(8, 0.12 * len(names)), 4))
  ax = fig.subplots()
  ax.bar(range(len(names)), [weights[n]["sigma_max"] for n in names])
  ax.set_yscale("log")
  ax.set_ylabel("σ_max")
  ax.set_xlabel("kernel (forward order)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def plot_accuracy(report: Mapping[str, Any], path: str) -> str:
  acc, settings = report["accuracy"], report["settings"]
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  markers = {}
  for name, a in acc.items():
    s = settings[name]
    if s.get("float"):
      ax.axhline(100 * a, color="k", ls="--", label="float")
      continue
    m = markers.setdefault(s["w_bits"], "osD^v<>p*h"[len(markers) % 10])
    ax.plot(s["a_bits"], 100 * a, m, label=f"W{s['w_bits']}")
    ax.annotate(name, (s["a_bits"], 100 * a), fontsize=7,
                textcoords="offset points", xytext=(3, 3))
  handles, labels = ax.get_legend_handles_labels()
  uniq = dict(zip(labels, handles))
  if uniq:
    ax.legend(uniq.values(), uniq.keys())
  ax.set_xlabel("activation bits")
  ax.set_ylabel("top-1 (%)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def save_all(report: Mapping[str, Any], outdir: str) -> list[str]:
  """Writes every plot the report has data for; returns the paths."""
  os.makedirs(outdir, exist_ok=True)
  out = [plot_accuracy(report, os.path.join(outdir, "accuracy_vs_bits.png"))]
  if report.get("layers"):
    out.append(plot_activations(report["layers"],
                                os.path.join(outdir, "activations.png")))
  if report.get("weights"):
    out.append(plot_sigma(report["weights"], os.path.join(outdir, "sigma_max.png")))
  return out


def _per_layer_lines(series: Mapping[str, Mapping[str, float]], *, title: str,
                     xlabel: str, path: str, log: bool) -> str:
  """One line per run over its entries in stored order (`{run: {name: value}}`)."""
  fig = Figure(figsize=(8, 3.5))
  ax = fig.subplots()
  for run, values in series.items():
    ax.plot(range(len(values)), list(values.values()), "o-", label=run, ms=3)
  if log:
    ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


def save_comparison(reports: Mapping[str, Mapping[str, Any]],
                    accuracy: Mapping[str, Mapping[str, float]],
                    settings: tuple[str, ...], outdir: str) -> list[str]:
  """Side-by-side plots of several runs' reports (e.g. AdamW vs AdamW+S2D).

  `accuracy[run][setting]` is a top-1 fraction. Writes `accuracy.png` (grouped
  bars per setting), `max_act.png`, `kurtosis.png` (per layer) and `sigma_max.png`
  (per kernel); returns the paths.
  """
  os.makedirs(outdir, exist_ok=True)
  fig = Figure(figsize=(6, 3.5))
  ax = fig.subplots()
  width = 0.8 / max(len(accuracy), 1)
  xs = list(range(len(settings)))
  for i, (run, acc) in enumerate(accuracy.items()):
    ax.bar([x + i * width for x in xs],
           [100 * acc.get(s, float("nan")) for s in settings], width, label=run)
  ax.set_xticks([x + width * (len(accuracy) - 1) / 2 for x in xs], settings)
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_title("PTQ accuracy after fine-tuning")
  ax.legend()
  fig.tight_layout()
  paths = [os.path.join(outdir, "accuracy.png")]
  fig.savefig(paths[0], dpi=120)
  for key, title, fname in (("max_abs", "max |activation| per layer", "max_act.png"),
                            ("kurtosis", "activation kurtosis per layer",
                             "kurtosis.png")):
    series = {run: {n: v[key] for n, v in rep.get("layers", {}).items()}
              for run, rep in reports.items()}
    paths.append(_per_layer_lines(series, title=title, xlabel="layer (module order)",
                                  path=os.path.join(outdir, fname), log=True))
  series = {run: {n: v["sigma_max"] for n, v in rep.get("weights", {}).items()}
            for run, rep in reports.items()}
  paths.append(_per_layer_lines(series, title="σ_max per kernel",
                                xlabel="kernel (module order)",
                                path=os.path.join(outdir, "sigma_max.png"), log=False))
  return paths
