"""s2d_jax: Selective Spectral Decay (S2D) for quantization-friendly ViTs in JAX/Flax.

    import optax, s2d_jax
    tx = optax.chain(s2d_jax.s2d(k=1), optax.adamw(1e-4, weight_decay=1e-4))

Submodules (imported on first use, so `import s2d_jax` stays light): the method
(`spectral`, `optim`, `pcdr`), quantization and statistics (`capture`, `quant`,
`quant_model`, `ptq`, `outliers`), models and data (`models`, `data`), and the
orchestration (`config_utils` + `config_schema`, `tasks`, `parallel`, `train`,
`checkpointing`, `metrics`, `evaluate` + `eval_setup` + `evaluator`, `report`, `plots`;
`python -m s2d_jax.main`).
"""

from s2d_jax import _xla_cpu

_xla_cpu.apply()   # before anything creates a backend: see s2d_jax/_xla_cpu.py

from s2d_jax import _lazy  # pylint: disable=g-import-not-at-top,wrong-import-position
from s2d_jax.optim import S2DState  # pylint: disable=wrong-import-position
from s2d_jax.optim import find_s2d_state
from s2d_jax.optim import s2d
from s2d_jax.optim import s2d_adamw
from s2d_jax.optim import set_active
from s2d_jax.optim import sigma_estimates

__version__ = "0.1.0"

_SUBMODULES = ("spectral", "optim", "pcdr", "capture", "quant", "quant_model",
               "outliers", "ptq", "evaluate", "eval_setup", "evaluator", "report",
               "plots", "train",
               "checkpointing", "config_utils", "config_schema", "tasks", "parallel",
               "metrics", "fileio", "hlo_stats", "comparison", "models", "data")


__getattr__, __dir__ = _lazy.attach(__name__, _SUBMODULES, globals())
