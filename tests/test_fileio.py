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
TIME_FIELDS = ("time", "steps_per_sec", "eta_s")


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
  c.export_npz = True
  c.log_every = 1
  c.ckpt_every = 0
  c.total_steps = 2
  return c


def _run(config, workdir, ckpt_root, monkeypatch):
  """train_and_evaluate into `workdir`, orbax checkpoints under `ckpt_root`."""
  orig = checkpointing.checkpoint_dir
  monkeypatch.setattr(checkpointing, "checkpoint_dir", lambda w: orig(
      str(ckpt_root) if w == workdir else w))
  out = train.train_and_evaluate(config, workdir, echo=False)
  monkeypatch.setattr(checkpointing, "checkpoint_dir", orig)
  return out


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root) if not fileio.is_remote(root)
                else os.path.join(d, f)[len(root) + 1:]
                for d, _, fs in (tf.io.gfile.walk(root) if fileio.is_remote(root)
                                 else os.walk(root)) for f in fs)


def test_train_and_evaluate_into_a_ram_workdir(data_dir, tmp_path, monkeypatch):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  c = _config(data_dir)
  local = str(tmp_path / "local")
  remote = _ram() + "/run"
  _run(c, local, tmp_path / "ck_local", monkeypatch)
  _run(c, remote, tmp_path / "ck_remote", monkeypatch)
  assert os.listdir(cwd) == []      # no ./ram:/... folder
  assert sorted(os.listdir(tmp_path)) == ["ck_local", "ck_remote", "cwd", "local"]

  names = {"config.json", "metrics.jsonl", "params.npz", "report.json",
           "plots/accuracy_vs_bits.png"}
  files = _files(remote)
  assert names <= set(files), files
  assert any(f.startswith("tensorboard/") and "tfevents" in f for f in files), files
  assert not [f for f in files if f.endswith(".tmp") or ".tmp." in f], files
  assert {f for f in files if not f.startswith("tensorboard/")} == {
      f for f in _files(local) if not f.startswith("tensorboard/")}

  assert fileio.read_text(remote + "/config.json") == open(
      os.path.join(local, "config.json")).read()
  strip = lambda recs: [{k: v for k, v in r.items() if k not in TIME_FIELDS}
                        for r in recs]
  got = metrics.read_metrics(remote + "/metrics.jsonl")
  assert [r["step"] for r in got] == [1, 2]
  assert strip(got) == strip(metrics.read_metrics(os.path.join(local, "metrics.jsonl")))
  npz_r = np.load(io.BytesIO(fileio.read_bytes(remote + "/params.npz")))
  npz_l = np.load(os.path.join(local, "params.npz"))
  assert sorted(npz_r.files) == sorted(npz_l.files) and npz_l.files
  for k in npz_l.files:
    np.testing.assert_array_equal(npz_r[k], npz_l[k])
  rep_r, rep_l = report.read_report(remote), report.read_report(local)
  for k in report.MACHINE_FIELDS:
    rep_r.pop(k), rep_l.pop(k)
  assert rep_r == rep_l and set(rep_r["accuracy"]) == {"float", "W8A8"}
