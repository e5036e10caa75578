"""big_vision-compatible Flax models and their inputs.

`vit` (image tower), `text` (text tower), `two_towers` (SigLIP), `siglip` (load/save of
big_vision npz checkpoints), `checkpoint` (npz I/O), `hf` (Hugging Face safetensors),
`preprocess` (big_vision pp strings), `tokenizer`, `zeroshot`, `imagenet_classes`.
Submodules are imported on first use (`s2d_jax.models.siglip.load(...)` just works).
"""

from s2d_jax import _lazy
_SUBMODULES = ("vit", "text", "two_towers", "siglip", "checkpoint", "hf",
               "preprocess", "tokenizer", "zeroshot", "imagenet_classes")


__getattr__, __dir__ = _lazy.attach(__name__, _SUBMODULES, globals())
