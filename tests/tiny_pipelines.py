"""Tiny random-weight diffusers pipelines of each family, built offline from small configs.

Text encoders are left out (``None``): every text-conditional pipeline here is called with
precomputed ``prompt_embeds`` (drawn once, seeded), which is how diffusers pipelines run without
their encoders. VAEs are left out where the pipeline only needs them to decode (``output_type="latent"``).
Configs follow diffusers' own pipeline tests, shrunk further (one block, widths of 8-32).
"""

from __future__ import annotations

import torch

from qdrift_stats.quantize import quantize


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def twin(pipe, recipe: str = "w4a4"):
    """The pipeline with its denoiser through a quantization recipe (shared other components)."""
    name = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    q = type(pipe)(**{**pipe.components, name: quantize(getattr(pipe, name), recipe)})
    return quiet(q)


# ---- Flux ------------------------------------------------------------------------------------------


def flux(dynamic: bool = True):
    """FluxPipeline: FLUX.1-dev scheduler settings (dynamic shift) or FLUX.1-schnell's (static, shift 1)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        axes_dims_rope=[2, 2, 4],
        guidance_embeds=dynamic,
    )
    if dynamic:  # FLUX.1-dev's scheduler_config.json
        scheduler = FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=256,
            base_shift=0.5,
            max_image_seq_len=4096,
            max_shift=1.15,
            shift=3.0,
            use_dynamic_shifting=True,
        )
    else:  # FLUX.1-schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    return quiet(pipe)


def flux_call(size: int = 32, guidance: float = 3.5) -> dict:
    g = _seeded(1)
    return {
        "prompt_embeds": torch.randn(1, 4, 16, generator=g),
        "pooled_prompt_embeds": torch.randn(1, 8, generator=g),
        "height": size,
        "width": size,
        "guidance_scale": guidance,
    }
