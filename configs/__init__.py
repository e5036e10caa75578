"""Config files, big_vision style (`get_config(arg) -> ConfigDict`).

In the repository they live in the top-level `configs/`; `pip install .` installs them
as `s2d_jax.configs`, so every entry point takes `--config NAME[:ARG]` with a name
below (or a path to any config file):

    demo                      the main job's fine-tuning stage (demo data, tiny ViT)
    demo_pretrain             the main job's pre-training stage (tiny SigLIP towers)
    siglip2_b16_384_i1k       the paper's main setup: SigLIP2 B/16 384 -> ImageNet-1k
    siglip2_b16_384_i1k_qat   the same with W4A4 quantization-aware training
    siglip_b16_224_i1k, siglip_l16_384_i1k, siglip_so400m14_384_i1k (FSDP)
"""
