"""A class-conditional model pair, runnable offline: copy this file and replace the two models.

The data: 4 classes in 8 dimensions; class ``y`` is the Gaussian ``N(mean_y, 0.3^2 I)``. The FP
model is the exact class-conditional epsilon predictor (so no training and no download); the
"quantized" model adds a deterministic noise-like error of amplitude 0.5, as a real PTQ model's
rounding would. ``conditions`` draws the class labels of a batch, and the sampler passes them to
both models as ``class_labels=...`` (the keyword a diffusers class-conditional UNet takes).

Use it from the command line (``qdrift record --pair ./my_pairs.py:make_pair ...`` after copying
this file to ``my_pairs.py``, or directly as ``--pair qdrift_stats.examples.conditional_pair:make_pair``).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMScheduler

from qdrift_stats.testbed import VP_SCHEDULER_CONFIG, NoiseLikeError, default_mixture


class ConditionalPair:
    """The pair protocol (see :mod:`qdrift_stats.pair`): ``sample_shape``, ``scheduler_config``,
    ``fp``, ``q`` and ``conditions``."""

    def __init__(self, amplitude: float = 0.5):
        mixture = default_mixture()
        self.means = mixture.means  # (classes, 8) float64
        self.std = mixture.std
        self.num_classes = self.means.shape[0]
        self.sample_shape = (self.means.shape[1],)
        self.scheduler_config = dict(VP_SCHEDULER_CONFIG)  # epsilon prediction, scaled-linear betas
        # the training noise levels sigma_t = sqrt((1 - abar_t) / abar_t) of the scheduler config
        abar = DDPMScheduler.from_config(self.scheduler_config).alphas_cumprod.double()
        self._sigmas = ((1.0 - abar) / abar).sqrt()
        self.error = NoiseLikeError(self.means.shape[1], amplitude=amplitude)

    def conditions(self, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        """The class labels of one batch, drawn from the sampler's generator (same seed, same labels)."""
        return {"class_labels": torch.randint(self.num_classes, (batch_size,), generator=generator)}

    def _levels(self, timestep: torch.Tensor) -> tuple[float, float]:
        t = float(timestep)
        grid = torch.arange(len(self._sigmas), dtype=torch.float64)
        lo = int(min(max(t, 0.0), len(grid) - 1))
        hi = min(lo + 1, len(grid) - 1)
        w = t - lo
        sigma = float((1 - w) * self._sigmas[lo] + w * self._sigmas[hi])
        alpha = (1.0 + sigma * sigma) ** -0.5
        return alpha, sigma * alpha

    def fp(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """Exact epsilon of the class-conditional Gaussian for the (scaled) input ``(batch, 8)``."""
        a, b = self._levels(timestep)
        x = sample.double()
        mean = self.means[class_labels.to(torch.long)]
        gain = a * self.std**2 / (a * a * self.std**2 + b * b)
        x0 = mean + gain * (x - a * mean)
        return ((x - a * x0) / b).to(sample.dtype)

    def q(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """The FP output with a noise-like quantization error."""
        return self.error(self.fp(sample, timestep, class_labels), sample, timestep)


def make_pair() -> ConditionalPair:
    """The factory ``--pair`` names."""
    return ConditionalPair()
