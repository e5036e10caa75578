"""The one XLA:CPU setting s2d_jax needs, added to ``XLA_FLAGS`` at import.

XLA:CPU's concurrency-optimized scheduler (on by default in jax 0.10.2) deadlocks
on the compiled S2D update of ViT-sized models at k = 3: the program never
finishes and every XLA thread waits for work. Reproduced with the
``optax.chain(s2d(k=3), ...)`` update alone on ViT-S/16-shaped params (loop
layout, one CPU device, either S2D strategy) and with full ViT-S/16 and
ViT-B/16 training steps (``benchmarks/s2d_overhead.py``); ViT-Ti/16 shapes and
k = 1 ran. With ``--xla_cpu_enable_concurrency_optimized_scheduler=false`` the
same update runs (0.1 s per call on 2 cores). ``tests/test_s2d_scale.py`` runs
the reproduction in a subprocess.

The flag only affects the CPU backend and is read when JAX creates it, so it is
added to ``XLA_FLAGS`` when ``s2d_jax`` is imported, unless the user already set
it either way. If a backend was created before that, the flag cannot take effect
and a warning says so. (The multi-device XLA:CPU hangs that the trainer works
around, donated S2D steps and one fused PCDR program, are a different problem
that this flag does not fix: ``benchmarks/xla_cpu_hangs.py``.)
"""

from __future__ import annotations

import os
import warnings

FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def apply() -> bool:
  """Adds ``FLAG=false`` to ``XLA_FLAGS`` unless it is there; True if it added it."""
  flags = os.environ.get("XLA_FLAGS", "")
  if FLAG in flags:
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {FLAG}=false".strip()
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    created = xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # another jax: cannot tell
    created = False
  if created:
    warnings.warn(
        "s2d_jax was imported after JAX created its backends, so XLA_FLAGS cannot "
        f"take {FLAG}=false any more: on CPU a compiled S2D update with k >= 3 can "
        "deadlock XLA:CPU. Import s2d_jax first, or set "
        f"XLA_FLAGS='{FLAG}=false' before starting Python.", stacklevel=3)
  return True
