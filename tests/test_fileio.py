"""Workdir files on remote filesystems (s2d_jax/fileio.py), through TF's in-memory
`ram://` filesystem: the helpers on local and ram:// paths, and a tiny
train_and_evaluate run whose workdir is ram:// that writes everything there (the
same content as a local run) and nothing into the current directory.

Orbax cannot write to ram:// (etils.epath knows no 'ram://' scheme: KeyError in
`epath.Path`, and tensorstore has no driver for it), so the run test points only
the orbax checkpoint directory at a local folder; every other file goes to ram://.
"""

import io
import json
import os
import subprocess
import sys
import uuid

import jax
import numpy as np
import pytest
import tensorflow as tf
from matplotlib.figure import Figure

from s2d_jax import checkpointing
from s2d_jax import config_utils as cu
from s2d_jax import fileio
from s2d_jax import metrics
from s2d_jax import report
from s2d_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")


def _ram():
  return f"ram://s2d_fileio_{uuid.uuid4().hex}"


@pytest.fixture(params=["local", "ram"])
def root(request, tmp_path):
  return str(tmp_path / "d") if request.param == "local" else _ram() + "/d"


def test_is_remote_and_abspath(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert fileio.is_remote("gs://b/run") and fileio.is_remote("ram://x")
  assert not fileio.is_remote("/tmp/x") and not fileio.is_remote("rel/x")
  assert fileio.abspath("gs://b/run/checkpoints") == "gs://b/run/checkpoints"
  assert fileio.abspath("rel/x") == os.path.join(str(tmp_path), "rel", "x")


def test_makedirs_exists_isdir(root):
  d = root + "/a/b"
  assert not fileio.exists(d) and not fileio.isdir(d)
  fileio.makedirs(d)
  fileio.makedirs(d)   # existing: fine
  assert fileio.exists(d) and fileio.isdir(d) and fileio.isdir(root + "/a")
  fileio.atomic_write_text(d + "/f.txt", "x")
  assert fileio.exists(d + "/f.txt") and not fileio.isdir(d + "/f.txt")
  fileio.remove(d + "/f.txt")
  assert not fileio.exists(d + "/f.txt")


def test_atomic_writes_replace_and_leave_no_temporary(root):
  fileio.makedirs(root)
  p = root + "/r.json"
  fileio.atomic_write_text(p, "first é\n")
  fileio.atomic_write_text(p, "second é\n")
  assert fileio.read_text(p) == "second é\n"
  assert not fileio.exists(p + ".tmp")
  data = bytes(range(256)) * 3
  fileio.atomic_write_bytes(root + "/b.bin", data)
  assert fileio.read_bytes(root + "/b.bin") == data
  # replace: the source's content over an existing target, the source gone
  fileio.atomic_write_text(root + "/src", "new")
  fileio.replace(root + "/src", p)
  assert fileio.read_text(p) == "new" and not fileio.exists(root + "/src")


def test_open_append_lines_and_missing_file(root):
  fileio.makedirs(root)
  p = root + "/m.jsonl"
  for i in range(2):
    with fileio.open(p, "a") as f:
      f.write(f"line {i}\n")
      f.flush()
  with fileio.open(p) as f:
    assert list(f) == ["line 0\n", "line 1\n"]
  with pytest.raises(FileNotFoundError, match="nope"):
    fileio.open(root + "/nope")


def test_replace_across_filesystems_is_refused(tmp_path):
  with pytest.raises(ValueError, match="not on the same filesystem"):
    fileio.replace(str(tmp_path / "a"), "ram://x/a")


def test_save_figure_remote_equals_local(tmp_path):
  fig = Figure(figsize=(2, 2))
  fig.subplots().plot([0, 1, 2], [1, 0, 1])
  local = fileio.save_figure(fig, str(tmp_path / "p.png"), dpi=50)
  remote = fileio.save_figure(fig, _ram() + "/p.png", dpi=50)
  got = fileio.read_bytes(remote)
  assert got[:8] == b"\x89PNG\r\n\x1a\n"
  assert got == open(local, "rb").read()


def test_local_paths_do_not_import_tensorflow(tmp_path):
  code = ("import sys\nfrom s2d_jax import fileio\n"
          f"d = {str(tmp_path / 'x')!r}\nfileio.makedirs(d)\n"
          "fileio.atomic_write_text(d + '/a', 'x')\n"
          "assert fileio.read_text(d + '/a') == 'x' and fileio.isdir(d)\n"
          "sys.exit('tensorflow' in sys.modules)")
  env = dict(os.environ, PYTHONPATH=ROOT)
  assert subprocess.run([sys.executable, "-c", code], env=env,
                        check=False).returncode == 0


def test_keep_steps_upto_and_reports_on_ram():
  d = _ram()
  p = d + "/metrics.jsonl"
  fileio.makedirs(d)
  fileio.atomic_write_text(p, "".join(json.dumps({"step": s, "loss": s / 10}) + "\n"
                                      for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
  assert metrics.keep_steps_upto(p, 2) == 3   # steps 3, 4 and the torn line
  assert metrics.read_metrics(p) == [{"step": 1, "loss": 0.1}, {"step": 2, "loss": 0.2}]
  rep = {"accuracy": {"float": 0.5}, "settings": {"float": {"float": True}},
         "timing_s": {"float": float("nan")}}
  path = report.write_report(rep, d)
  assert path == d + "/report.json"
  assert report.read_report(d) == report.read_report(path) == {
      "accuracy": {"float": 0.5}, "settings": {"float": {"float": True}},
      "timing_s": {"float": "nan"}}
  assert tf.io.gfile.listdir(d + "/plots") == ["accuracy_vs_bits.png"]
  out = report.write_results(d, {"a": rep}, ["float"], header="# runs")
  assert json.loads(fileio.read_text(d + "/results.json"))["rows"] == out["rows"]
  assert fileio.read_text(d + "/results.md").startswith("# runs\n\n")


def test_checkpointer_keeps_a_remote_directory(monkeypatch):
  """Orbax gets gs://b/run/checkpoints itself (os.path.abspath made it ./gs:/b/...);
  the manager is replaced so that nothing contacts GCS."""
  seen = []
  monkeypatch.setattr(checkpointing.ocp, "CheckpointManager",
                      lambda directory, **kw: seen.append(directory))
  ck = checkpointing.Checkpointer("gs://b/run", create=False)
  assert ck.directory == seen[0] == "gs://b/run/checkpoints"


def _config(data_dir):
  c = cu.load_config(f"{DEMO}:size=tiny,data_dir={data_dir}")
  c.evaluate.settings = ("float", "W8A8")
  c.evaluate.update(collect_stats=False, pcdr_examples=0, max_batches=1)  # speed
  c.s2d.enabled = False
  c.sigma_log_top = 1
  c.export_npz = True
  c.log_every = 1
  c.ckpt_every = 0
  c.total_steps = 2
  return c


def _files(remote_root):
  """Every file under a tf.io.gfile directory, relative to it."""
  return sorted(os.path.join(d, f)[len(remote_root) + 1:]
                for d, _, fs in tf.io.gfile.walk(remote_root) for f in fs)


def test_train_and_evaluate_into_a_ram_workdir(data_dir, tmp_path, monkeypatch):
  """Every file lands under the ram:// workdir with exactly the values the run
  produced in memory (config, the logged records, the returned params and report);
  the current directory stays empty (no ./ram:/... folder)."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  workdir = _ram() + "/run"
  orig = checkpointing.checkpoint_dir    # orbax: a local folder (see the docstring)
  monkeypatch.setattr(checkpointing, "checkpoint_dir", lambda w: orig(
      str(tmp_path / "ck") if w == workdir else w))
  logged = []
  write = metrics.MetricWriter.write
  monkeypatch.setattr(metrics.MetricWriter, "write", lambda self, *a, **k: (
      logged.append(write(self, *a, **k)) or logged[-1]))
  c = _config(data_dir)
  res = train.train_and_evaluate(c, workdir, echo=False)
  assert os.listdir(cwd) == []
  assert sorted(os.listdir(tmp_path)) == ["ck", "cwd"]
  assert os.listdir(tmp_path / "ck" / "checkpoints") == ["2"]  # the final step

  files = _files(workdir)
  assert {"config.json", "metrics.jsonl", "params.npz", "report.json",
          "plots/accuracy_vs_bits.png"} <= set(files), files
  assert any(f.startswith("tensorboard/") and "tfevents" in f for f in files), files
  assert not [f for f in files if ".tmp" in f], files

  assert fileio.read_text(workdir + "/config.json") == c.to_json_best_effort(indent=2)
  got = metrics.read_metrics(workdir + "/metrics.jsonl")
  assert [r["step"] for r in got] == [1, 2] and got == logged
  assert any(k.startswith("sigma_max/") for k in got[-1])
  npz = np.load(io.BytesIO(fileio.read_bytes(workdir + "/params.npz")))
  flat = {"params/" + "/".join(str(getattr(p, "key", p)) for p in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(
              jax.device_get(res["params"]))}
  assert sorted(npz.files) == sorted(flat)
  for k, v in flat.items():
    np.testing.assert_array_equal(npz[k], v)
  assert report.read_report(workdir) == json.loads(json.dumps(
      report.jsonable(res["report"])))
  assert set(res["report"]["accuracy"]) == {"float", "W8A8"}
