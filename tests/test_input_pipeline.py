"""Tests for s2d_jax.data.input_pipeline on tiny tfds datasets made in tmp_path."""

import hashlib
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from s2d_jax.data import demo
from s2d_jax.data import input_pipeline as ip

NAME = "s2d_demo_shapes/tiny"   # 96 train / 48 test, 16x16
AUG = "inception_crop(8)|flip_lr|value_range(-1,1)|keep('image','label')"
PLAIN = "keep('image','label')"


class S2dTestVarImages(tfds.core.GeneratorBasedBuilder):
  """Variable-size images under non-standard feature names ('img', 'cls')."""

  VERSION = tfds.core.Version("0.1.0")
  pkg_dir_path = epath.Path(__file__).parent  # tests/ is not a package

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # pylint: disable=no-self-argument
    return epath.Path(__file__)

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "img": tfds.features.Image(shape=(None, None, 3)),
        "cls": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(30)}

  def _generate_examples(self, n):
    for i in range(n):
      rng = np.random.default_rng(i)
      h, w = 10 + i % 5, 12 + i % 3
      yield i, {"img": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                "cls": i % 3}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  demo.build(d, "tiny")
  S2dTestVarImages(data_dir=d).download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return d


def _take(ds, n):
  it = ds.as_numpy_iterator()
  return [next(it) for _ in range(n)]


def _h(x):
  return hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()


def _train(data_dir, **kw):
  args = dict(preprocess=AUG, batch_size=20, process_index=0, process_count=1,
              data_dir=data_dir, shuffle_buffer_size=200, seed=1)
  args.update(kw)
  return ip.get_dataset(NAME, "train", **args)


def test_resume_at_step_equals_uninterrupted(data_dir):
  """96 examples, batch 20: steps 0..9 cross two epoch boundaries."""
  full = _take(_train(data_dir), 10)
  assert full[0]["image"].shape == (20, 8, 8, 3)
  for s in (1, 4, 5, 9):
    resumed = _take(_train(data_dir, start_step=s), 10 - s)
    for a, b in zip(full[s:], resumed):
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["label"], b["label"])


def test_deterministic_given_seed_and_seed_matters(data_dir):
  a, b = _take(_train(data_dir), 3), _take(_train(data_dir), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
  c = _take(_train(data_dir, seed=2), 3)
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_epochs_are_reshuffled_permutations(data_dir):
  """Each epoch holds every example once; the order changes per epoch."""
  all_hashes = sorted(_h(r["image"]) for r in tfds.as_numpy(
      tfds.load(NAME, data_dir=data_dir, split="train")))
  batches = _take(_train(data_dir, preprocess=PLAIN, batch_size=16), 12)
  seq = [_h(im) for b in batches for im in b["image"]]
  ep0, ep1 = seq[:96], seq[96:192]
  assert sorted(ep0) == all_hashes and sorted(ep1) == all_hashes
  assert ep0 != ep1
  # Augmentations differ between epochs too (new per-epoch example seeds).
  aug = _take(_train(data_dir, batch_size=96), 2)
  assert not np.array_equal(aug[0]["image"], aug[1]["image"])
  # shuffle=False: file order every epoch.
  ordered = _take(_train(data_dir, preprocess=PLAIN, batch_size=96,
                         shuffle=False), 2)
  np.testing.assert_array_equal(ordered[0]["image"], ordered[1]["image"])


def test_multi_process_training_shards_are_disjoint(data_dir):
  shards = []
  for p in range(2):
    bs = _take(_train(data_dir, preprocess=PLAIN, batch_size=8,
                      process_index=p, process_count=2), 6)
    assert bs[0]["image"].shape[0] == 8
    shards.append([_h(im) for b in bs for im in b["image"]])
  assert len(set(shards[0])) == 48 and len(set(shards[1])) == 48
  assert not set(shards[0]) & set(shards[1])
  assert ip.steps_per_epoch(NAME, "train", batch_size=8, data_dir=data_dir,
                            process_count=2) == 6


def test_eval_pads_and_masks(data_dir):
  pp = "value_range(0, 1)|keep('image','label')"
  ds, nb = ip.get_eval_dataset(NAME, "test", preprocess=pp, batch_size=20,
                               process_index=0, process_count=1,
                               data_dir=data_dir)
  batches = list(ds.as_numpy_iterator())
  assert nb == 3 == len(batches)
  masks = np.concatenate([b["_mask"] for b in batches])
  np.testing.assert_array_equal(masks, [1] * 48 + [0] * 12)
  last = batches[-1]
  assert np.all(last["image"][8:] == 0) and np.all(last["label"][8:] == 0)
  ref = list(tfds.as_numpy(tfds.load(NAME, data_dir=data_dir, split="test",
                                     shuffle_files=False)))
  imgs = np.concatenate([b["image"] for b in batches])[:48]
  np.testing.assert_allclose(imgs, np.stack([r["image"] for r in ref]) / 255,
                             atol=1e-6)
  again = list(ip.iterate_eval(NAME, "test", preprocess=pp, batch_size=20,
                               process_index=0, process_count=1,
                               data_dir=data_dir))
  np.testing.assert_array_equal(again[1]["image"], batches[1]["image"])


def test_eval_multi_process_covers_each_example_once(data_dir):
  pp = "keep('image','label')"
  seen, nbs = [], []
  for p in range(3):   # 47 examples over 3 processes (16, 16, 15), batch 5
    ds, nb = ip.get_eval_dataset(NAME, "test[:47]", preprocess=pp,
                                 batch_size=5, process_index=p,
                                 process_count=3, data_dir=data_dir)
    bs = list(ds.as_numpy_iterator())
    assert len(bs) == nb and bs[0]["image"].shape[0] == 5
    nbs.append(nb)
    for b in bs:
      seen += [_h(im) for im, m in zip(b["image"], b["_mask"]) if m]
  assert len(set(nbs)) == 1 and nbs[0] == 4   # ceil(16 / 5)
  ref = sorted(_h(r["image"]) for r in tfds.as_numpy(
      tfds.load(NAME, data_dir=data_dir, split="test[:47]")))
  assert sorted(seen) == ref


def test_eval_global_batches_do_not_depend_on_the_process_count(data_dir):
  """Process p's rows of global batch k are rows [p b, (p+1) b) of the one-process
  batch k: concatenating the processes' batches gives the same global batches,
  padding and masks included (47 examples, global batch 12 = 4 x 3 = 6 x 2)."""
  pp = "value_range(0,1)|keep('image','label')"
  kw = dict(preprocess=pp, data_dir=data_dir)
  one = list(ip.iterate_eval(NAME, "test[:47]", batch_size=12, process_index=0,
                             process_count=1, **kw))
  assert len(one) == 4 and one[-1]["_mask"].tolist() == [1] * 11 + [0]
  for procs in (2, 3):
    parts = [list(ip.iterate_eval(NAME, "test[:47]", batch_size=12 // procs,
                                  process_index=p, process_count=procs, **kw))
             for p in range(procs)]
    assert all(len(x) == 4 for x in parts)
    for k, want in enumerate(one):
      for key in ("image", "label", "_mask"):
        got = np.concatenate([parts[p][k][key] for p in range(procs)])
        np.testing.assert_array_equal(got, want[key], err_msg=f"{procs} {k} {key}")


def test_variable_size_images_and_feature_renaming(data_dir):
  name = "s2d_test_var_images"
  kw = dict(batch_size=6, process_index=0, process_count=1, data_dir=data_dir,
            features={"img": "image", "cls": "label"})
  b = _take(ip.get_dataset(name, "train", preprocess=(
      "decode|resize(8)|value_range(-1,1)|keep('image','label')"), **kw), 1)[0]
  assert b["image"].shape == (6, 8, 8, 3) and b["label"].shape == (6,)
  ds, nb = ip.get_eval_dataset(name, "train", preprocess=(
      "decode|resize_small(9)|central_crop(9)|keep('image','label')"), **kw)
  assert nb == 5
  with pytest.raises(ValueError, match=r"key 'image' has shape \(None, None, 3\)"):
    ip.get_dataset(name, "train", preprocess="decode|keep('image','label')", **kw)
  with pytest.raises(KeyError, match=r"features \['picture'\] not in dataset"):
    ip.get_dataset(name, "train", preprocess=PLAIN, batch_size=6,
                   process_index=0, process_count=1, data_dir=data_dir,
                   features={"picture": "image"})
  assert ip.num_classes(name, data_dir, key="cls") == 3


def test_missing_dataset_errors_name_it_and_write_nothing(tmp_path):
  d = str(tmp_path / "empty")
  os.makedirs(d)
  with pytest.raises(ip.DatasetNotFoundError, match="'cifar100'.*not prepared") as e:
    ip.get_dataset("cifar100", "train", preprocess=PLAIN, batch_size=8,
                   process_index=0, process_count=1, data_dir=d)
  assert d in str(e.value) and "never downloads" in str(e.value)
  with pytest.raises(ip.DatasetNotFoundError, match="'oxford_iiit_pet'"):
    ip.get_eval_dataset("oxford_iiit_pet", "test", preprocess=PLAIN,
                        batch_size=8, process_index=0, process_count=1,
                        data_dir=d)
  with pytest.raises(ip.DatasetNotFoundError, match="'no_such_dataset_xyz'.*neither"):
    ip.get_builder("no_such_dataset_xyz", d)
  leftovers = [f for _, _, fs in os.walk(d) for f in fs]
  assert not leftovers, leftovers


def test_argument_errors(data_dir):
  kw = dict(preprocess=PLAIN, data_dir=data_dir)
  with pytest.raises(ValueError, match=r"bad split 'validation'.*\['test', 'train'\]"):
    ip.get_dataset(NAME, "validation", batch_size=8, process_index=0,
                   process_count=1, **kw)
  for bad in (0, -2, 2.5, True):
    with pytest.raises(ValueError, match="batch_size .per process. must be a "
                       "positive int"):
      ip.get_dataset(NAME, "train", batch_size=bad, process_index=0,
                     process_count=4, **kw)
  with pytest.raises(ValueError, match="process_index=2 not in"):
    ip.get_dataset(NAME, "train", batch_size=8, process_index=2,
                   process_count=2, **kw)
  with pytest.raises(ValueError, match="start_step must be >= 0"):
    ip.get_dataset(NAME, "train", batch_size=8, process_index=0,
                   process_count=1, start_step=-1, **kw)
  with pytest.raises(ValueError, match="unknown preprocessing op 'resise'"):
    ip.get_dataset(NAME, "train", batch_size=8, process_index=0,
                   process_count=1, preprocess="resise(3)", data_dir=data_dir)
  with pytest.raises(KeyError, match="no ClassLabel feature 'colour'"):
    ip.num_classes(NAME, data_dir, key="colour")
  assert ip.num_classes(NAME, data_dir) == 10
  assert ip.num_examples(NAME, "train", data_dir=data_dir, process_index=1,
                         process_count=2) == 48


def test_default_process_is_jax_process(data_dir):
  b = next(ip.train_iterator(NAME, "train", preprocess=PLAIN, batch_size=8,
                             data_dir=data_dir))
  assert b["image"].shape == (8, 16, 16, 3)   # jax.process_count() == 1
