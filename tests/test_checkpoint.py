"""Tests for s2d_jax.models.checkpoint: npz format, dtypes, layouts, posemb, merging."""

import io
import zipfile

import ml_dtypes
import numpy as np
import pytest

from s2d_jax.models import checkpoint as ck

CheckpointError = ck.CheckpointError


def _tree(rng, depth=3, bf16=False):
  blk = lambda: {"LayerNorm_0": {"scale": rng.normal(size=(4,)).astype(np.float32),
                                 "bias": rng.normal(size=(4,)).astype(np.float32)},
                 "MlpBlock_0": {"Dense_0": {"kernel": rng.normal(size=(4, 8)).astype(
                     ml_dtypes.bfloat16 if bf16 else np.float32)}}}
  enc = {f"encoderblock_{i}": blk() for i in range(depth)}
  enc["encoder_norm"] = {"scale": np.ones(4, np.float32), "bias": np.zeros(4, np.float32)}
  return {"img": {"Transformer": enc, "pos_embedding": rng.normal(size=(1, 16, 4)).astype(
      np.float32)}, "t": np.array([2.3], np.float32)}


def _assert_tree_equal(a, b):
  fa, fb = ck.flatten(a), ck.flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    assert np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype, k
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_flatten_unflatten_roundtrip_and_errors():
  t = _tree(np.random.default_rng(0))
  flat = ck.flatten(t)
  assert "img/Transformer/encoderblock_2/MlpBlock_0/Dense_0/kernel" in flat
  assert list(flat) == sorted(flat)
  _assert_tree_equal(ck.unflatten(flat), t)
  with pytest.raises(CheckpointError, match="both a leaf and a subtree"):
    ck.unflatten({"a": 1.0, "a/b": 2.0})
  with pytest.raises(CheckpointError, match="empty path component"):
    ck.unflatten({"a//b": 1.0})
  with pytest.raises(CheckpointError, match="without '/'"):
    ck.flatten({"a/b": 1.0})
  with pytest.raises(CheckpointError, match="Empty subtree 'x'"):
    ck.flatten({"x": {}})


def test_save_writes_big_vision_layout_and_roundtrips_bf16(tmp_path):
  t = _tree(np.random.default_rng(1), bf16=True)
  path = str(tmp_path / "c.npz")
  ck.save(path, t)
  raw = np.load(path)
  assert set(raw.files) == {"params/" + k for k in ck.flatten(t)}
  k = "params/img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"
  assert raw[k].dtype == np.dtype("V2")  # numpy's on-disk bfloat16
  back = ck.load_params(path)
  _assert_tree_equal(back, t)  # bitwise, dtypes included
  assert back["img"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"][
      "kernel"].dtype == ml_dtypes.bfloat16
  assert not (tmp_path / "c.npz.tmp").exists()


@pytest.mark.parametrize("prefix", ["", "params/", "opt/target/"])
def test_load_params_prefixes_and_subtree(tmp_path, prefix):
  t = _tree(np.random.default_rng(2))
  path = str(tmp_path / "c.npz")
  extra = {"opt/state/mu": np.zeros(3, np.float32)} if prefix else {}
  np.savez(path, **{prefix + k: v for k, v in ck.flatten(t).items()}, **extra)
  _assert_tree_equal(ck.load_params(path), t)
  _assert_tree_equal(ck.load_params(path + ":img"), t["img"])
  _assert_tree_equal(ck.load_params(path + ":img/Transformer/encoder_norm"),
                     t["img"]["Transformer"]["encoder_norm"])
  with pytest.raises(CheckpointError, match="no subtree 'txt'"):
    ck.load_params(path + ":txt")


def test_file_errors(tmp_path):
  t = _tree(np.random.default_rng(3))
  good = tmp_path / "good.npz"
  ck.save(str(good), t)
  data = good.read_bytes()

  with pytest.raises(FileNotFoundError, match="nothere.npz"):
    ck.npload(str(tmp_path / "nothere.npz"))

  junk = tmp_path / "junk.npz"
  junk.write_bytes(b"this is not a zip file at all" * 10)
  with pytest.raises(CheckpointError, match="not a readable .npz"):
    ck.npload(str(junk))

  trunc = tmp_path / "trunc.npz"
  trunc.write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match="corrupt or truncated"):
    ck.npload(str(trunc))

  # Flip bytes inside the first member's data: zip CRC check fails on read.
  with zipfile.ZipFile(io.BytesIO(data)) as z:
    info = z.infolist()[0]
  off = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 100
  bad = bytearray(data)
  bad[off:off + 8] = bytes(255 - b for b in bad[off:off + 8])
  corrupt = tmp_path / "corrupt.npz"
  corrupt.write_bytes(bytes(bad))
  with pytest.raises(CheckpointError, match=f"member '{info.filename[:-4]}' is corrupt"):
    ck.npload(str(corrupt))

  single = tmp_path / "single.npz"
  with open(single, "wb") as f:
    np.save(f, np.zeros(3))
  with pytest.raises(CheckpointError, match="single .npy array"):
    ck.npload(str(single))

  empty = tmp_path / "empty.npz"
  np.savez(empty)
  with pytest.raises(CheckpointError, match="holds no arrays"):
    ck.npload(str(empty))


@pytest.mark.parametrize("arr,msg", [
    (np.zeros((2, 2), np.int32), "dtype int32"),
    (np.zeros(3, bool), "dtype bool"),
    (np.zeros(3, np.float32).view("V4"), "void dtype"),
    (np.zeros(2, np.complex64), "dtype complex64"),
])
def test_wrong_dtype_names_key(tmp_path, arr, msg):
  path = str(tmp_path / "c.npz")
  np.savez(path, **{"params/img/ok": np.zeros(2, np.float32), "params/img/bad/kernel": arr})
  with pytest.raises(CheckpointError, match=f"img/bad/kernel.*{msg}|{msg}.*img/bad/kernel"):
    ck.load_params(path)
  with pytest.raises(CheckpointError, match="img/bad/kernel"):
    ck.save(str(tmp_path / "o.npz"), {"img": {"bad": {"kernel": arr}}})


def test_gfile_paths(tmp_path):
  """Non-local paths go through tf.io.gfile (here TF's in-memory ram:// filesystem)."""
  t = _tree(np.random.default_rng(4), bf16=True)
  path = "ram://s2d_ckpt_test/c.npz"
  ck.save(path, t)
  _assert_tree_equal(ck.load_params(path), t)
  _assert_tree_equal(ck.load_params(path + ":img"), t["img"])
  with pytest.raises(FileNotFoundError, match="ram://s2d_ckpt_test/missing.npz"):
    ck.load_params("ram://s2d_ckpt_test/missing.npz")


def test_loop_scan_conversion_is_exact_and_checked():
  t = _tree(np.random.default_rng(5))
  enc = t["img"]["Transformer"]
  scan = ck.pyloop_to_scan(enc)
  assert set(scan) == {"encoderblock", "encoder_norm"}
  k = scan["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert k.shape == (3, 4, 8)
  np.testing.assert_array_equal(k[1], enc["encoderblock_1"]["MlpBlock_0"]["Dense_0"]["kernel"])
  _assert_tree_equal(ck.scan_to_pyloop(scan), enc)
  assert ck.layout_of(t) == "loop"
  conv = ck.convert_layout(t, scan=True)
  assert ck.layout_of(conv) == "scan"
  _assert_tree_equal(ck.convert_layout(conv, scan=False), t)
  _assert_tree_equal(ck.convert_layout(t, scan=False), t)  # no-op
  assert ck.layout_of({"a": {"b": np.zeros(1)}}) is None

  gap = {k: v for k, v in enc.items() if k != "encoderblock_1"}
  with pytest.raises(CheckpointError, match="missing encoderblock_1"):
    ck.pyloop_to_scan(gap, "img/Transformer")
  odd = dict(enc)
  odd["encoderblock_2"] = {**enc["encoderblock_2"],
                           "LayerNorm_0": {"scale": np.ones(5), "bias": np.ones(4)}}
  with pytest.raises(CheckpointError, match=r"encoderblock_2/LayerNorm_0/scale has shape "
                     r"\(5,\) but .*encoderblock_0/LayerNorm_0/scale has \(4,\)"):
    ck.pyloop_to_scan(odd, "img/Transformer")
  extra = dict(enc)
  extra["encoderblock_1"] = {**enc["encoderblock_1"], "foo": np.ones(1)}
  with pytest.raises(CheckpointError, match="foo"):
    ck.pyloop_to_scan(extra)
  mixed = {**enc, "encoderblock": scan["encoderblock"]}
  with pytest.raises(CheckpointError, match="mixes loop"):
    ck.layout_of({"Transformer": mixed})


def np_bilinear_align_corners(grid, gh, gw):
  """Independent reference: bilinear resize that maps corner pixels onto corners."""
  g0h, g0w, _ = grid.shape

  def axis_weights(n_in, n_out):
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
      s = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
      i0 = min(int(np.floor(s)), n_in - 1)
      i1 = min(i0 + 1, n_in - 1)
      f = s - i0
      w[i, i0] += 1 - f
      w[i, i1] += f
    return w

  wy, wx = axis_weights(g0h, gh), axis_weights(g0w, gw)
  return np.einsum("ih,jw,hwd->ijd", wy, wx, grid.astype(np.float64))


@pytest.mark.parametrize("g_old,new", [(4, (6, 6)), (6, (4, 4)), (4, (3, 5)), (7, (14, 14))])
def test_resample_posemb_matches_bilinear_reference(g_old, new):
  rng = np.random.default_rng(6)
  old = rng.normal(size=(1, g_old * g_old, 5)).astype(np.float32)
  target = new if new[0] != new[1] else (1, new[0] * new[1], 5)
  out = ck.resample_posemb(old, target)
  assert out.shape == (1, new[0] * new[1], 5) and out.dtype == np.float32
  ref = np_bilinear_align_corners(old.reshape(g_old, g_old, 5), *new)
  np.testing.assert_allclose(out.reshape(*new, 5), ref, rtol=1e-5, atol=1e-5)
  # Corners are copied exactly.
  np.testing.assert_allclose(out[0, 0], old[0, 0], rtol=1e-6)
  np.testing.assert_allclose(out[0, -1], old[0, -1], rtol=1e-6)


def test_resample_posemb_identity_bf16_and_errors():
  old = np.random.default_rng(7).normal(size=(1, 9, 4)).astype(np.float32)
  assert ck.resample_posemb(old, (1, 9, 4)) is old
  out = ck.resample_posemb(old.astype(ml_dtypes.bfloat16), (5, 5))
  assert out.dtype == ml_dtypes.bfloat16
  np.testing.assert_allclose(out.astype(np.float32),
                             ck.resample_posemb(old.astype(ml_dtypes.bfloat16).astype(
                                 np.float32), (5, 5)).astype(ml_dtypes.bfloat16).astype(
                                     np.float32))
  with pytest.raises(CheckpointError, match="not a square grid"):
    ck.resample_posemb(np.zeros((1, 10, 4)), (1, 16, 4))
  with pytest.raises(CheckpointError, match="width differs"):
    ck.resample_posemb(old, (1, 16, 8))
  with pytest.raises(CheckpointError, match=r"\(1, N, D\)"):
    ck.resample_posemb(old[0], (1, 16, 4))


class _S:  # shape-only stand-in, like jax.ShapeDtypeStruct
  def __init__(self, shape):
    self.shape = shape


def test_merge_params_errors_and_dont_load():
  loaded = {"a": {"kernel": np.ones((2, 3))}, "b": np.ones(4), "head": {"w": np.ones(2)}}
  expected = {"a": {"kernel": _S((2, 3))}, "b": _S((4,)), "head": {"w": _S((2,))}}
  merged = ck.merge_params(loaded, expected)
  _assert_tree_equal(merged, loaded)

  with pytest.raises(CheckpointError, match=r"missing key\(s\) in checkpoint: c"):
    ck.merge_params(loaded, {**expected, "c": _S((1,))})
  with pytest.raises(CheckpointError, match=r"unexpected key\(s\).*: b"):
    ck.merge_params(loaded, {k: v for k, v in expected.items() if k != "b"})
  with pytest.raises(CheckpointError, match=r"shape mismatch for 'a/kernel': checkpoint "
                     r"\(2, 3\) vs model \(3, 3\)"):
    ck.merge_params(loaded, {**expected, "a": {"kernel": _S((3, 3))}})

  init = {"a": {"kernel": np.zeros((2, 3))}, "b": np.zeros(4), "head": {"w": np.zeros(5)}}
  exp2 = {**expected, "head": {"w": _S((5,))}}
  merged = ck.merge_params(loaded, exp2, dont_load=["head/.*"], init=init)
  np.testing.assert_array_equal(merged["head"]["w"], np.zeros(5))
  np.testing.assert_array_equal(merged["a"]["kernel"], loaded["a"]["kernel"])
  # dont_load also excuses missing / extra keys
  merged = ck.merge_params({"a": loaded["a"], "b": loaded["b"]}, exp2, "head/w", init)
  np.testing.assert_array_equal(merged["head"]["w"], np.zeros(5))
  with pytest.raises(CheckpointError, match="No init values"):
    ck.merge_params(loaded, exp2, dont_load=["head/.*"])
  with pytest.raises(ValueError, match="never start with '/'"):
    ck.merge_params(loaded, expected, dont_load=["/head"])
  with pytest.raises(ValueError, match="Bad dont_load regex"):
    ck.merge_params(loaded, expected, dont_load=["head/(("])


def test_npz_shapes_reads_headers_only(tmp_path):
  t = _tree(np.random.default_rng(8), bf16=True)
  path = str(tmp_path / "c.npz")
  ck.save(path, t)
  shapes = ck.npz_shapes(path)
  flat = ck.flatten(t)
  assert set(shapes) == {"params/" + k for k in flat}
  for k, v in flat.items():
    assert shapes["params/" + k].shape == v.shape
    assert shapes["params/" + k].dtype == v.dtype, k  # bf16 reported as bf16
  data = open(path, "rb").read()
  (tmp_path / "junk.npz").write_bytes(data[-200:])
  with pytest.raises(CheckpointError, match="not a readable .npz"):
    ck.npz_shapes(str(tmp_path / "junk.npz"))
  with pytest.raises(FileNotFoundError):
    ck.npz_shapes(str(tmp_path / "none.npz"))
