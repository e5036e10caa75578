"""Tests for s2d_jax.capture: inputs in matrix-view rows reproduce each layer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2d_jax import capture


def _run_single(module, x):
  variables = module.init(jax.random.PRNGKey(0), x)
  y, inputs = capture.capture_matmul_inputs(module.apply, variables, x)
  params = variables["params"]
  return y, inputs, params


def test_dense_input_is_identity_and_reproduces_output():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 7))
  y, inputs, params = _run_single(nn.Dense(4), x)
  np.testing.assert_array_equal(inputs["kernel"], x)
  np.testing.assert_allclose(
      inputs["kernel"] @ params["kernel"] + params["bias"], y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axis,features", [
    (-1, (3, 4)),         # attention query/key/value: (in, heads, head_dim)
    ((-2, -1), 6),        # attention out: (heads, head_dim, out)
    ((1,), 5),            # a contracting axis that is not last
    ((1, 3), (2, 2)),     # non-adjacent contracting axes
])
def test_dense_general_matrix_view(axis, features):
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 4, 5))
  module = nn.DenseGeneral(features, axis=axis)
  y, inputs, params = _run_single(module, x)
  axes = axis if isinstance(axis, tuple) else (axis,)
  rows = int(np.prod([x.shape[a] for a in axes]))
  assert inputs["kernel"].shape[-1] == rows
  w_mat = params["kernel"].reshape(rows, -1)
  bias = params["bias"].reshape(-1)
  out = (inputs["kernel"] @ w_mat + bias).reshape(y.shape)
  np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel_size,strides,padding", [
    ((4, 4), (4, 4), "VALID"),    # ViT patch embedding
    ((3, 3), (1, 1), "SAME"),
    ((3, 2), (2, 1), "VALID"),
    ((3, 3), (2, 2), ((1, 0), (2, 1))),
])
def test_conv_im2col_reproduces_conv(kernel_size, strides, padding):
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 3))
  module = nn.Conv(5, kernel_size, strides=strides, padding=padding)
  y, inputs, params = _run_single(module, x)
  k = params["kernel"]
  rows = int(np.prod(k.shape[:-1]))
  assert inputs["kernel"].shape == y.shape[:-1] + (rows,)
  out = inputs["kernel"] @ k.reshape(rows, -1) + params["bias"]
  np.testing.assert_allclose(out, y, rtol=1e-4, atol=1e-4)


def test_conv_patch_rows_match_a_numpy_reference():
  """VALID stride=kernel conv: patches are plain (kh, kw, cin) reshapes."""
  x = np.arange(2 * 4 * 4 * 2, dtype=np.float32).reshape(2, 4, 4, 2)
  module = nn.Conv(3, (2, 2), strides=(2, 2), padding="VALID")
  _, inputs, _ = _run_single(module, jnp.asarray(x))
  ref = x.reshape(2, 2, 2, 2, 2, 2).transpose(0, 1, 3, 2, 4, 5).reshape(2, 2, 2, 8)
  np.testing.assert_array_equal(inputs["kernel"], ref)


class _Block(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Dense(x.shape[-1], name="fc")(x)), None


class _ScanModel(nn.Module):
  depth: int = 3

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(6, name="embed")(x)
    x, _ = nn.scan(_Block, variable_axes={"params": 0, "intermediates": 0},
                   split_rngs={"params": True}, length=self.depth)(name="encoderblock")(x, None)
    return nn.Dense(2, name="head")(x)


def test_tree_mirrors_params_and_scan_keeps_layer_axis():
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 5, 4))
  model = _ScanModel()
  variables = model.init(jax.random.PRNGKey(0), x)
  _, inputs = jax.jit(lambda v, x: capture.capture_matmul_inputs(model.apply, v, x))(
      variables, x)
  params = variables["params"]
  assert set(inputs) == {"embed", "encoderblock", "head"}
  assert inputs["encoderblock"]["fc"]["kernel"].shape == (3, 2, 5, 6)
  # Layer l's captured input is layer l-1's output, computed here by hand.
  h = x @ params["embed"]["kernel"] + params["embed"]["bias"]
  for layer in range(3):
    np.testing.assert_allclose(inputs["encoderblock"]["fc"]["kernel"][layer], h,
                               rtol=1e-5, atol=1e-5)
    fc = jax.tree.map(lambda a, l=layer: a[l], params["encoderblock"]["fc"])
    h = jax.nn.relu(h @ fc["kernel"] + fc["bias"])
  np.testing.assert_allclose(inputs["head"]["kernel"], h, rtol=1e-5, atol=1e-5)


class _Shared(nn.Module):

  @nn.compact
  def __call__(self, a, b):
    dense = nn.Dense(3, name="shared")
    return dense(a) + dense(b).sum()


def test_layer_called_twice_concatenates_tokens():
  a = jnp.ones((2, 4))
  b = 2 * jnp.ones((5, 4))
  model = _Shared()
  variables = model.init(jax.random.PRNGKey(0), a, b)
  _, inputs = capture.capture_matmul_inputs(model.apply, variables, a, b)
  np.testing.assert_array_equal(inputs["shared"]["kernel"], jnp.concatenate([a, b]))


def test_include_filters_module_paths():
  x = jnp.ones((1, 5, 4))
  model = _ScanModel()
  variables = model.init(jax.random.PRNGKey(0), x)
  _, inputs = capture.capture_matmul_inputs(
      model.apply, variables, x, include=lambda path: path[0] != "encoderblock")
  assert set(inputs) == {"embed", "head"}


def test_grouped_conv_is_rejected_with_its_path():
  x = jnp.ones((1, 4, 4, 4))
  module = nn.Conv(4, (3, 3), feature_group_count=2)
  variables = module.init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="feature_group_count"):
    capture.capture_matmul_inputs(module.apply, variables, x)


def test_matmul_rows_ignores_other_modules():
  assert capture.matmul_rows(nn.LayerNorm(), jnp.ones((2, 3))) is None


class _TwoRanks(nn.Module):
  """Like big_vision's ViT head: one Dense applied to a token map and to pooled features."""

  @nn.compact
  def __call__(self, x):
    head = nn.Dense(3, name="head")
    return head(x), head(x.mean(axis=(1, 2)))


def test_layer_called_with_inputs_of_different_rank():
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 2, 2, 4))
  model = _TwoRanks()
  variables = model.init(jax.random.PRNGKey(0), x)
  _, inputs = capture.capture_matmul_inputs(model.apply, variables, x)
  expected = jnp.concatenate([x.reshape(-1, 4), x.mean(axis=(1, 2))])
  np.testing.assert_allclose(inputs["head"]["kernel"], expected, rtol=1e-6)


def test_vit_with_classifier_head_and_scan():
  from s2d_jax.models import vit
  model = vit.Model(5, width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=(8, 8),
                    pool_type="map", scan=True)
  images = jnp.zeros((2, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(0), images)
  _, inputs = capture.capture_matmul_inputs(model.apply, variables, images)
  blocks = inputs["Transformer"]["encoderblock"]
  assert blocks["MlpBlock_0"]["Dense_0"]["kernel"].shape == (2, 2, 4, 32)
  assert blocks["MultiHeadDotProductAttention_0"]["out"]["kernel"].shape == (2, 2, 4, 32)
  assert inputs["embedding"]["kernel"].shape == (2, 2, 2, 8 * 8 * 3)
  assert inputs["head"]["kernel"].shape[-1] == 32
