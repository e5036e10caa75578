"""hlo_stats: counts on a hand-written HLO module and on a compiled jax function."""

import jax
import jax.numpy as jnp
import pytest

from s2d_jax import hlo_stats

_HLO = """HloModule m, entry_computation_layout={(f32[2,2]{1,0})->f32[2,2]{1,0}}

%fused_a (p: f32[2,2]) -> f32[2,2] {
  %p = f32[2,2]{1,0} parameter(0)
  ROOT %n = f32[2,2]{1,0} negate(f32[2,2]{1,0} %p), metadata={op_name="neg"}
}

%fused_b (q: f32[2,2]) -> f32[2,2] {
  %q = f32[2,2]{1,0} parameter(0)
  ROOT %m = f32[2,2]{1,0} negate(f32[2,2]{1,0} %q), metadata={op_name="other"}
}

ENTRY %main (x: f32[2,2]) -> f32[2,2] {
  %x = f32[2,2]{1,0} parameter(0)
  %d = f32[2,2]{1,0} dot(f32[2,2]{1,0} %x, f32[2,2]{1,0} %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %f = f32[2,2]{1,0} fusion(f32[2,2]{1,0} %d), kind=kLoop, calls=%fused_a
  ROOT %g = f32[2,2]{1,0} fusion(f32[2,2]{1,0} %f), kind=kLoop, calls=%fused_b
}
"""


def test_program_size_of_a_hand_written_module():
  assert hlo_stats.computations(_HLO).keys() == {"fused_a", "fused_b", "ENTRY"}
  # 2 + 2 + 4 instructions; one dot; the two fusions differ only in names/metadata.
  assert hlo_stats.program_size(_HLO) == dict(instructions=8, heavy=1, distinct=1)


def test_program_size_counts_matmuls_of_a_compiled_function():
  f = lambda x: (x @ x) @ x.T + jnp.sin(x)
  hlo = jax.jit(f).lower(jnp.ones((8, 8))).compile().as_text()
  size = hlo_stats.program_size(hlo)
  assert size["heavy"] >= 1 and size["instructions"] >= size["heavy"]


def test_text_without_entry_is_an_error():
  with pytest.raises(ValueError, match="no ENTRY"):
    hlo_stats.program_size("not hlo")
