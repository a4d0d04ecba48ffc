"""An analytic ground truth: a Gaussian mixture with an exact denoiser, and quantized twins of it.

Data: ``x0 ~ sum_k w_k N(mu_k, s^2 I)`` in ``d`` dimensions. For a state ``x = a x0 + b eps`` the
marginal is ``sum_k w_k N(a mu_k, (a^2 s^2 + b^2) I)`` and the exact posterior mean is

    E[x0 | x] = sum_k r_k(x) * (mu_k + a s^2 / (a^2 s^2 + b^2) * (x - a mu_k)),

with ``r_k`` the component responsibilities. The FP model returns the exact epsilon (VP pair) or
velocity ``eps - x0`` (flow pair) implied by that mean; the Q model adds a chosen error family
(:mod:`qdrift_stats.testbed.errors`). Everything is computed in float64 and returned in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qdrift_stats.schedulers.base import FLOW_PREDICTION
from qdrift_stats.testbed.errors import QuantizationError, ZeroError

VP_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": False,
}
FLOW_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "prediction_type": FLOW_PREDICTION,
}


@dataclass
class GaussianMixture:
    """Isotropic Gaussian mixture. ``means``: ``(K, d)``; ``std``: within-mode std; ``weights``: ``(K,)``."""

    means: torch.Tensor
    std: float
    weights: torch.Tensor

    @classmethod
    def random(
        cls, dim: int = 8, modes: int = 4, spread: float = 1.5, std: float = 0.3, seed: int = 0
    ) -> GaussianMixture:
        """Modes with means ``~ N(0, spread^2 I)``, equal weights, seeded."""
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(modes, dim, generator=g, dtype=torch.float64) * spread
        return cls(means, float(std), torch.full((modes,), 1.0 / modes, dtype=torch.float64))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """``(n, d)`` exact samples (float64)."""
        g = torch.Generator().manual_seed(seed)
        k = torch.multinomial(self.weights, n, replacement=True, generator=g)
        return self.means[k] + self.std * torch.randn(n, self.dim, generator=g, dtype=torch.float64)

    def _log_components(self, x: torch.Tensor, a: float, b: float) -> torch.Tensor:
        """``(n, K)`` log of ``w_k N(x; a mu_k, (a^2 s^2 + b^2) I)``."""
        var = a * a * self.std**2 + b * b
        centers = a * self.means
        sq = (x * x).sum(1, keepdim=True) - 2.0 * x @ centers.T + (centers * centers).sum(1)[None]
        return torch.log(self.weights)[None] - 0.5 * sq / var - 0.5 * self.dim * math.log(2 * math.pi * var)

    def log_prob(self, x: torch.Tensor, a: float = 1.0, b: float = 0.0) -> torch.Tensor:
        """``(n,)`` log density of the marginal at level ``(a, b)`` (default: the data)."""
        return torch.logsumexp(self._log_components(x.double(), a, b), dim=1)

    def posterior_mean(self, x: torch.Tensor, a: float, b: float) -> torch.Tensor:
        """``E[x0 | x]`` for ``x = a x0 + b eps``; ``x``: ``(n, d)`` float64."""
        resp = torch.softmax(self._log_components(x, a, b), dim=1)
        gain = a * self.std**2 / (a * a * self.std**2 + b * b)
        per_mode = self.means[None] + gain * (x[:, None, :] - a * self.means[None])
        return (resp[..., None] * per_mode).sum(dim=1)

    def assign(self, x0: torch.Tensor) -> torch.Tensor:
        """``(n,)`` index of the most likely mode of each clean sample."""
        return self._log_components(x0.double(), 1.0, 0.0).argmax(dim=1)


def _vp_levels(config: dict[str, Any]) -> np.ndarray:
    """Training sigmas ``sqrt((1 - abar) / abar)`` of a VP config, ``(num_train_timesteps,)``."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config({k: v for k, v in config.items() if k != "clip_sample"})
    abar = sched.alphas_cumprod.double().numpy()
    return np.sqrt((1.0 - abar) / abar)


@dataclass
class MixturePair:
    """A model pair (see :mod:`qdrift_stats.pair`) on a :class:`GaussianMixture`.

    ``kind``: ``"vp"`` (epsilon prediction, VP schedulers) or ``"flow"`` (velocity, flow schedulers).
    ``error``: the quantization error family applied by ``q``. ``sample_shape`` may be any shape
    with ``prod == d`` (e.g. ``(2, 2, 2)`` to look like an image).
    """

    mixture: GaussianMixture
    kind: str = "vp"
    error: QuantizationError = field(default_factory=ZeroError)
    sample_shape: tuple[int, ...] = ()
    scheduler_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in ("vp", "flow"):
            raise ValueError(f"kind must be 'vp' or 'flow', got {self.kind!r}")
        if not self.sample_shape:
            self.sample_shape = (self.mixture.dim,)
        if math.prod(self.sample_shape) != self.mixture.dim:
            raise ValueError(f"sample_shape {self.sample_shape} does not hold {self.mixture.dim} values")
        if not self.scheduler_config:
            self.scheduler_config = dict(VP_SCHEDULER_CONFIG if self.kind == "vp" else FLOW_SCHEDULER_CONFIG)
        if self.kind == "vp":
            self._train_sigmas = _vp_levels(self.scheduler_config)

    def levels(self, timestep: torch.Tensor | float) -> tuple[float, float]:
        """``(a, b)`` of the model's input at a timestep (VP: the normalised input ``x / sqrt(1 + sigma^2)``)."""
        t = float(timestep)
        if self.kind == "flow":
            s = t / float(self.scheduler_config["num_train_timesteps"])
            return 1.0 - s, s
        sigma = float(np.interp(t, np.arange(len(self._train_sigmas)), self._train_sigmas))
        alpha = 1.0 / math.sqrt(1.0 + sigma * sigma)
        return alpha, sigma * alpha

    def fp(self, sample: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        """Exact model output for the (already scaled) model input ``sample``: ``(batch, *sample_shape)``."""
        a, b = self.levels(timestep)
        x = sample.reshape(sample.shape[0], -1).double()
        x0 = self.mixture.posterior_mean(x, a, b)
        eps = (x - a * x0) / b
        out = eps if self.kind == "vp" else eps - x0
        return out.reshape(sample.shape).to(sample.dtype)

    def q(self, sample: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        """The FP output with the quantization error family applied."""
        return self.error(self.fp(sample, timestep), sample, timestep)
