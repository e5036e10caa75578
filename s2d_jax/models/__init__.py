"""big_vision-compatible Flax models: ViT, text tower, SigLIP two towers, checkpoint I/O."""
