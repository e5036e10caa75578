"""report.json: its schema, writing and reading, the table, the plots, run summaries.

The one module that knows report.json's layout. The evaluator produces the dict;
everything that reads a report (the table, the plots, the main job's summary) reads
it here.

report.json (one evaluation of one model):

    accuracy      {setting: top-1 fraction}            settings in the order evaluated
    counts        {setting: {correct, total,           total = real examples (no padding);
                   nonfinite}}                         nonfinite = examples whose logits
                                                       hold NaN / Inf (counted as wrong)
    settings      {setting: record}                    'float': {float: true}; uniform:
                                                       every QuantSetting field; PTQ:
                                                       {method, w_bits, a_bits,
                                                       calib_images, info (qapply.info)}
    layers        {'<layer>/<input|output>': stats}    float model, s2d_jax.outliers:
                                                       count, max_abs, kurtosis,
                                                       median_abs, massive,
                                                       nonfinite (flag), ...
    weights       {kernel: {sigma_max, sigma_ratio_12, top_sigma, shape}}
    quant_plan    {uniform setting: {num_quantized_calls, modules_by_bits}}
    pcdr          {kernel: [PCDR_1, PCDR_2, PCDR_3]}   first examples of the data
    model         {name, kind, config}
    checkpoint    {kind: npz|orbax|in-memory, path, params_sha256, num_params}
    data          {name, split, pp, batch_size, num_batches}
    devices       {count, processes, platform, mesh}   the only fields (with timing_s)
    timing_s      {setting | calibrate/<setting>: s}   that depend on the machine
    batches, batch_size

Non-finite floats are written as strings ("nan", "inf"). `write_report` writes
atomically (temporary file + rename), then the plots.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from s2d_jax import fileio

FLOAT = "float"
REPORT = "report.json"
MACHINE_FIELDS = ("devices", "timing_s")


def setting_record(setting) -> dict[str, Any]:
  """The report's record of a uniform `quant.QuantSetting` (every field)."""
  return dataclasses.asdict(setting)


def jsonable(x):
  """`x` with numpy scalars as Python numbers, tuples as lists, non-finite as strings."""
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return jsonable(x.tolist())
  if isinstance(x, np.generic):
    return jsonable(x.item())
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  if x is None or isinstance(x, (bool, int, float, str)):
    return x
  return str(x)


def write_report(report: Mapping[str, Any], workdir: str, *, plots: bool = True) -> str:
  """`workdir/report.json` (atomically) and `workdir/plots/`; returns the json path."""
  fileio.makedirs(workdir)
  path = os.path.join(workdir, REPORT)
  fileio.atomic_write_text(
      path, json.dumps(jsonable(report), indent=1, sort_keys=True))
  if plots:
    from s2d_jax import plots as plots_lib  # pylint: disable=g-import-not-at-top
    plots_lib.save_all(report, os.path.join(workdir, "plots"))
  return path


def read_report(workdir_or_path: str) -> dict[str, Any]:
  """A report.json (a path, or the workdir holding it)."""
  path = workdir_or_path
  if fileio.isdir(path):
    path = os.path.join(path, REPORT)
  return json.loads(fileio.read_text(path))


def bits(record: Mapping[str, Any]) -> tuple[str, str]:
  """("W", "A") bit widths of a settings record ("-" for float)."""
  if record.get("float"):
    return "-", "-"
  return str(record["w_bits"]), str(record["a_bits"])


def format_table(report: Mapping[str, Any]) -> str:
  """A readable table: setting, W/A bits, top-1, Δ vs float, examples, and the
  examples whose logits are not finite (NaN / Inf: scored as wrong, never as a
  plausible accuracy); then the largest activation and the number of layers with
  massive and with non-finite activations."""
  acc = report["accuracy"]
  base = acc.get(FLOAT)
  rows = [("setting", "W", "A", "top-1 %", "Δ vs float", "examples", "non-finite")]
  for name, a in acc.items():
    w, ab = bits(report["settings"][name])
    counts = report["counts"][name]
    bad = int(counts.get("nonfinite", 0))
    d = "" if base is None or name == FLOAT else f"{100 * (a - base):+.2f}"
    rows.append((name, w, ab, f"{100 * a:.2f}" + (" (!)" if bad else ""), d,
                 str(counts["total"]), str(bad)))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  flagged = [n for n in acc if int(report["counts"][n].get("nonfinite", 0))]
  if flagged:
    lines.append(f"(!) non-finite logits in {', '.join(flagged)}: those examples are "
                 "counted as wrong")
  if report.get("layers"):
    layers = report["layers"]
    massive = [k for k, v in layers.items() if v.get("massive")]
    nonfinite = [k for k, v in layers.items() if v.get("nonfinite")]
    finite_max = [(k, v["max_abs"]) for k, v in layers.items()
                  if isinstance(v.get("max_abs"), (int, float))
                  and math.isfinite(v["max_abs"])]
    if finite_max:
      k, m = max(finite_max, key=lambda kv: kv[1])
      head = f"largest activation: {m:.1f} at {k}; "
    else:
      head = ""
    lines.append(f"{head}{len(massive)} layer(s) with massive activations, "
                 f"{len(nonfinite)} layer(s) with non-finite activations")
  return "\n".join(lines)


# ------------------------------------------------------- several runs (main job) --

def summarize(report: Mapping[str, Any], settings: Sequence[str]) -> dict[str, Any]:
  """One table row: accuracy per setting, largest max |activation|, kurtosis, σ_max."""
  layers = report.get("layers", {})
  weights = report.get("weights", {})
  row: dict[str, Any] = {s: float(report["accuracy"][s]) for s in settings
                         if s in report["accuracy"]}
  if layers:
    top_layer, top = max(layers.items(), key=lambda kv: kv[1]["max_abs"])
    row["max_abs_act"] = float(top["max_abs"])
    row["max_abs_act_layer"] = top_layer
    kurts = [float(v["kurtosis"]) for v in layers.values()
             if isinstance(v.get("kurtosis"), (int, float))]
    row["kurtosis_max"] = max(kurts) if kurts else float("nan")
  if weights:
    top_w, w = max(weights.items(), key=lambda kv: kv[1]["sigma_max"])
    row["sigma_max"] = float(w["sigma_max"])
    row["sigma_max_layer"] = top_w
  return row


def format_results(rows: Mapping[str, Mapping[str, Any]], settings: Sequence[str]) -> str:
  """A markdown table of several runs' `summarize` rows."""
  cols = [("run", None)] + [(s, s) for s in settings] + [
      ("max|act|", "max_abs_act"), ("kurtosis", "kurtosis_max"),
      ("σ_max", "sigma_max")]
  table = [[c for c, _ in cols]]
  for run, r in rows.items():
    line = [run]
    for _, key in cols[1:]:
      v = r.get(key)
      if v is None:
        line.append("-")
      elif key in settings:
        line.append(f"{100 * v:.2f}")
      else:
        line.append(f"{v:.2f}")
    table.append(line)
  widths = [max(len(t[i]) for t in table) for i in range(len(cols))]
  out = ["| " + " | ".join(c.ljust(w) for c, w in zip(t, widths)) + " |"
         for t in table]
  out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  return "\n".join(out)


def write_results(workdir: str, reports: Mapping[str, Mapping[str, Any]],
                  settings: Sequence[str], *, header: str,
                  extra: Mapping[str, Any] | None = None,
                  row_extra: Mapping[str, Mapping[str, Any]] | None = None
                  ) -> dict[str, Any]:
  """The main job's summary of several runs: results.json, results.md, plots/.

  Returns {'rows', 'table', 'paths'}; `row_extra[run]` is added to that run's row,
  `extra` to results.json.
  """
  from s2d_jax import plots as plots_lib  # pylint: disable=g-import-not-at-top
  rows = {run: {**summarize(rep, settings), **dict((row_extra or {}).get(run, {}))}
          for run, rep in reports.items()}
  table = format_results(rows, settings)
  paths = plots_lib.save_comparison(reports, rows, tuple(settings),
                                    os.path.join(workdir, "plots"))
  fileio.atomic_write_text(os.path.join(workdir, "results.json"), json.dumps(
      jsonable({"rows": rows, **dict(extra or {})}), indent=1))
  fileio.atomic_write_text(os.path.join(workdir, "results.md"),
                           header.rstrip("\n") + "\n\n" + table + "\n")
  return {"rows": rows, "table": table, "paths": paths}
