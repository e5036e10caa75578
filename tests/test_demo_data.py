"""Tests for the s2d_demo_shapes tfds builder (offline, deterministic)."""

import hashlib
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds

from s2d_jax.data import demo


def _records(builder, split):
  return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  return d, demo.build(d, "tiny")


def test_tfds_load_works_and_features(tiny):
  data_dir, builder = tiny
  assert builder.info.splits["train"].num_examples == 96
  assert builder.info.splits["test"].num_examples == 48
  ds = tfds.load("s2d_demo_shapes/tiny", data_dir=data_dir, split="train")
  recs = list(tfds.as_numpy(ds))
  assert len(recs) == 96
  for r in recs:
    assert r["image"].shape == (16, 16, 3) and r["image"].dtype == np.uint8
    assert 0 <= r["label"] < 10
    cap = r["caption"].decode()
    assert demo.SHAPES[r["label"]] in cap
    assert demo.COLOR_NAMES[r["color"]] in cap
  assert builder.info.features["label"].names == list(demo.SHAPES)
  assert builder.info.supervised_keys == ("image", "label")


def test_records_are_exactly_the_drawn_examples(tiny):
  """tfds stores exactly draw_example(seed, split, i) for i < n (PNG is lossless)."""
  _, builder = tiny

  def key(image, label, caption):
    return (hashlib.sha1(image.tobytes()).hexdigest(), int(label), caption)

  for split, n in (("train", 96), ("test", 48)):
    stored = sorted(key(r["image"], r["label"], r["caption"].decode())
                    for r in _records(builder, split))
    drawn = [demo.draw_example(0, split, i, image_size=16) for i in range(n)]
    assert sorted(key(e["image"], e["label"], e["caption"]) for e in drawn) == stored


def test_deterministic_and_offline(tmp_path, monkeypatch):
  def no_network(*a, **k):
    raise AssertionError("network access attempted")
  monkeypatch.setattr(socket.socket, "connect", no_network)
  a = demo.build(str(tmp_path / "a"), image_size=12, num_train=20, num_test=10,
                 num_classes=3, seed=5)
  b = demo.build(str(tmp_path / "b"), image_size=12, num_train=20, num_test=10,
                 num_classes=3, seed=5)
  ra, rb = _records(a, "train"), _records(b, "train")
  assert len(ra) == 20
  for x, y in zip(ra, rb):
    np.testing.assert_array_equal(x["image"], y["image"])
    assert x["label"] == y["label"] and x["caption"] == y["caption"]
  assert {int(r["label"]) for r in ra} <= {0, 1, 2}
  assert a.info.features["image"].shape == (12, 12, 3)
  c = demo.build(str(tmp_path / "c"), image_size=12, num_train=20, num_test=10,
                 num_classes=3, seed=6)
  assert any(not np.array_equal(x["image"], y["image"])
             for x, y in zip(ra, _records(c, "train")))
  # Rebuilding into an existing directory is a no-op that reuses the data.
  again = demo.build(str(tmp_path / "a"), image_size=12, num_train=20,
                     num_test=10, num_classes=3, seed=5)
  assert again.info.splits["train"].num_examples == 20


def test_draw_example_deterministic_and_split_dependent():
  a = demo.draw_example(3, "train", 7, image_size=24)
  b = demo.draw_example(3, "train", 7, image_size=24)
  c = demo.draw_example(3, "test", 7, image_size=24)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["caption"] == b["caption"]
  assert not np.array_equal(a["image"], c["image"])
  assert a["image"].shape == (24, 24, 3)


def test_classes_balanced_and_not_trivial_from_colour():
  """All classes occur; the mean colour alone (a nuisance) does not give the class."""
  n = 600
  ex = [demo.draw_example(0, "train", i, image_size=16) for i in range(n)]
  labels = np.array([e["label"] for e in ex])
  counts = np.bincount(labels, minlength=10)
  assert counts.min() > n / 10 * 0.6
  feats = np.array([e["image"].reshape(-1, 3).mean(0) for e in ex])
  tr, te = slice(0, 400), slice(400, n)
  centroids = np.stack([feats[tr][labels[tr] == c].mean(0) for c in range(10)])
  pred = np.argmin(((feats[te, None] - centroids[None]) ** 2).sum(-1), axis=1)
  assert np.mean(pred == labels[te]) < 0.3  # chance is 0.1
  # ...while the shapes themselves differ: class-mean foreground masks differ.
  masks = {s: demo._shape_mask(s, *np.meshgrid(np.linspace(-1.2, 1.2, 32),
                                              np.linspace(-1.2, 1.2, 32)))
           for s in demo.SHAPES}
  for i, s in enumerate(demo.SHAPES):
    for t in demo.SHAPES[i + 1:]:
      assert np.mean(masks[s] != masks[t]) > 0.03, (s, t)


def test_config_errors(tmp_path):
  with pytest.raises(ValueError, match="num_classes must be in"):
    demo.ShapesConfig(name="x", num_classes=1)
  with pytest.raises(ValueError, match="image_size must be >= 8"):
    demo.ShapesConfig(name="x", image_size=4)
  with pytest.raises(ValueError, match="num_train and num_test"):
    demo.ShapesConfig(name="x", num_train=0)
  with pytest.raises(ValueError, match="unknown ShapesConfig fields"):
    demo.build(str(tmp_path), image_sz=3)
  with pytest.raises(ValueError, match="either config or config fields"):
    demo.build(str(tmp_path), "tiny", image_size=16)
  with pytest.raises(ValueError, match="unknown shape"):
    demo._shape_mask("blob", np.zeros(2), np.zeros(2))
