"""The package surface: public names, lazy submodules, light top-level import."""

import subprocess
import sys

import pytest

import s2d_jax


def test_public_api_names():
  for name in ("s2d", "s2d_adamw", "S2DState", "find_s2d_state", "sigma_estimates",
               "set_active"):
    assert callable(getattr(s2d_jax, name)), name
  assert s2d_jax.models.siglip.load is not None
  assert s2d_jax.quant.fake_quant is not None
  assert s2d_jax.data.input_pipeline.get_dataset is not None


@pytest.mark.parametrize("package", [s2d_jax, s2d_jax.models, s2d_jax.data])
def test_every_listed_submodule_imports(package):
  for name in package._SUBMODULES:
    assert getattr(package, name).__name__ == f"{package.__name__}.{name}"
    assert name in dir(package)


def test_unknown_attribute_is_an_attribute_error():
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    s2d_jax.nope  # noqa: B018


def test_top_level_import_does_not_import_tensorflow():
  code = "import sys, s2d_jax; sys.exit('tensorflow' in sys.modules)"
  assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
