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


def _embeds(*shapes: tuple[int, ...], seed: int = 1) -> list[torch.Tensor]:
    g = _seeded(seed)
    return [torch.randn(*shape, generator=g) for shape in shapes]


# ---- Stable Diffusion 3 -------------------------------------------------------------------------------


def sd3(dynamic: bool = False):
    """StableDiffusion3Pipeline; ``dynamic``: the resolution-dependent shift (SD3.5-style ``use_dynamic_shifting``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
    )
    if dynamic:
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    return quiet(pipe)


def sd3_call(size: int = 32) -> dict:
    pe, npe, pp, npp = _embeds((1, 4, 16), (1, 4, 16), (1, 8), (1, 8))
    return {
        "prompt_embeds": pe,
        "negative_prompt_embeds": npe,
        "pooled_prompt_embeds": pp,
        "negative_pooled_prompt_embeds": npp,
        "height": size,
        "width": size,
        "guidance_scale": 4.0,
    }


# ---- PixArt-Sigma --------------------------------------------------------------------------------------


def pixart_sigma():
    """PixArtSigmaPipeline with its DPM-Solver++ 2M scheduler."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=4,
        num_layers=1,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=16,
        in_channels=4,
        cross_attention_dim=16,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    scheduler = DPMSolverMultistepScheduler()
    pipe = PixArtSigmaPipeline(
        tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=scheduler
    )
    return quiet(pipe)


def pixart_call(size: int = 32) -> dict:
    pe, npe = _embeds((1, 4, 16), (1, 4, 16))
    mask = torch.ones(1, 4, dtype=torch.long)
    return {
        "prompt_embeds": pe,
        "prompt_attention_mask": mask,
        "negative_prompt_embeds": npe,
        "negative_prompt_attention_mask": mask,
        "negative_prompt": None,
        "height": size,
        "width": size,
        "use_resolution_binning": False,
        "guidance_scale": 4.5,
    }


# ---- Sana ----------------------------------------------------------------------------------------------


def sana(flow_dpm: bool = True):
    """SanaPipeline with flow DPM-Solver++ (its default scheduler) or flow-matching Euler."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        SanaPipeline,
        SanaTransformer2DModel,
    )

    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=32,
    )
    if flow_dpm:
        scheduler = DPMSolverMultistepScheduler(
            use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0, algorithm_type="dpmsolver++"
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=scheduler)
    return quiet(pipe)


def sana_call(size: int = 64) -> dict:
    pe, npe = _embeds((1, 4, 8), (1, 4, 8))
    mask = torch.ones(1, 4, dtype=torch.long)
    return {
        "prompt_embeds": pe,
        "prompt_attention_mask": mask,
        "negative_prompt_embeds": npe,
        "negative_prompt_attention_mask": mask,
        "negative_prompt": None,
        "height": size,
        "width": size,
        "use_resolution_binning": False,
        "guidance_scale": 4.5,
    }


# ---- SDXL and SD -----------------------------------------------------------------------------------------


def sdxl():
    """StableDiffusionXLPipeline (micro-conditioning "text_time" embeddings) with Euler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8,),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=16,
        norm_num_groups=4,
        attention_head_dim=4,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 8,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    pipe = StableDiffusionXLPipeline(
        vae=None,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=scheduler,
    )
    return quiet(pipe)


def sdxl_call(size: int = 32) -> dict:
    pe, npe, pp, npp = _embeds((1, 4, 16), (1, 4, 16), (1, 8), (1, 8))
    return {
        "prompt_embeds": pe,
        "negative_prompt_embeds": npe,
        "pooled_prompt_embeds": pp,
        "negative_pooled_prompt_embeds": npp,
        "height": size,
        "width": size,
        "guidance_scale": 5.0,
    }


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    )


def _sd_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8,),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=16,
        norm_num_groups=4,
        attention_head_dim=4,
    )


def sd(scheduler_name: str = "ddim", img2img: bool = False):
    """StableDiffusionPipeline (or its img2img twin, which needs the VAE to encode the image)."""
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionPipeline,
    )

    schedulers = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}
    scheduler = schedulers[scheduler_name](
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        **({"clip_sample": False, "set_alpha_to_one": False} if scheduler_name == "ddim" else {}),
    )
    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    pipe = cls(
        vae=tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        unet=_sd_unet(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return quiet(pipe)


def sd_call(img2img: bool = False) -> dict:
    pe, npe = _embeds((1, 4, 16), (1, 4, 16))
    call = {"prompt_embeds": pe, "negative_prompt_embeds": npe, "guidance_scale": 5.0}
    if img2img:
        call["image"] = torch.rand(1, 3, 4, 4, generator=_seeded(2)) * 2 - 1
        call["strength"] = 0.6
    else:
        call["height"] = call["width"] = 8  # StableDiffusionPipeline needs multiples of 8
    return call


def sd_inpaint(scheduler_name: str = "euler"):
    """StableDiffusionInpaintPipeline on the tiny SD components (a 4-channel U-Net: the pipeline blends the
    known region back into the latents after every step, outside the scheduler)."""
    from diffusers import StableDiffusionInpaintPipeline

    return quiet(StableDiffusionInpaintPipeline(**sd(scheduler_name).components))


def sd_inpaint_call(strength: float = 0.5) -> dict:
    """The img2img call plus a mask that repaints the left half (latent columns 0 and 1)."""
    call = sd_call(img2img=True)
    call["mask_image"] = (torch.arange(16).reshape(1, 1, 4, 4) % 4 < 2).float()
    call["strength"] = strength
    return call


# ---- DiT -------------------------------------------------------------------------------------------------


def dit():
    """DiTPipeline (class-conditional, learned sigma, guidance on a doubled batch) with DDIM."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=4,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_num_groups=1,
    )
    return quiet(DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler(clip_sample=False)))


def dit_call() -> dict:
    return {"class_labels": [1, 2], "guidance_scale": 4.0}


def sd_with(scheduler):
    """The tiny text-to-image Stable Diffusion pipeline driven by ``scheduler``."""
    pipe = sd()
    return quiet(type(pipe)(**{**pipe.components, "scheduler": scheduler}))


SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def flux_pair():
    """``(fp, q)``: the FLUX.1-dev-style tiny pipeline and its w4a4 twin (a factory for distributed calibration)."""
    fp = flux(True)
    return fp, twin(fp)
