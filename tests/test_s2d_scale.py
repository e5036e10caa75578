"""S2D at scale: compiled-program size vs depth, FSDP collectives, strategies agree.

The properties checked here are about the compiled XLA program, so they are read
from its HLO text: how many heavy operations (matmuls, solver calls, loops) and how
many distinct compiled kernels the S2D update has (XLA compiles identical fused
computations once), and how large its collectives are under FSDP.
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from s2d_jax import hlo_stats, optim, spectral
from s2d_jax.models import vit

_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT )?%?[\w.\-]+ = (\(?[^ ]+) "
    r"(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
_SHAPE = re.compile(r"[a-z]\w*\[([\d,]*)\]")


def _heavy_distinct(hlo: str) -> tuple[int, int]:
  size = hlo_stats.program_size(hlo)
  return size["heavy"], size["distinct"]


def _vit_params(depth, scan):
  model = vit.Model(num_classes=10, width=16, depth=depth, mlp_dim=32, num_heads=2,
                    patch_size=(4, 4), pool_type="map", scan=scan)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))))[
      "params"]


def _update_hlo(tx, params) -> str:
  state = jax.eval_shape(tx.init, params)
  return jax.jit(tx.update).lower(params, state, params).compile().as_text()


@pytest.mark.parametrize("scan", [False, True])
def test_compiled_update_does_not_grow_with_depth(scan):
  """From depth 2 to 6 (3x the kernels) the S2D update keeps its heavy ops and kernels."""
  tx = optim.s2d(k=3, strategy="batched")
  small, big = (_update_hlo(tx, _vit_params(d, scan)) for d in (2, 6))
  heavy_s, distinct_s = _heavy_distinct(small)
  heavy_b, distinct_b = _heavy_distinct(big)
  assert heavy_s == heavy_b, (heavy_s, heavy_b)
  assert distinct_b <= distinct_s + 1, (distinct_s, distinct_b)
  # The measure is not blind: one distinct computation per kernel (here: a
  # different scale for each kernel) is seen.
  if not scan:
    params = _vit_params(6, scan)
    per_kernel = lambda p: {n: jnp.sum(jnp.sin(x) * (1.5 + i)) for i, (n, (_, x)) in
                            enumerate(sorted(_kernels(p).items()))}
    hlo = jax.jit(per_kernel).lower(params).compile().as_text()
    assert hlo_stats.program_size(hlo)["distinct"] >= len(_kernels(params))


def _kernels(params):
  leaves = dict(spectral.leaves_with_paths(params))
  return {spectral.path_str(p): (p, leaves[p]) for p in
          (path for path, _ in spectral.select_kernels(params).values())}


def _largest_dim_sharding(mesh, shape):
  """The trainer's FSDP rule: split the largest dimension the axis size divides."""
  n = mesh.shape["fsdp"]
  best = None
  for i, d in enumerate(shape):
    if d % n == 0 and (best is None or d >= shape[best]):
      best = i
  spec = [None] * len(shape)
  if best is not None:
    spec[best] = "fsdp"
  return NamedSharding(mesh, P(*spec))


@pytest.mark.parametrize("strategy", ["batched", "per_kernel"])
def test_fsdp_update_gathers_no_kernel(strategy):
  """Sharded params and state: every collective is basis-sized, none kernel-sized."""
  mesh = Mesh(np.array(jax.devices()[:4]), ("fsdp",))
  depth = 3
  sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  params = {f"encoderblock_{i}": {
      "MlpBlock_0": {"Dense_0": {"kernel": sds(128, 512)}, "Dense_1": {"kernel": sds(512, 128)}},
      "MultiHeadDotProductAttention_0": {"query": {"kernel": sds(128, 4, 32)},
                                         "out": {"kernel": sds(4, 32, 128)}}}
            for i in range(depth)}
  params["encoderblock"] = {"MlpBlock_0": {"Dense_0": {"kernel": sds(depth, 128, 512)}}}
  shard = lambda tree: jax.tree.map(lambda x: _largest_dim_sharding(mesh, x.shape), tree)
  with_sh = lambda tree, sh: jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
  p_sh = shard(params)
  params = with_sh(params, p_sh)
  tx = optax.chain(optim.s2d(k=3, strategy=strategy), optax.adamw(1e-3))
  state = jax.eval_shape(tx.init, params)
  s_sh = shard(state)
  hlo = jax.jit(tx.update, out_shardings=(p_sh, s_sh)).lower(
      params, with_sh(state, s_sh), params).compile().as_text()
  sizes = []
  for line in hlo.splitlines():
    m = _COLLECTIVE.match(line)
    if m:
      sizes += [int(np.prod([int(d) for d in dims.split(",") if d]))
                for dims in _SHAPE.findall(m.group(1))]
  assert sizes, "expected collectives in a sharded update"
  # Bound: a group's stacked bases, (N, K, p) -- here smaller than any kernel.
  layout = optim.find_s2d_state(state).layout
  basis_bound = max(g.num_matrices * g.k * g.p for g in layout.groups)
  smallest_kernel = min(m.view.rows * m.view.cols for _, _, m in layout.members())
  assert basis_bound < smallest_kernel
  assert max(sizes) <= basis_bound, (max(sizes), basis_bound, smallest_kernel)


def test_strategies_agree_with_each_other_and_svd():
  """'batched' and 'per_kernel' compute the same update (loop + scan + transposed)."""
  rng = np.random.default_rng(3)

  def planted(rows, cols):
    u, _ = np.linalg.qr(rng.normal(size=(rows, rows)))
    v, _ = np.linalg.qr(rng.normal(size=(cols, cols)))
    r = min(rows, cols)
    return ((u[:, :r] * 3.0 * 0.6 ** np.arange(r)) @ v[:, :r].T).astype(np.float32)

  params = {f"encoderblock_{i}": {"Dense_0": {"kernel": planted(8, 12)},
                                  "Dense_1": {"kernel": planted(12, 8)}} for i in range(3)}
  params["encoderblock"] = {"Dense_0": {"kernel": np.stack([planted(8, 12) for _ in range(2)])}}
  params = jax.tree.map(jnp.asarray, params)
  grads = jax.tree.map(jnp.zeros_like, params)
  outs = {}
  for strategy in ("batched", "per_kernel"):
    tx = optim.s2d(k=2, strength=1.0, iters=30, init_iters=0, strategy=strategy)
    outs[strategy], _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for name, (_, x) in _kernels(params).items():
    view = spectral.matrix_view(tuple(name.split("/")), x.shape)
    mats = np.asarray(view.to_matrix(x), np.float64).reshape(-1, view.rows, view.cols)
    ref = []
    for m in mats:
      u, s, vt = np.linalg.svd(m, full_matrices=False)
      ref.append((u[:, :2] * s[:2] ** 2) @ vt[:2])
    ref = np.stack(ref).reshape(x.shape)
    for strategy, out in outs.items():
      got = dict((spectral.path_str(p), y) for p, y in spectral.leaves_with_paths(out))[name]
      np.testing.assert_allclose(got, ref, atol=2e-5, err_msg=f"{strategy} {name}")
  with pytest.raises(ValueError, match="strategy"):
    optim.s2d(strategy="fast")


_S16_UPDATE = r"""
import os, sys
import s2d_jax                                   # adds the XLA:CPU flag (s2d_jax/_xla_cpu.py)
import jax, jax.numpy as jnp, numpy as np
from s2d_jax import optim
from s2d_jax.models import vit
assert s2d_jax._xla_cpu.FLAG + "=false" in os.environ["XLA_FLAGS"]
model = vit.Model(1000, variant="S/16", pool_type="map", scan=False)
shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
rng = np.random.default_rng(0)
params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype),
                      shapes["params"])
tx = optim.s2d(k=3)
upd = jax.jit(tx.update)
state = tx.init(params)
for _ in range(2):
  u, state = upd(params, state, params)
  jax.block_until_ready(u)
print("ok")
"""


def test_k3_update_on_vit_s16_does_not_deadlock_xla_cpu():
  """The reproduction of s2d_jax/_xla_cpu.py: without the flag this compiled update
  never finishes on XLA:CPU (jax 0.10.2); with it (added by `import s2d_jax`) it runs."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", _S16_UPDATE], env=env, capture_output=True,
                       text=True, timeout=600, check=False)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
