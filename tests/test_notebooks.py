"""The Colab notebooks in notebooks/: structure, and a headless run of each at tiny size.

How a notebook is run here (offline, on CPU):

* a kernel spec written to ``tmp_path`` starts ``sys.executable -m ipykernel_launcher``,
  so the kernel uses this interpreter (and its installed s2d_jax), whatever
  ``python3`` kernel Jupyter would otherwise find;
* the kernel's environment forces ``N_DEVICES`` simulated CPU devices
  (``XLA_FLAGS=--xla_force_host_platform_device_count=4``), so the ``pmap``
  evaluation really runs on more than one device;
* the notebook's ``parameters`` cell keeps its Colab defaults, and a cell
  with the tiny values of ``TINY`` (plus ``DATA_DIR`` / work dirs under
  ``tmp_path``) is injected right after it (papermill's convention);
* nbclient executes every cell top to bottom; any cell error fails the test,
  with the failing cell's source and traceback in the message.

Budget: about 150 s for the three notebooks with ``pytest -n 2`` (fewer quant
settings than the Colab defaults at tiny size: every setting is one more pmap compile).
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(NB_DIR, "*.ipynb")))
EXPECTED = ("01_quickstart.ipynb", "02_outliers_and_ptq.ipynb",
            "03_finetune_with_s2d.ipynb")
N_DEVICES = 4

TINY_VIT = dict(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=(4, 4),
                pool_type="gap")

# Tiny overrides per notebook; "{tmp}" is replaced by the test's tmp_path.
TINY = {
    "01_quickstart.ipynb": dict(
        DATA_DIR="{tmp}/tfds", DATASET_CONFIG="tiny", MODEL=dict(TINY_VIT, depth=1),
        BATCH_SIZE=16,
        PRETRAIN_STEPS=4, FINETUNE_STEPS=4, TOY_STEPS=6, EVAL_BATCH=16, LOG_EVERY=2),
    "02_outliers_and_ptq.ipynb": dict(
        CHECKPOINT="", WORKDIR="{tmp}/work", DATA_DIR="{tmp}/tfds", DATASET_CONFIG="tiny",
        TINY_IMAGE=dict(TINY_VIT, pool_type="map"),
        TINY_TEXT=dict(width=16, depth=1, mlp_dim=32, num_heads=2, vocab_size=32),
        NUM_PROBE_TRAIN=32, PROBE_STEPS=5, EVAL_BATCH=16, MAX_EVAL_BATCHES=2,
        SETTINGS=["float", "W8A8", "W4A4"]),
    "03_finetune_with_s2d.ipynb": dict(
        SETUP="demo", DEMO_SIZE="tiny", DATA_DIR="{tmp}/tfds", WORKDIR="{tmp}/work",
        # No pre-training stage here (one trainer run less; the trainer's own tests
        # cover npz export -> load_classifier): both runs start from a random init.
        START="scratch", PRETRAIN_STEPS=0, FINETUNE_STEPS=4, EVAL_MAX_BATCHES=2,
        CONFIG_OVERRIDES={"evaluate.settings": ("float", "W4A4")}),
}


def _read(name):
  with open(os.path.join(NB_DIR, name)) as f:
    return nbformat.read(f, as_version=4)


def _parameters_index(nb) -> int:
  tagged = [i for i, c in enumerate(nb.cells)
            if "parameters" in c.get("metadata", {}).get("tags", [])]
  assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
  assert nb.cells[tagged[0]].cell_type == "code"
  return tagged[0]


def _assigned_names(source: str) -> set[str]:
  return set(re.findall(r"^([A-Z_][A-Z0-9_]*)\s*=", source, flags=re.M))


def test_all_notebooks_present():
  assert set(EXPECTED) <= set(NOTEBOOKS), NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_clean_with_parameters_cell(name):
  nb = _read(name)
  nbformat.validate(nb)
  for i, c in enumerate(nb.cells):
    if c.cell_type == "code":
      assert c.outputs == [], f"{name}: cell {i} has outputs; clear them before committing"
      assert c.execution_count is None, f"{name}: cell {i} has an execution count"
  i = _parameters_index(nb)
  names = _assigned_names(nb.cells[i].source)
  assert "REPO_URL" in names, f"{name}: the parameters cell must define REPO_URL"
  # Every tiny override targets a real parameter (no silently stale overrides).
  missing = set(TINY.get(name, {})) - names
  assert not missing, f"{name}: overrides {sorted(missing)} are not in the parameters cell"
  # The first markdown cell links the notebook in Colab.
  assert nb.cells[0].cell_type == "markdown"
  assert f"notebooks/{name}" in nb.cells[0].source and "colab" in nb.cells[0].source


def test_notebooks_match_build_script():
  """notebooks/_build.py is the source; the committed .ipynb files are its output."""
  build = os.path.join(NB_DIR, "_build.py")
  if not os.path.exists(build):
    pytest.skip("no notebooks/_build.py")
  r = subprocess.run([sys.executable, build, "--check"], capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr


def _kernel_env() -> dict[str, str]:
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={N_DEVICES}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["CUDA_VISIBLE_DEVICES"] = ""
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
  env["PYTHONPATH"] = os.pathsep.join(
      [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  return env


def _kernel_manager(tmp_path):
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager
  kdir = tmp_path / "kernels" / "s2d-test"
  kdir.mkdir(parents=True)
  (kdir / "kernel.json").write_text(json.dumps(dict(
      argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      display_name="s2d test", language="python")))
  ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
  return KernelManager(kernel_name="s2d-test", kernel_spec_manager=ksm)


def _override_cell(name, tmp_path) -> nbformat.NotebookNode:
  lines = ["# Injected by tests/test_notebooks.py: tiny, offline run."]
  for key, val in TINY.get(name, {}).items():
    if isinstance(val, str):
      val = val.replace("{tmp}", str(tmp_path))
    lines.append(f"{key} = {val!r}")
  return nbformat.v4.new_code_cell("\n".join(lines))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_tiny(name, tmp_path):
  from nbclient import NotebookClient
  from nbclient.exceptions import CellExecutionError
  nb = _read(name)
  i = _parameters_index(nb)
  nb.cells.insert(i + 1, _override_cell(name, tmp_path))
  work = tmp_path / "cwd"
  work.mkdir()
  client = NotebookClient(nb, timeout=300, km=_kernel_manager(tmp_path),
                          resources={"metadata": {"path": str(work)}})
  try:
    client.execute(env=_kernel_env())
  except CellExecutionError as e:
    pytest.fail(f"{name} failed at tiny size:\n{e}", pytrace=False)
  # The kernel ran this interpreter, on N_DEVICES devices, and produced figures.
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs if o.get("output_type") == "stream")
  assert f"{N_DEVICES} device(s)" in text, text[:2000]
  images = sum("image/png" in o.get("data", {}) for c in nb.cells
               if c.cell_type == "code" for o in c.outputs)
  assert images >= 2, f"{name}: expected matplotlib figures, got {images}"
