"""Plots of an evaluation report and of the main job's results (matplotlib `Figure`s,
no pyplot: no display needed, and importing this module leaves the caller's backend
alone, e.g. inline in notebooks).

One evaluation (`save_all`, from `report.write_report`):

* ``activations.png``: per layer (x: layers in forward order) max |x| (log
  scale) and kurtosis of every recorded tensor kind (matmul inputs, block
  outputs).
* ``sigma_max.png``: σ_max of every kernel (log scale), in parameter order.
* ``accuracy_vs_bits.png``: top-1 of each quant setting against its activation
  bits (marker per weight bits), float as a horizontal line.

The main job (`save_results`, from `s2d_jax.main`; input: its results.json dict,
`comparison.aggregate`, and each run's per-seed metrics.jsonl):

* ``accuracy_drop.png``: per setting the top-1 change vs float, computed per seed
  (Δ_s = 100 · (acc_setting,s − acc_float,s), points), then mean ± sample std
  (ddof = 1) over seeds, the runs side by side, zero line drawn.
* ``layers.png``: per layer (named) max|act| and max/median of the start model and
  each run (seed means ± std).
* ``kernels.png``: per kernel (named) σ_max and PCDR₁, start model and each run.
* ``sigma_over_steps.png``: σ_max of the kernels tracked during fine-tuning
  (`sigma_max/<kernel>` in metrics.jsonl) against the step, one colour per kernel,
  one line style per run, mean ± std band over seeds.

Each plot is drawn from a pure function that returns the plotted numbers
(`drop_series`, `select_names` / `stat_series`, `sigma_steps_series`); missing data
(a setting absent in a run, no metrics.jsonl, non-finite values, one seed) is
skipped and named in the figure's title, never a crash.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import ticker
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
  """Side-by-side plots of several runs' reports (e.g. AdamW vs AdamW+S2D), for
  `report.write_results`; the main job's plots are `save_results`.

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


# ----------------------------------------------------------------------------------
# The main job's plots (its results.json, `comparison.aggregate`, and metrics.jsonl)
# ----------------------------------------------------------------------------------

FLOAT = "float"
# Per run, in results order (the main job: AdamW dashed, AdamW+S2D solid).
RUN_STYLES = ("--", "-", ":", "-.")
RUN_MARKERS = ("o", "s", "D", "^")
RUN_COLORS = ("C0", "C1", "C2", "C4")
START = "start"
SIGMA_PREFIX = "sigma_max/"
MAX_NAMES = 48    # more layers / kernels than this: only the ones that matter are shown
_DPI = 120

_BLOCK = re.compile(r"encoderblock(?:_(\d+))?")
_SHORT = {"MlpBlock_0": "mlp", "MultiHeadDotProductAttention_0": "attn",
          "Dense_0": "fc1", "Dense_1": "fc2", "query": "q", "key": "k", "value": "v",
          "MAPHead_0": "map", "embedding": "embed", "encoder_norm": "norm",
          "LayerNorm_0": "ln1", "LayerNorm_1": "ln2", "LayerNorm_2": "ln3"}
_DROPPED = {"params", "Transformer", "kernel"}
_SUFFIX = {"input": " in", "output": " out"}
# Order of the parts of a block (and of the MAP head) in the forward pass.
_SUB_ORDER = ("LayerNorm_0", "query", "key", "value", "out", "LayerNorm_1",
              "Dense_0", "Dense_1", "output")


def layer_label(name: str) -> str:
  """A readable short name of a layer / kernel / tracked-kernel path.

  'Transformer/encoderblock_3/MlpBlock_0/Dense_1/input' -> 'b3/mlp/fc2 in',
  'MAPHead_0/MultiHeadDotProductAttention_0/query' -> 'map/attn/q',
  'Transformer/encoderblock/MlpBlock_0/Dense_0/kernel' (scanned blocks, σ_max over
  blocks) -> 'b*/mlp/fc1'; unknown parts are kept as they are.
  """
  parts = [p for p in name.split("/") if p and p not in _DROPPED]
  suffix = ""
  if len(parts) > 1 and parts[-1] in _SUFFIX:
    suffix = _SUFFIX[parts.pop()]
  out = []
  for p in parts:
    m = _BLOCK.fullmatch(p)
    out.append((f"b{m.group(1)}" if m.group(1) else "b*") if m else _SHORT.get(p, p))
  return "/".join(out) + suffix if out else name


def forward_order(name: str) -> tuple:
  """Sort key: embedding, blocks by index (q, k, v, out, fc1, fc2, output), the
  encoder norm and the rest, MAP head, classifier head; then by name."""
  comps = [c for c in name.split("/") if c != "params"]
  block = next((_BLOCK.fullmatch(c) for c in comps if _BLOCK.fullmatch(c)), None)
  if "embedding" in comps:
    stage, idx = 0, 0
  elif block:
    stage, idx = 1, int(block.group(1) or 0)
  elif any(c.startswith("MAPHead") for c in comps):
    stage, idx = 3, 0
  elif comps and comps[0] == "head":
    stage, idx = 4, 0
  else:
    stage, idx = 2, 0
  sub = next((_SUB_ORDER.index(c) for c in comps if c in _SUB_ORDER), len(_SUB_ORDER))
  return stage, idx, sub, name


def _check_results(results: Mapping[str, Any]) -> None:
  if not isinstance(results, Mapping) or not results.get("runs") or not results.get(
      "settings"):
    got = sorted(results) if isinstance(results, Mapping) else type(results).__name__
    raise ValueError("results: need non-empty 'runs' and 'settings' (the main job's "
                     f"results.json / comparison.aggregate); got {got}")


def _n_seeds(results: Mapping[str, Any]) -> int:
  if results.get("seeds"):
    return len(results["seeds"])
  return max((len((a or {}).get("per_seed") or ()) for r in results["runs"].values()
              for a in (r.get("accuracy") or {}).values()), default=0)


def _seeds_title(n: int, what: str = "mean ± sample std over") -> str:
  return f"{what} {n} seeds" if n > 1 else "1 seed, no error bars"


def _notes_line(notes: Sequence[str], limit: int = 4) -> str:
  if not notes:
    return ""
  shown = list(notes[:limit]) + ([f"… {len(notes) - limit} more"]
                                 if len(notes) > limit else [])
  return "\nskipped: " + "; ".join(shown)


@dataclasses.dataclass(frozen=True)
class DropSeries:
  """Top-1 change vs float, per run and setting (x: `settings`, table order).

  For seed s: Δ_s = 100 · (acc_setting,s − acc_float,s) (points; negative = the
  quantized model is worse); `mean` = mean_s Δ_s, `std` = sample std (ddof = 1) of
  Δ_s, NaN with one seed. A point is NaN where the run lacks the setting (or float)
  or a per-seed value is non-finite; `notes` names each such point.
  """
  settings: tuple[str, ...]
  mean: dict[str, np.ndarray]    # run -> (len(settings),)
  std: dict[str, np.ndarray]
  n: dict[str, np.ndarray]       # run -> seeds behind each point (0 = skipped)
  n_seeds: int
  notes: tuple[str, ...]


def _per_seed(entry) -> np.ndarray | None:
  if not isinstance(entry, Mapping) or entry.get("per_seed") is None:
    return None
  return np.asarray(entry["per_seed"], np.float64).reshape(-1)


def drop_series(results: Mapping[str, Any],
                settings: Sequence[str] | None = None) -> DropSeries:
  """The data of ``accuracy_drop.png`` (see `DropSeries`) from the main job's results
  (`runs[run]['accuracy'][setting]['per_seed']`: top-1 fractions, seeds aligned).

  `settings`: a subset / order of `results['settings']` (default: all but float).
  Raises ValueError on empty results, a results without float, unknown settings.
  """
  _check_results(results)
  known = list(results["settings"])
  if FLOAT not in known:
    raise ValueError(f"results['settings'] = {known} has no {FLOAT!r}: the change vs "
                     "float is undefined")
  if settings is None:
    settings = [s for s in known if s != FLOAT]
  else:
    bad = [s for s in settings if s not in known]
    if bad:
      raise ValueError(f"unknown setting(s) {bad}; results has {known}")
    settings = [s for s in settings if s != FLOAT]
  if not settings:
    raise ValueError(f"no quantized setting to plot: settings {known}")
  means, stds, ns, notes = {}, {}, {}, []
  for run, r in results["runs"].items():
    acc = (r or {}).get("accuracy") or {}
    ref = _per_seed(acc.get(FLOAT))
    mean, std = np.full(len(settings), np.nan), np.full(len(settings), np.nan)
    n = np.zeros(len(settings), np.int64)
    if ref is None or not ref.size:
      notes.append(f"{run} (no float top-1)")
    for i, s in enumerate(settings if ref is not None and ref.size else ()):
      a = _per_seed(acc.get(s))
      if a is None or not a.size:
        notes.append(f"{run} {s} (missing)")
        continue
      if a.shape != ref.shape:
        notes.append(f"{run} {s} ({a.size} seeds vs {ref.size} for float)")
        continue
      d = 100.0 * (a - ref)
      if not np.all(np.isfinite(d)):
        notes.append(f"{run} {s} (non-finite)")
        continue
      mean[i], n[i] = d.mean(), d.size
      std[i] = d.std(ddof=1) if d.size > 1 else np.nan
    means[run], stds[run], ns[run] = mean, std, n
  return DropSeries(tuple(settings), means, stds, ns, _n_seeds(results), tuple(notes))


def _offsets(k: int, width: float = 0.5) -> list[float]:
  """x offsets of k side-by-side markers within one category."""
  return [0.0] if k == 1 else [width * (i / (k - 1) - 0.5) for i in range(k)]


def _float_note(results: Mapping[str, Any], run: str) -> str:
  """' (float 92.22 ± 0.39 %)': the run's float top-1, mean ± std over seeds."""
  f = _per_seed(((results["runs"][run] or {}).get("accuracy") or {}).get(FLOAT))
  if f is None or not f.size or not np.all(np.isfinite(f)):
    return ""
  sd = f" ± {100 * f.std(ddof=1):.2f}" if f.size > 1 else ""
  return f" (float {100 * f.mean():.2f}{sd} %)"


def fig_accuracy_drop(results: Mapping[str, Any]) -> Figure:
  """``accuracy_drop.png``: `drop_series` per setting, runs side by side, error bars
  = sample std over seeds (none with one seed), zero line."""
  d = drop_series(results)
  x = np.arange(len(d.settings))
  fig = Figure(figsize=(max(6.5, 0.9 * len(x) + 2), 4.2))
  ax = fig.subplots()
  ax.axhline(0.0, color="k", lw=0.8)
  for j, (run, off) in enumerate(zip(d.mean, _offsets(len(d.mean), 0.36))):
    ok = np.isfinite(d.mean[run])
    err = d.std[run][ok] if np.all(d.n[run][ok] > 1) and ok.any() else None
    ax.errorbar(x[ok] + off, d.mean[run][ok], yerr=err, fmt=RUN_MARKERS[j % 4],
                color=RUN_COLORS[j % 4], ms=6, capsize=3, lw=1.2,
                label=run + _float_note(results, run))
  ax.set_xticks(x, d.settings, rotation=30, ha="right", rotation_mode="anchor")
  ax.set_xlim(-0.6, len(x) - 0.4)
  ax.set_ylabel("Δ top-1 vs float (points; < 0: worse)")
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title("Top-1 change vs float per setting\n(setting − float per seed; "
               f"{_seeds_title(d.n_seeds)})" + _notes_line(d.notes), fontsize=9)
  fig.tight_layout()
  return fig


def select_names(results: Mapping[str, Any], table: str, stat: str,
                 max_n: int = MAX_NAMES) -> tuple[list[str], str]:
  """(names in forward order, title note) of `results[table]` ('layers' / 'kernels').

  All of them if ≤ max_n; else (layers) only the matmul inputs (block outputs
  dropped) and, if still too many, the max_n with the largest `stat` over the start
  model and the runs' seed means.
  """
  if table not in ("layers", "kernels"):
    raise ValueError(f"table {table!r} not in ('layers', 'kernels')")
  names = sorted(results.get(table) or {}, key=forward_order)
  total, kept = len(names), []
  if total <= max_n:
    return names, ""
  if table == "layers":
    names = [n for n in names if not n.endswith("/output")]
    kept.append("matmul inputs")
  if len(names) > max_n:
    series = stat_series(results, table, stat, names)
    score = np.nanmax(np.stack([np.where(np.isfinite(m), m, -np.inf)
                                for m in series.mean.values()]), axis=0)
    top = set(np.argsort(-score, kind="stable")[:max_n].tolist())
    names = [n for i, n in enumerate(names) if i in top]
    kept.append(f"the {max_n} largest by {stat}")
  return names, f"showing {len(names)} of {total}: {', '.join(kept)}"


@dataclasses.dataclass(frozen=True)
class StatSeries:
  """One statistic per layer / kernel for the start model and each run.

  `mean[who]`: the start model's value, or the run's mean over seeds; `std[who]`:
  the run's sample std over seeds (NaN for the start model and with one seed). NaN
  where there is no finite value; `notes` counts those.
  """
  names: tuple[str, ...]
  labels: tuple[str, ...]
  mean: dict[str, np.ndarray]
  std: dict[str, np.ndarray]
  notes: tuple[str, ...]


def stat_series(results: Mapping[str, Any], table: str, stat: str,
                names: Sequence[str] | None = None) -> StatSeries:
  """`stat` of `results[table][name]` for 'start' and each run, over `names`
  (default: all, forward order)."""
  _check_results(results)
  rows = results.get(table) or {}
  names = list(sorted(rows, key=forward_order) if names is None else names)
  whos = [START] + list(results["runs"])
  mean = {w: np.full(len(names), np.nan) for w in whos}
  std = {w: np.full(len(names), np.nan) for w in whos}
  for i, name in enumerate(names):
    row = rows.get(name) or {}
    for w in whos:
      v = (row.get(w) or {}).get(stat)
      if isinstance(v, Mapping):
        vals = np.asarray(v.get("per_seed") or [v.get("mean")], np.float64)
        if v.get("mean") is not None:
          mean[w][i] = float(v["mean"])
        if vals.size > 1 and np.all(np.isfinite(vals)) and v.get("std") is not None:
          std[w][i] = float(v["std"])
      elif v is not None:
        mean[w][i] = float(v)
  notes = []
  for w in whos:
    bad = ~np.isfinite(mean[w])
    mean[w][bad], std[w][bad] = np.nan, np.nan
    if bad.any() and names:
      notes.append(f"{w}: no finite {stat} for {int(bad.sum())} of {len(names)}")
  return StatSeries(tuple(names), tuple(layer_label(n) for n in names), mean, std,
                    tuple(notes))


def _group_separators(ax, labels: Sequence[str]) -> None:
  """Faint vertical lines between blocks (label prefix before the first '/' or ' ')."""
  heads = [re.split(r"[/ ]", l, maxsplit=1)[0] for l in labels]
  for i in range(1, len(heads)):
    if heads[i] != heads[i - 1]:
      ax.axvline(i - 0.5, color="0.85", lw=0.8, zorder=0)


class _PlainLog(ticker.LogFormatter):
  """Log-axis labels where matplotlib would put them, as plain numbers ('0.4')."""

  def __call__(self, x, pos=None):
    return f"{x:g}" if super().__call__(x, pos) else ""


def _stat_panel(ax, s: StatSeries, *, ylabel: str, log: bool) -> None:
  """Start model (black x) and each run (seed mean ± std) per name, side by side."""
  x = np.arange(len(s.names))
  for j, (w, off) in enumerate(zip(s.mean, _offsets(len(s.mean), 0.45))):
    m = s.mean[w]
    ok = np.isfinite(m) & ((m > 0) if log else True)
    if w == START:
      ax.plot(x[ok] + off, m[ok], "x", color="k", ms=6, mew=1.5, label="start model")
      continue
    e = s.std[w][ok]
    err = np.where(np.isfinite(e), e, 0.0) if np.isfinite(e).any() else None
    ax.errorbar(x[ok] + off, m[ok], yerr=err, fmt=RUN_MARKERS[(j - 1) % 4],
                color=RUN_COLORS[(j - 1) % 4], ms=4.5, capsize=2, lw=1, label=w)
  if log:
    ax.set_yscale("log")
    # plain numbers ('6', '0.4') instead of '6×10⁰' on short log ranges
    ax.yaxis.set_major_formatter(_PlainLog())
    ax.yaxis.set_minor_formatter(_PlainLog(labelOnlyBase=False,
                                           minor_thresholds=(2, 0.4)))
  ax.set_ylabel(ylabel)
  ax.grid(axis="y", alpha=0.3)
  _group_separators(ax, s.labels)
  ax.set_xlim(-0.7, max(len(x), 1) - 0.3)


def _empty(ax, msg: str) -> None:
  ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes)
  ax.set_xticks([])
  ax.set_yticks([])


def _names_axis(ax, labels: Sequence[str]) -> None:
  ax.set_xticks(np.arange(len(labels)), labels, rotation=60, ha="right",
                rotation_mode="anchor", fontsize=7)


def fig_layers(results: Mapping[str, Any], max_n: int = MAX_NAMES) -> Figure:
  """``layers.png``: per layer max|act| (log) and max/median (log, 100× line) of the
  start model and each run (seed mean ± sample std), layer names on the x axis."""
  names, sel = select_names(results, "layers", "max_median", max_n)
  a = stat_series(results, "layers", "max_abs", names)
  r = stat_series(results, "layers", "max_median", names)
  n = _n_seeds(results)
  fig = Figure(figsize=(max(8.0, 0.26 * len(names) + 2), 7.0))
  top, bot = fig.subplots(2, 1, sharex=True)
  title = ("Per-layer activations on the test split: start model vs fine-tuned "
           f"(runs: {_seeds_title(n, 'seed mean ± std over')})")
  if sel:
    title += f"\n{sel}"
  if not names:
    _empty(top, "no per-layer statistics in results")
  else:
    _stat_panel(top, a, ylabel="max |act|", log=True)
    _stat_panel(bot, r, ylabel="max / median |act|", log=True)
    bot.axhline(100, color="0.4", ls=":", lw=1)
    bot.text(1.0, 100, " 100×", color="0.4", fontsize=7, va="center",
             transform=bot.get_yaxis_transform())
    _names_axis(bot, a.labels)
    top.legend(fontsize=8, ncol=len(a.mean))
  top.set_title(title + _notes_line(a.notes + r.notes), fontsize=9)
  fig.tight_layout()
  return fig


def fig_kernels(results: Mapping[str, Any], max_n: int = MAX_NAMES) -> Figure:
  """``kernels.png``: per kernel σ_max and PCDR₁ of the start model and each run
  (seed mean ± sample std), kernel names on the x axis."""
  names, sel = select_names(results, "kernels", "sigma_max", max_n)
  sig = stat_series(results, "kernels", "sigma_max", names)
  pc = stat_series(results, "kernels", "pcdr1", names)
  n = _n_seeds(results)
  fig = Figure(figsize=(max(8.0, 0.26 * len(names) + 2), 6.5))
  top, bot = fig.subplots(2, 1, sharex=True)
  title = ("Per-kernel σ_max and PCDR₁: start model vs fine-tuned "
           f"(runs: {_seeds_title(n, 'seed mean ± std over')})")
  if sel:
    title += f"\n{sel}"
  if not names:
    _empty(top, "no per-kernel statistics in results")
  else:
    _stat_panel(top, sig, ylabel="σ_max", log=False)
    _stat_panel(bot, pc, ylabel="PCDR₁", log=False)
    bot.set_ylim(-0.03, 1.03)
    _names_axis(bot, sig.labels)
    top.legend(fontsize=8, ncol=len(sig.mean))
  top.set_title(title + _notes_line(sig.notes + pc.notes), fontsize=9)
  fig.tight_layout()
  return fig


def read_sigma_log(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{kernel: (steps, σ_max)} from a metrics.jsonl (records `{'step': s,
  'sigma_max/<kernel>': σ, ...}`, `train.sigma_max_fn`), sorted by step; the last
  record of a step wins; unparsable lines (a write torn by a kill) are skipped."""
  per = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        rec = json.loads(line)
        step = int(rec["step"])
      except (ValueError, KeyError, TypeError):
        continue
      for k, v in rec.items():
        if k.startswith(SIGMA_PREFIX) and isinstance(v, (int, float)):
          per.setdefault(k[len(SIGMA_PREFIX):], {})[step] = float(v)
  out = {}
  for k, d in per.items():
    steps = np.asarray(sorted(d), np.int64)
    out[k] = (steps, np.asarray([d[s] for s in steps.tolist()], np.float64))
  return out


@dataclasses.dataclass(frozen=True)
class Curve:
  """σ_max of one kernel in one run: per-seed curves and, at the steps every seed
  logged, the mean and sample std over seeds (NaN with one seed)."""
  steps: np.ndarray
  mean: np.ndarray
  std: np.ndarray
  per_seed: dict[Any, tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class SigmaSteps:
  kernels: tuple[str, ...]                 # forward order, union over runs
  runs: dict[str, dict[str, Curve]]        # run -> kernel -> Curve
  n_seeds: dict[str, int]                  # run -> seeds with a σ_max log
  notes: tuple[str, ...]


def sigma_steps_series(metrics: Mapping[str, Mapping[Any, str]] | None) -> SigmaSteps:
  """The data of ``sigma_over_steps.png`` from `{run: {seed: metrics.jsonl path}}`.

  A missing file or one without σ_max records is skipped and noted; mean / std are
  taken over the seeds at the steps all of them logged.
  """
  if metrics is not None and not isinstance(metrics, Mapping):
    raise ValueError("metrics: need {run: {seed: metrics.jsonl path}}, got "
                     f"{type(metrics).__name__}")
  runs, nseeds, notes, kernels = {}, {}, [], set()
  for run, seeds in (metrics or {}).items():
    if not isinstance(seeds, Mapping):
      raise ValueError(f"metrics[{run!r}]: need {{seed: metrics.jsonl path}}, got "
                       f"{type(seeds).__name__}")
    logs = {}
    for seed, path in seeds.items():
      if not path or not os.path.exists(path):
        notes.append(f"{run} seed {seed} (no metrics.jsonl)")
        continue
      log = read_sigma_log(path)
      if not log:
        notes.append(f"{run} seed {seed} (no σ_max logged)")
        continue
      logs[seed] = log
    curves = {}
    for k in sorted({k for log in logs.values() for k in log}):
      per = {s: log[k] for s, log in logs.items() if k in log}
      common = sorted(set.intersection(*(set(st.tolist()) for st, _ in per.values())))
      vals = np.stack([v[np.searchsorted(st, common)] for st, v in per.values()]) \
          if common else np.zeros((len(per), 0))
      mean = vals.mean(axis=0) if common else np.zeros(0)
      std = (vals.std(axis=0, ddof=1) if len(per) > 1 and common
             else np.full(len(common), np.nan))
      if not np.all(np.isfinite(vals)):
        notes.append(f"{run} {layer_label(k)} (non-finite σ_max at "
                     f"{int((~np.isfinite(vals)).any(axis=0).sum())} step(s))")
      curves[k] = Curve(np.asarray(common, np.int64), mean, std, per)
    kernels.update(curves)
    runs[run], nseeds[run] = curves, len(logs)
  return SigmaSteps(tuple(sorted(kernels, key=forward_order)), runs, nseeds,
                    tuple(notes))


def start_sigma(results: Mapping[str, Any] | None, kernel: str) -> float | None:
  """The start model's σ_max of a tracked kernel (`results['kernels']`), None if
  unknown. A scanned path ('.../encoderblock/...') is the max over its blocks
  ('.../encoderblock_<i>/...'), as `train.sigma_max_fn` logs it."""
  rows = (results or {}).get("kernels") or {}
  name = kernel[:-len("/kernel")] if kernel.endswith("/kernel") else kernel
  pat = re.compile(re.escape(name).replace("encoderblock/", r"encoderblock_\d+/")
                   + r"\Z") if "encoderblock/" in name else None
  vals = [((v or {}).get(START) or {}).get("sigma_max") for k, v in rows.items()
          if k == name or (pat is not None and pat.match(k))]
  vals = [float(v) for v in vals if isinstance(v, (int, float)) and np.isfinite(v)]
  return max(vals) if vals else None


def fig_sigma_over_steps(metrics: Mapping[str, Mapping[Any, str]] | None,
                         results: Mapping[str, Any] | None = None) -> Figure:
  """``sigma_over_steps.png``: σ_max of each tracked kernel against the fine-tuning
  step; one colour per kernel, one line style per run (first dashed, second solid),
  mean over seeds with a ± sample std band; the start model's value (`start_sigma`,
  from `results`) as a black-edged dot at step 0."""
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  d = sigma_steps_series(metrics)
  fig = Figure(figsize=(9.5, 4.5))
  ax = fig.subplots()
  colors = {k: f"C{i % 10}" for i, k in enumerate(d.kernels)}
  starts = {k: start_sigma(results, k) for k in d.kernels}
  for k, v in starts.items():
    if v is not None:
      ax.plot([0], [v], "o", color=colors[k], mec="k", ms=6, zorder=3,
              label=f"start: {layer_label(k)}")
  for j, (run, curves) in enumerate(d.runs.items()):
    for k, c in curves.items():
      ax.plot(c.steps, c.mean, RUN_STYLES[j % 4], color=colors[k], lw=1.6,
              label=f"{run}: {layer_label(k)}")
      if np.isfinite(c.std).any():
        ax.fill_between(c.steps, c.mean - c.std, c.mean + c.std, color=colors[k],
                        alpha=0.15, lw=0)
  ns = sorted(set(d.n_seeds.values()))
  seeds = ("mean ± std band over " + "/".join(map(str, ns)) + " seeds"
           if ns and max(ns) > 1 else "1 seed")
  title = (f"σ_max of the {len(d.kernels)} tracked kernels over fine-tuning ({seeds})"
           if d.kernels else "σ_max over fine-tuning: no σ_max logged")
  if any("b*" in layer_label(k) for k in d.kernels):
    title += "\nb*: scanned blocks, max over blocks"
  if d.kernels:
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("σ_max")
    ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colors[k], lw=2, label=layer_label(k))
               for k in d.kernels]
    handles += [Line2D([], [], color="k", ls=RUN_STYLES[j % 4], label=run)
                for j, run in enumerate(d.runs) if d.runs[run]]
    if any(v is not None for v in starts.values()):
      handles.append(Line2D([], [], ls="", marker="o", color="w", mec="k",
                            label="start model (step 0)"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
  else:
    _empty(ax, "no metrics.jsonl with sigma_max/<kernel> records")
  ax.set_title(title + _notes_line(d.notes), fontsize=9)
  fig.tight_layout()
  return fig


def save_results(results: Mapping[str, Any], outdir: str,
                 metrics: Mapping[str, Mapping[Any, str]] | None = None,
                 max_names: int = MAX_NAMES) -> list[str]:
  """The main job's plots under `outdir`: accuracy_drop.png, layers.png, kernels.png,
  sigma_over_steps.png (`metrics`: {run: {seed: metrics.jsonl path}}); returns the
  paths. Raises ValueError (before writing anything) on empty or bad results."""
  figs = [("accuracy_drop.png", fig_accuracy_drop(results)),
          ("layers.png", fig_layers(results, max_names)),
          ("kernels.png", fig_kernels(results, max_names)),
          ("sigma_over_steps.png", fig_sigma_over_steps(metrics, results))]
  os.makedirs(outdir, exist_ok=True)
  paths = []
  for name, fig in figs:
    paths.append(os.path.join(outdir, name))
    fig.savefig(paths[-1], dpi=_DPI)
  return paths
