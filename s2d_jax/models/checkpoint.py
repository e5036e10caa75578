"""big_vision `.npz` checkpoint I/O: flat names, bfloat16-as-void, layouts, posemb.

A big_vision npz is a zip of `.npy` members, one per parameter, named by the path in
the parameter tree joined with '/', usually under a `params/` prefix:
`params/img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel`. numpy has no
bfloat16, so bfloat16 leaves are stored as 2-byte void (`|V2`) and viewed back.

Layouts: loop `.../encoderblock_{i}/...` (one subtree per block) versus scan
`.../encoderblock/...` (one subtree, every leaf stacked on a new axis 0);
`pyloop_to_scan` / `scan_to_pyloop` convert (exactly; pure stacking / slicing).

Position embeddings are resampled as big_vision's `vit.resample_posemb`: the
(1, g*g, D) table is viewed as a g x g grid and zoomed by g'/g with
`scipy.ndimage.zoom(order=1)`, i.e. bilinear interpolation in which the corner
tokens map onto the corner tokens: new[i] = old(i * (g-1)/(g'-1)).

Non-finite parameters (NaN / ±Inf) are refused on load by default: one NaN in
an init checkpoint makes every training step NaN and every evaluation a
plausible-looking constant guess. `load_params(path)` raises `CheckpointError`
naming each such key with its NaN / Inf counts; `allow_nonfinite=True` loads
the file anyway and issues a `NonFiniteWarning` with the same list (for
inspecting a broken checkpoint). `save` writes non-finite params (they may be
what you want to inspect) but warns the same way. `nonfinite_params` /
`check_finite` do the check on any tree.
"""

from __future__ import annotations

import io
import os
import re
import warnings
import zipfile
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

Params = dict[str, Any]

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64),
                np.dtype(ml_dtypes.bfloat16))
_BLOCK_RE = re.compile(r"encoderblock_(\d+)")


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not match the model."""


class NonFiniteWarning(UserWarning):
  """Parameters with NaN / Inf values were loaded or saved."""


# ----------------------------------------------------------------------------------
# Flat names <-> nested dicts.


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dict -> {'a/b/c': leaf}. Keys are sorted like big_vision's names."""
  flat = {}
  for k in sorted(tree):
    if not isinstance(k, str) or not k or "/" in k:
      raise CheckpointError(f"Parameter names must be non-empty strings without '/', "
                            f"got {k!r} under {prefix or '<root>'!r}")
    v = tree[k]
    if isinstance(v, Mapping):
      if not v:
        raise CheckpointError(f"Empty subtree {prefix + k!r} cannot be stored in npz")
      flat.update(flatten(v, prefix + k + "/"))
    else:
      flat[prefix + k] = v
  return flat


def unflatten(flat: Mapping[str, Any]) -> Params:
  """{'a/b/c': leaf} -> nested dict. Raises if a name is both a leaf and a subtree."""
  tree: Params = {}
  for name in sorted(flat):
    parts = name.split("/")
    if any(not p for p in parts):
      raise CheckpointError(f"Bad parameter name {name!r} (empty path component)")
    node = tree
    for i, p in enumerate(parts[:-1]):
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise CheckpointError(f"{'/'.join(parts[:i + 1])!r} is both a leaf and a "
                              f"subtree (via {name!r})")
    if parts[-1] in node:
      raise CheckpointError(f"{name!r} is both a leaf and a subtree")
    node[parts[-1]] = flat[name]
  return tree


# ----------------------------------------------------------------------------------
# dtypes.


def recover_dtype(a: np.ndarray, name: str = "") -> np.ndarray:
  """2-byte void (numpy's bfloat16 on disk) -> bfloat16; other dtypes unchanged."""
  if a.dtype.kind == "V":
    if a.dtype.itemsize != 2:
      raise CheckpointError(
          f"{name!r}: unsupported void dtype {a.dtype} (itemsize "
          f"{a.dtype.itemsize}); only 2-byte void (bfloat16) is understood")
    return a.view(ml_dtypes.bfloat16)
  return a


def check_float(a: Any, name: str) -> None:
  """Raise CheckpointError naming `name` unless `a` is a float16/32/64 or bf16 array."""
  dt = np.dtype(getattr(a, "dtype", type(a)))
  if dt not in FLOAT_DTYPES:
    raise CheckpointError(
        f"{name!r} has dtype {dt}; parameters must be floating point "
        f"(float16, bfloat16, float32, float64)")


# ----------------------------------------------------------------------------------
# Non-finite values.


def nonfinite_params(params: Mapping[str, Any]) -> dict[str, tuple[int, int, int]]:
  """{'a/b/c': (num_nan, num_inf, size)} for every leaf holding a NaN or ±Inf.

  Leaves of any float dtype (bfloat16 included); one host pass per leaf, and
  the counting only for leaves that fail the fast `isfinite(...).all()` test.
  """
  return _count_nonfinite(flatten(params))


def _count_nonfinite(flat: Mapping[str, Any]) -> dict[str, tuple[int, int, int]]:
  out = {}
  for name, v in flat.items():
    a = np.asarray(jax.device_get(v))
    if a.dtype not in FLOAT_DTYPES:  # other dtypes cannot hold NaN / Inf here
      continue
    if a.size and not np.isfinite(a).all():
      out[name] = (int(np.isnan(a).sum()), int(np.isinf(a).sum()), int(a.size))
  return out


def describe_nonfinite(bad: Mapping[str, tuple[int, int, int]], limit: int = 10) -> str:
  """'k1 (2 NaN, 0 Inf of 64 values), ...' for `nonfinite_params`' result."""
  items = [f"{k} ({n} NaN, {i} Inf of {size} values)"
           for k, (n, i, size) in sorted(bad.items())]
  more = f", and {len(items) - limit} more" if len(items) > limit else ""
  return ", ".join(items[:limit]) + more


def check_finite(params: Mapping[str, Any], *, allow: bool = False,
                 where: str = "params") -> dict[str, tuple[int, int, int]]:
  """Raises CheckpointError (or warns, with `allow=True`) if any leaf is non-finite.

  Returns `nonfinite_params(params)` (empty when all leaves are finite). The
  message names `where` and every bad key with its NaN / Inf counts. A single
  array is accepted too (it is named `where`).
  """
  bad = (nonfinite_params(params) if isinstance(params, Mapping)
         else _count_nonfinite({where: params}))
  if bad:
    msg = (f"{where}: {len(bad)} parameter(s) hold non-finite values: "
           f"{describe_nonfinite(bad)}")
    if not allow:
      raise CheckpointError(msg + ". Training or evaluating from them gives NaN; "
                            "pass allow_nonfinite=True to load them anyway.")
    warnings.warn(msg, NonFiniteWarning, stacklevel=3)
  return bad


# ----------------------------------------------------------------------------------
# Reading and writing npz files (local paths or anything tf.io.gfile opens).


def _is_remote(path: str) -> bool:
  return "://" in path


def _read_bytes(path: str) -> bytes:
  """Whole file via tf.io.gfile (gs://, ram://, ...)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"Checkpoint not found: {path}")
  with tf.io.gfile.GFile(path, "rb") as f:
    return f.read()


def npload(path: str) -> dict[str, np.ndarray]:
  """Reads every member of an npz file into memory: {name: array}, bf16 recovered.

  Raises FileNotFoundError for a missing file and CheckpointError for anything that
  is not a complete, valid npz (not a zip, truncated, bad CRC, corrupt member).
  """
  if _is_remote(path):  # np.load needs seeks: read the whole object first
    source = io.BytesIO(_read_bytes(path))
  elif os.path.exists(path):
    source = path  # local: no second in-memory copy of a multi-GB file
  else:
    raise FileNotFoundError(f"Checkpoint not found: {path}")
  try:
    npz = np.load(source, allow_pickle=False)
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    raise CheckpointError(
        f"{path}: not a readable .npz checkpoint (corrupt or truncated file?): "
        f"{type(e).__name__}: {e}") from e
  if isinstance(npz, np.ndarray):
    raise CheckpointError(f"{path}: is a single .npy array, not an .npz of parameters")
  out = {}
  with npz:
    for name in npz.files:
      try:
        arr = npz[name]
      except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise CheckpointError(
            f"{path}: member {name!r} is corrupt or truncated: "
            f"{type(e).__name__}: {e}") from e
      out[name] = recover_dtype(arr, name)
  if not out:
    raise CheckpointError(f"{path}: the npz file holds no arrays")
  return out


class ArrayInfo:
  """Shape and dtype of a stored array (quacks like jax.ShapeDtypeStruct)."""

  def __init__(self, shape, dtype):
    self.shape, self.dtype = tuple(shape), np.dtype(dtype)

  def __repr__(self):
    return f"ArrayInfo(shape={self.shape}, dtype={self.dtype})"


def npz_shapes(path: str) -> dict[str, ArrayInfo]:
  """{name: ArrayInfo} of an npz, reading only the .npy headers (no array data) for
  local files; bfloat16 (2-byte void) is reported as bfloat16."""
  if _is_remote(path):
    return {k: ArrayInfo(v.shape, v.dtype) for k, v in npload(path).items()}
  if not os.path.exists(path):
    raise FileNotFoundError(f"Checkpoint not found: {path}")
  out = {}
  try:
    with zipfile.ZipFile(path) as z:
      for info in z.infolist():
        if not info.filename.endswith(".npy"):
          continue
        with z.open(info) as f:
          version = np.lib.format.read_magic(f)
          read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                         else np.lib.format.read_array_header_2_0)
          shape, _, dtype = read_header(f)
        if dtype.kind == "V" and dtype.itemsize == 2:
          dtype = np.dtype(ml_dtypes.bfloat16)
        out[info.filename[:-4]] = ArrayInfo(shape, dtype)
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    raise CheckpointError(f"{path}: not a readable .npz checkpoint (corrupt or "
                          f"truncated file?): {type(e).__name__}: {e}") from e
  if not out:
    raise CheckpointError(f"{path}: the npz file holds no arrays")
  return out


def strip_prefix(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Removes big_vision's checkpoint wrappers: `params/...` or `opt/target/...`.

  Files without a prefix (how many public checkpoints are shared) pass unchanged.
  Other top-level entries (e.g. optimizer state next to `params/`) are dropped.
  """
  for prefix in ("params/", "opt/target/"):
    if any(k.startswith(prefix) for k in flat):
      return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  return dict(flat)


def load_params(path: str, *, allow_nonfinite: bool = False) -> Params:
  """big_vision's `utils.load_params` for npz: nested params, prefix removed.

  A suffix ':sub/tree' selects a subtree, e.g. 'ckpt.npz:img' (the image tower).
  Every leaf is checked to be floating point (the error names the key) and
  finite: a NaN / Inf leaf of the selected (sub)tree raises CheckpointError
  naming the keys and counts, unless `allow_nonfinite=True` (then a
  `NonFiniteWarning` says the same).
  """
  key = None
  if m := re.fullmatch(r"(.*?\.npz)(?::([\w/\-]+))?", path):
    path, key = m.groups()
  flat = strip_prefix(npload(path))
  for name, v in flat.items():
    check_float(v, name)
  params = unflatten(flat)
  if key:
    for part in key.split("/"):
      if not isinstance(params, dict) or part not in params:
        raise CheckpointError(f"{path}: no subtree {key!r} (top-level keys: "
                              f"{sorted(unflatten(flat))})")
      params = params[part]
  check_finite(params, allow=allow_nonfinite,
               where=f"{path}:{key}" if key else path)
  return params


def _to_numpy(x: Any, name: str) -> np.ndarray:
  a = np.asarray(jax.device_get(x))
  check_float(a, name)
  return a


def save(path: str, params: Mapping[str, Any], prefix: str = "params/") -> None:
  """Writes `params` as a big_vision npz: names '<prefix>a/b/c', bf16 as `|V2`.

  The file is written to `path + '.tmp'` and renamed, so a crash never leaves a
  half-written checkpoint under `path` (local paths; gs:// writes are atomic).
  Non-finite leaves are written, with a `NonFiniteWarning` naming them.
  """
  flat = {prefix + k: _to_numpy(v, k) for k, v in flatten(params).items()}
  bad = _count_nonfinite({k[len(prefix):]: v for k, v in flat.items()})
  if bad:
    warnings.warn(f"{path}: writing {len(bad)} parameter(s) with non-finite "
                  f"values: {describe_nonfinite(bad)}", NonFiniteWarning,
                  stacklevel=2)
  flat = {k: (v.view("V2") if v.dtype == ml_dtypes.bfloat16 else v)
          for k, v in flat.items()}
  buf = io.BytesIO()
  np.savez(buf, **flat)
  if _is_remote(path):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    with tf.io.gfile.GFile(path, "wb") as f:
      f.write(buf.getvalue())
    return
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(buf.getvalue())
  os.replace(tmp, path)


# ----------------------------------------------------------------------------------
# Loop <-> scan layouts.


def _block_indices(encoder: Mapping[str, Any], where: str) -> list[int]:
  idx = sorted(int(m.group(1)) for k in encoder if (m := _BLOCK_RE.fullmatch(k)))
  if idx and idx != list(range(len(idx))):
    missing = sorted(set(range(max(idx) + 1)) - set(idx))
    raise CheckpointError(f"{where}: encoder blocks are not contiguous; missing "
                          f"{', '.join(f'encoderblock_{i}' for i in missing)}")
  return idx


def pyloop_to_scan(encoder: Mapping[str, Any], where: str = "encoder") -> Params:
  """{'encoderblock_0': t0, ..., 'encoder_norm': n} -> {'encoderblock': stack, ...}."""
  encoder = dict(encoder)
  idx = _block_indices(encoder, where)
  if not idx:
    raise CheckpointError(f"{where}: no encoderblock_N subtrees to stack")
  blocks = [encoder.pop(f"encoderblock_{i}") for i in idx]
  ref = flatten(blocks[0])
  for i, b in enumerate(blocks[1:], 1):
    fb = flatten(b)
    if fb.keys() != ref.keys():
      raise CheckpointError(
          f"{where}/encoderblock_{i} has keys {sorted(fb.keys() ^ ref.keys())} "
          f"that encoderblock_0 does not share")
    for k, v in fb.items():
      if np.shape(v) != np.shape(ref[k]):
        raise CheckpointError(
            f"{where}/encoderblock_{i}/{k} has shape {np.shape(v)} but "
            f"{where}/encoderblock_0/{k} has {np.shape(ref[k])}")
  stack = np.stack if all(isinstance(v, np.ndarray) for v in ref.values()) else jnp.stack
  encoder["encoderblock"] = jax.tree.map(lambda *a: stack(a), *blocks)
  return encoder


def scan_to_pyloop(encoder: Mapping[str, Any], where: str = "encoder") -> Params:
  """{'encoderblock': stacked, ...} -> {'encoderblock_0': ..., 'encoderblock_{L-1}': ...}."""
  encoder = dict(encoder)
  stacked = encoder.pop("encoderblock")
  depths = {k: np.shape(v)[0] if np.ndim(v) else None
            for k, v in flatten(stacked).items()}
  if len(set(depths.values())) != 1 or None in depths.values():
    raise CheckpointError(f"{where}/encoderblock: leaves disagree on the layer axis: "
                          f"{depths}")
  depth = next(iter(depths.values()))
  for i in range(depth):
    encoder[f"encoderblock_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return encoder


def _is_encoder(d: Mapping[str, Any]) -> bool:
  return "encoderblock" in d or any(_BLOCK_RE.fullmatch(k) for k in d)


def layout_of(params: Mapping[str, Any]) -> Optional[str]:
  """'scan', 'loop' or None (no encoder found); raises if the tree mixes both."""
  found = set()

  def visit(d):
    if _is_encoder(d):
      found.add("scan" if "encoderblock" in d else "loop")
      if "encoderblock" in d and any(_BLOCK_RE.fullmatch(k) for k in d):
        found.add("mixed")
    for v in d.values():
      if isinstance(v, Mapping):
        visit(v)

  visit(params)
  if "mixed" in found or len(found) > 1:
    raise CheckpointError("Checkpoint mixes loop (encoderblock_N) and scan "
                          "(encoderblock) layouts")
  return found.pop() if found else None


def convert_layout(params: Mapping[str, Any], scan: bool, where: str = "") -> Params:
  """Converts every encoder found in `params` to the scan (True) or loop layout."""
  out = {}
  for k, v in params.items():
    out[k] = convert_layout(v, scan, f"{where}{k}/") if isinstance(v, Mapping) else v
  if _is_encoder(out):
    name = where.rstrip("/") or "<root>"
    if scan and "encoderblock" not in out:
      out = pyloop_to_scan(out, name)
    elif not scan and "encoderblock" in out:
      out = scan_to_pyloop(out, name)
  return out


# ----------------------------------------------------------------------------------
# Position embedding resampling.


def resample_posemb(old: Any, new: Union[Sequence[int], Any]) -> np.ndarray:
  """Resamples a (1, g*g, D) learned posemb to the token count of `new`.

  `new` is the target array (or its shape (1, N', D)) with N' = g'^2, or a target
  grid (h', w'). Bilinear zoom with `scipy.ndimage.zoom(order=1)` on the (g, g, D)
  grid, as big_vision; bfloat16 is resampled in float32 and cast back.
  """
  import scipy.ndimage  # pylint: disable=import-outside-toplevel
  old = np.asarray(old)
  if old.ndim != 3 or old.shape[0] != 1:
    raise CheckpointError(f"posemb must have shape (1, N, D), got {old.shape}")
  gs_old = int(round(np.sqrt(old.shape[1])))
  if gs_old * gs_old != old.shape[1]:
    raise CheckpointError(f"posemb with {old.shape[1]} tokens is not a square grid; "
                          "cannot resample")
  new_shape = tuple(getattr(new, "shape", new))
  if len(new_shape) == 2:
    gh, gw = new_shape
  elif len(new_shape) == 3:
    gh = gw = int(round(np.sqrt(new_shape[1])))
    if gh * gw != new_shape[1]:
      raise CheckpointError(f"target posemb shape {new_shape} is not a square grid")
    if new_shape[2] != old.shape[2]:
      raise CheckpointError(f"posemb width differs: {old.shape} vs {new_shape}")
  else:
    raise CheckpointError(f"target must be (1, N, D) or a grid (h, w), got {new_shape}")
  if (gh, gw) == (gs_old, gs_old):
    return old
  grid = old.reshape(gs_old, gs_old, -1).astype(
      np.float64 if old.dtype == np.float64 else np.float32)
  grid = scipy.ndimage.zoom(grid, (gh / gs_old, gw / gs_old, 1), order=1)
  if grid.shape[:2] != (gh, gw):  # zoom rounds the output size; guard anyway
    raise CheckpointError(f"zoom produced grid {grid.shape[:2]}, wanted {(gh, gw)}")
  return grid.reshape(1, gh * gw, -1).astype(old.dtype)


# ----------------------------------------------------------------------------------
# Matching a loaded tree against the model's expected tree.


def compile_patterns(patterns: Union[str, Iterable[str], None]) -> list[re.Pattern]:
  """dont_load regexes (full match against 'a/b/c' names; no leading '/')."""
  if patterns is None:
    return []
  if isinstance(patterns, str):
    patterns = [patterns]
  out = []
  for p in patterns:
    if not isinstance(p, str):
      raise ValueError(f"dont_load patterns must be strings, got {p!r}")
    if p.startswith("/"):
      raise ValueError(f"Parameter names never start with '/': {p!r}")
    try:
      out.append(re.compile(p))
    except re.error as e:
      raise ValueError(f"Bad dont_load regex {p!r}: {e}") from e
  return out


def merge_params(loaded: Mapping[str, Any], expected: Mapping[str, Any],
                 dont_load: Union[str, Iterable[str], None] = (),
                 init: Optional[Mapping[str, Any]] = None) -> Params:
  """Checks `loaded` against the model's `expected` tree and fills in `dont_load`.

  Args:
    loaded: params from the checkpoint.
    expected: the model's params or their shapes (e.g. `jax.eval_shape(model.init…)`).
    dont_load: regexes; matching names take their value from `init` (and may be
      missing from, or extra in, the checkpoint).
    init: the model's initial params; required when some name is not loaded.
  Returns:
    a tree with exactly the structure of `expected`.
  Raises:
    CheckpointError naming missing keys, unexpected keys, or a key with both shapes.
  """
  pats = compile_patterns(dont_load)
  skip = lambda n: any(p.fullmatch(n) for p in pats)
  lf, ef = flatten(loaded), flatten(expected)
  missing = sorted(k for k in ef.keys() - lf.keys() if not skip(k))
  extra = sorted(k for k in lf.keys() - ef.keys() if not skip(k))
  if missing or extra:
    msg = []
    if missing:
      msg.append("missing key(s) in checkpoint: " + ", ".join(missing))
    if extra:
      msg.append("unexpected key(s) in checkpoint (not in the model): " +
                 ", ".join(extra))
    raise CheckpointError("; ".join(msg) +
                          ". Use dont_load=[regex, ...] to keep the model's init values.")
  merged = {}
  need_init = []
  mismatch = []
  for k, e in ef.items():
    if k in lf and not skip(k):
      if np.shape(lf[k]) != tuple(e.shape):
        mismatch.append(f"shape mismatch for {k!r}: checkpoint {np.shape(lf[k])} vs "
                        f"model {tuple(e.shape)}")
      merged[k] = lf[k]
    else:
      need_init.append(k)
  if mismatch:
    raise CheckpointError("; ".join(mismatch))
  if need_init:
    if init is None:
      raise CheckpointError(f"No init values given for not-loaded params {need_init}")
    inf = flatten(init)
    for k in need_init:
      if k not in inf:
        raise CheckpointError(f"No init value given for not-loaded param {k!r}")
      merged[k] = inf[k]
  return unflatten(merged)
