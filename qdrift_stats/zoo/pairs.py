"""Model pairs over diffusers denoisers, and the digits zoo's built-in pairs.

:class:`DiffusersPair` wraps a full-precision denoiser and its quantized twin (any ``nn.Module``
with the diffusers call ``model(sample, timestep, class_labels=...)`` returning ``.sample`` or a
tuple) and implements the model-pair protocol of :mod:`qdrift_stats.pair` with classifier-free
guidance. A PTQ factory builds one as::

    fp = load_digits_unet()
    pair = DiffusersPair(fp, quantize(fp, "w4a8", calibration_inputs("unet", 32, seed=0)),
                         scheduler_config=scheduler_config("unet"))
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from qdrift_stats.errors import QDriftError
from qdrift_stats.zoo.data import NULL_CLASS, NUM_CLASSES, SAMPLE_SHAPE, load_digits_tensors
from qdrift_stats.zoo.models import MODEL_KINDS, load_digits_model, load_scheduler_config

DEFAULT_GUIDANCE_SCALE = 2.0


def _raw_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise QDriftError(f"denoiser returned {type(out).__name__}; expected a tensor, a tuple or an object with .sample")


class DiffusersPair:
    """FP and Q class-conditional diffusers denoisers with classifier-free guidance.

    ``fp(sample, timestep, class_labels=...)`` and ``q(...)`` return
    ``uncond + guidance_scale * (cond - uncond)`` of the respective model, where the conditional
    and the null-class (``null_class``) inputs run as one batch of ``2 * batch``. With
    ``guidance_scale == 1`` only the conditional call is made. ``timestep`` may be a 0-d tensor (int
    or float), a Python number or a per-sample 1-d tensor; it is cast to float32 and broadcast.
    ``class_labels`` may be omitted (then every sample is unconditional).
    ``cond`` may carry ``guidance_scale`` to override the attribute for one call.
    """

    def __init__(
        self,
        fp_model: nn.Module,
        q_model: nn.Module | None = None,
        *,
        scheduler_config: dict[str, Any],
        sample_shape: tuple[int, ...] = SAMPLE_SHAPE,
        num_classes: int = NUM_CLASSES,
        null_class: int = NULL_CLASS,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        name: str | None = None,
    ):
        self.fp_model = fp_model
        self.q_model = q_model if q_model is not None else fp_model
        self.scheduler_config = dict(scheduler_config)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.num_classes = int(num_classes)
        self.null_class = int(null_class)
        self.guidance_scale = float(guidance_scale)
        self.name = name
        try:
            param = next(fp_model.parameters())
            self.device = param.device
        except (StopIteration, AttributeError):
            self.device = torch.device("cpu")
        self.dtype = torch.float32

    def __repr__(self) -> str:
        label = self.name or type(self.fp_model).__name__
        return f"DiffusersPair({label}, guidance_scale={self.guidance_scale})"

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    def conditions(self, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        """``{"class_labels": LongTensor (batch_size,)}`` drawn uniformly from the classes with ``generator``."""
        labels = torch.randint(0, self.num_classes, (int(batch_size),), generator=generator, device=generator.device)
        return {"class_labels": labels.to(self.device)}

    def fp(self, sample: torch.Tensor, timestep: Any, **cond: Any) -> torch.Tensor:
        """Guided raw output of the full-precision model."""
        return self.guided(self.fp_model, sample, timestep, **cond)

    def q(self, sample: torch.Tensor, timestep: Any, **cond: Any) -> torch.Tensor:
        """Guided raw output of the quantized model."""
        return self.guided(self.q_model, sample, timestep, **cond)

    @torch.no_grad()
    def guided(
        self,
        model: nn.Module,
        sample: torch.Tensor,
        timestep: Any,
        class_labels: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        **extra: Any,
    ) -> torch.Tensor:
        """Classifier-free guided output of ``model`` (see the class docstring)."""
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        batch = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).to(torch.float32).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        elif t.numel() != batch:
            raise QDriftError(f"timestep has {t.numel()} entries for a batch of {batch}")
        null = torch.full((batch,), self.null_class, dtype=torch.long, device=sample.device)
        labels = null if class_labels is None else torch.as_tensor(class_labels, device=sample.device).long()
        labels = labels.reshape(-1).expand(batch) if labels.numel() == 1 else labels.reshape(-1)
        if class_labels is None or scale == 1.0:
            out = _raw_output(model(sample, t, class_labels=labels, **extra))
            return out.reshape(sample.shape)
        out = _raw_output(
            model(torch.cat([sample, sample]), torch.cat([t, t]), class_labels=torch.cat([labels, null]), **extra)
        )
        cond_out, uncond_out = out.reshape(2 * batch, *sample.shape[1:]).chunk(2)
        return uncond_out + scale * (cond_out - uncond_out)


def digits_pair(
    kind: str,
    q_model: nn.Module | None = None,
    *,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    path: str | None = None,
    name: str | None = None,
) -> DiffusersPair:
    """A pair over the shipped digits model ``kind`` (``"unet"``/``"dit"``); ``q_model`` defaults to the FP model."""
    fp_model = load_digits_model(kind, path)
    return DiffusersPair(
        fp_model,
        q_model,
        scheduler_config=load_scheduler_config(kind, path),
        guidance_scale=guidance_scale,
        name=name or f"digits_{kind}",
    )


def digits_unet_fp() -> DiffusersPair:
    """The digits UNet paired with itself (``q`` is the FP model: a zero-error baseline)."""
    return digits_pair("unet", name="digits_unet_fp")


def digits_dit_fp() -> DiffusersPair:
    """The digits flow-matching DiT paired with itself (``q`` is the FP model: a zero-error baseline)."""
    return digits_pair("dit", name="digits_dit_fp")


def calibration_inputs(
    model_kind: str,
    n: int = 32,
    seed: int = 0,
    batch_size: int = 16,
) -> list[tuple[tuple[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]]:
    """``n`` model calls ``(args, kwargs)`` for activation statistics of a digits denoiser.

    Each call is ``model(*args, **kwargs)`` with ``args = (noisy, timesteps)`` and
    ``kwargs = {"class_labels": labels}`` shaped like a guided sampling call: ``batch_size`` training
    digits noised to one random level (VP: ``sqrt(abar) x0 + sqrt(1 - abar) eps`` at an integer
    timestep; flow: ``(1 - s) x0 + s eps`` at timestep ``1000 s``), duplicated with the true labels in
    the first half and the null class in the second (``2 * batch_size`` rows). Deterministic in ``seed``.
    """
    if model_kind not in MODEL_KINDS:
        raise QDriftError(f"model_kind must be one of {', '.join(MODEL_KINDS)}, got {model_kind!r}")
    if n < 1 or batch_size < 1:
        raise QDriftError(f"calibration needs n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    x0_all, y_all = load_digits_tensors("train")
    gen = torch.Generator().manual_seed(int(seed))
    if model_kind == "unet":
        from qdrift_stats.zoo.models import UNET_SCHEDULER_CONFIG as cfg

        betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"], dtype=torch.float64)
        abar = torch.cumprod(1.0 - betas, 0).float()
    calls = []
    for _ in range(int(n)):
        idx = torch.randint(0, len(y_all), (batch_size,), generator=gen)
        x0, labels = x0_all[idx], y_all[idx]
        eps = torch.randn(x0.shape, generator=gen)
        if model_kind == "unet":
            t_int = int(torch.randint(0, 1000, (1,), generator=gen))
            a = abar[t_int]
            x = a.sqrt() * x0 + (1 - a).sqrt() * eps
            t = float(t_int)
        else:
            s = float(torch.rand((1,), generator=gen))
            x = (1 - s) * x0 + s * eps
            t = 1000.0 * s
        timesteps = torch.full((2 * batch_size,), t, dtype=torch.float32)
        null = torch.full((batch_size,), NULL_CLASS, dtype=torch.long)
        calls.append(((torch.cat([x, x]), timesteps), {"class_labels": torch.cat([labels, null])}))
    return calls


_SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp-2m": "DPMSolverMultistepScheduler",
    "flow-euler": "FlowMatchEulerDiscreteScheduler",
}


def _make_scheduler(cls: Any, config: dict[str, Any]) -> Any:
    # diffusers logs unexpected keys (e.g. prediction_type for FlowMatchEuler) at warning level
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return cls.from_config(config)
    finally:
        logger.setLevel(level)


@torch.no_grad()
def sample_pair(
    pair: Any,
    scheduler: str = "ddim",
    steps: int = 50,
    num_samples: int = 64,
    batch_size: int = 256,
    seed: int = 0,
    model: str = "fp",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain diffusers sampling loop over ``pair.fp`` or ``pair.q``: ``(samples, class_labels)``.

    A small self-contained loop for the zoo's own evaluation (no Q-Drift correction); batch ``k``
    uses ``torch.Generator().manual_seed(seed + k)`` for its labels and initial noise.
    """
    import diffusers

    from qdrift_stats.loop import run_sampler

    if scheduler not in _SCHEDULERS:
        raise QDriftError(f"scheduler must be one of {', '.join(_SCHEDULERS)}, got {scheduler!r}")
    if model not in ("fp", "q"):
        raise QDriftError(f"model must be 'fp' or 'q', got {model!r}")
    denoise = pair.fp if model == "fp" else pair.q
    cls = getattr(diffusers, _SCHEDULERS[scheduler])
    outs, labels = [], []
    done, k = 0, 0
    while done < num_samples:
        b = min(batch_size, num_samples - done)
        gen = torch.Generator().manual_seed(int(seed) + k)
        cond = pair.conditions(b, gen) if hasattr(pair, "conditions") else {}
        sched = _make_scheduler(cls, pair.scheduler_config)
        sched.set_timesteps(steps)
        x = torch.randn((b, *pair.sample_shape), generator=gen) * float(getattr(sched, "init_noise_sigma", None) or 1.0)
        x = run_sampler(denoise, sched, x, cond)
        outs.append(x)
        labels.append(cond.get("class_labels", torch.full((b,), -1)).cpu())
        done += b
        k += 1
    return torch.cat(outs), torch.cat(labels)


__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "DiffusersPair",
    "calibration_inputs",
    "digits_dit_fp",
    "digits_pair",
    "digits_unet_fp",
    "sample_pair",
]
