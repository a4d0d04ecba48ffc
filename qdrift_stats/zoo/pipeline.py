"""The digits U-Net as a class-conditional diffusers pipeline (``data/digits_pipeline``).

:class:`DigitsPipeline` is a plain ``DiffusionPipeline`` (``unet`` + ``scheduler``, no VAE: the
model works on 1 x 8 x 8 pixels in ``[-1, 1]``) with classifier-free guidance as the zoo's pairs do
(:class:`qdrift_stats.zoo.pairs.DiffusersPair`: the conditional and the null-class halves in one
batch, conditional first). It lets the pipeline tools (``calibrate_pipeline``, ``qdrift calibrate``,
``QDriftScheduler``) run offline end to end on a shipped model::

    pipe = DigitsPipeline.from_pretrained("data/digits_pipeline")
    images = pipe(class_labels=[3, 7], num_inference_steps=25, guidance_scale=2.0,
                  generator=torch.Generator().manual_seed(0)).images   # (2, 1, 8, 8) in [0, 1]
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from qdrift_stats.errors import QDriftError
from qdrift_stats.zoo.data import NULL_CLASS, NUM_CLASSES

#: The shipped pipeline folder (``unet`` links to ``data/digits_unet``).
PIPELINE_FOLDER = Path(__file__).resolve().parents[2] / "data" / "digits_pipeline"


class DigitsPipeline(DiffusionPipeline):
    """Class-conditional sampling with the digits U-Net (module docstring)."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int],
        num_inference_steps: int = 25,
        guidance_scale: float = 2.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
    ):
        labels = torch.as_tensor(list(class_labels), dtype=torch.long).reshape(-1)
        if labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES:
            raise QDriftError(f"class labels must be digits 0..{NUM_CLASSES - 1}, got {list(class_labels)}")
        device, dtype = self.unet.device, self.unet.dtype
        size = int(self.unet.config.sample_size)
        shape = (labels.numel(), int(self.unet.config.in_channels), size, size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = latents * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        extra = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        labels = labels.to(device)
        null = torch.full_like(labels, NULL_CLASS)
        guided = float(guidance_scale) != 1.0
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            timestep = torch.as_tensor(t, device=device).to(torch.float32).reshape(-1).expand(model_input.shape[0])
            out = self.unet(model_input, timestep, class_labels=torch.cat([labels, null]) if guided else labels).sample
            if guided:
                cond, uncond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(out, t, latents, **extra).prev_sample
        images = latents if output_type == "latent" else (latents / 2 + 0.5).clamp(0, 1)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


__all__ = ["DigitsPipeline", "PIPELINE_FOLDER"]
