"""quant_model.calibrate passes keyword arguments (e.g. `train=False`) as Python values."""

import flax.linen as nn
import jax
import numpy as np

from s2d_jax import quant_model as qm


class _TrainFlag(nn.Module):
  """Dense -> (×3 if train) -> Dense: the second layer's input range depends on `train`,
  and `if train` needs a Python bool (a tracer raises)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(6, name="a")(x)
    if train:
      h = 3.0 * h
    return nn.Dense(3, name="b")(h)


def test_calibrate_binds_kwargs_before_jit():
  m = _TrainFlag()
  x = jax.random.normal(jax.random.key(0), (4, 5))
  x2 = jax.random.normal(jax.random.key(1), (4, 5))
  v = m.init(jax.random.key(2), x)
  key = qm.CALIB_PREFIX + "input"
  plain = qm.calibrate(m.apply, "W8A8-static", v, [(x,), (x2,)])
  off = qm.calibrate(m.apply, "W8A8-static", v, [(x,), (x2,)], train=False)
  on = qm.calibrate(m.apply, "W8A8-static", v, [(x,), (x2,)], train=True)
  for layer in ("a", "b"):
    np.testing.assert_array_equal(off[layer][key], plain[layer][key])
  # honoured: train=True triples layer b's input, hence its min-max range
  h = np.concatenate([x, x2]) @ np.asarray(v["params"]["a"]["kernel"]) + np.asarray(
      v["params"]["a"]["bias"])
  np.testing.assert_allclose(np.asarray(off["b"][key]), [h.min(), h.max()], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(on["b"][key]), 3 * np.asarray(off["b"][key]),
                             rtol=1e-6)
  np.testing.assert_array_equal(on["a"][key], off["a"][key])
