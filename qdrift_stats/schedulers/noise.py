"""Stochastic samplers: the noise a step injects, for the marginal-preserving correction.

A stochastic step is ``x_{i+1} = mean_i(x_i, m_i) + s_i z_i`` with fresh standard normal ``z_i``
(ancestral Euler, DDPM, LCM, SDE DPM-Solver++). The adapter knows ``s_i`` from the grid
(:meth:`~qdrift_stats.schedulers.base.SchedulerAdapter.noise_std`); the step itself draws ``z_i``
with diffusers' ``randn_tensor``. :func:`capture_step_noise` records the tensors a step draws, so
the correction can rescale exactly the injected part ``s_i z_i`` without re-implementing the step
(see ``docs/method.md``, "Stochastic samplers").

Formulas shared by the adapters (``sigma = b / a``, the VE-equivalent level):

- an ancestral (eta = 1) step from ``sigma`` to ``sigma_next`` injects, in state units,
  ``s = a_next * (sigma_next / sigma) * sqrt(sigma^2 - sigma_next^2)`` (Euler ancestral with
  ``a = 1``; DDPM's ``fixed_small`` posterior variance ``beta~`` with ``a = sqrt(abar)``);
- SDE DPM-Solver++ injects ``s = b_next * sqrt(1 - exp(-2 h))`` with ``h = lambda_next - lambda``,
  ``lambda = log(a / b)``;
- LCM re-noises the consistency estimate completely: ``s = b_next``.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager

import numpy as np
import torch

from qdrift_stats.errors import QDriftError

_lock = threading.Lock()


def ancestral_noise_std(a: np.ndarray, b: np.ndarray, a_next: np.ndarray, b_next: np.ndarray) -> np.ndarray:
    """``(steps,)`` noise std of an ancestral (eta = 1) step, in state units (module docstring)."""
    a, b, a_next, b_next = (np.asarray(v, dtype=np.float64) for v in (a, b, a_next, b_next))
    sigma, sigma_next = b / a, b_next / a_next
    with np.errstate(divide="ignore", invalid="ignore"):
        s = a_next * (sigma_next / sigma) * np.sqrt(np.clip(sigma**2 - sigma_next**2, 0.0, None))
    return np.where((b > 0) & np.isfinite(s), s, 0.0)


def sde_dpmpp_noise_std(a: np.ndarray, b: np.ndarray, a_next: np.ndarray, b_next: np.ndarray) -> np.ndarray:
    """``(steps,)`` noise std of an SDE DPM-Solver++ step (module docstring); 0 onto ``b_next = 0``."""
    a, b, a_next, b_next = (np.asarray(v, dtype=np.float64) for v in (a, b, a_next, b_next))
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.log(a_next / b_next) - np.log(a / b)
        s = b_next * np.sqrt(np.clip(1.0 - np.exp(-2.0 * h), 0.0, None))
    return np.where((b_next > 0) & np.isfinite(s), s, 0.0)


class NoiseCapture:
    """The tensors diffusers' ``randn_tensor`` returned inside one ``with`` block."""

    def __init__(self) -> None:
        self.draws: list[torch.Tensor] = []

    @property
    def noise(self) -> torch.Tensor | None:
        """The one noise tensor the step drew (``None`` if it drew none)."""
        if not self.draws:
            return None
        if len(self.draws) > 1:
            raise QDriftError(
                f"the scheduler step drew {len(self.draws)} noise tensors; cannot isolate the injected noise"
            )
        return self.draws[0]


@contextmanager
def capture_step_noise(scheduler):
    """Record the noise ``scheduler.step`` draws (its module's ``randn_tensor``), leaving it unchanged.

    The patch is process-wide while the block runs; a lock serialises blocks across threads.
    """
    module = sys.modules.get(type(scheduler).__module__)
    original = getattr(module, "randn_tensor", None)
    capture = NoiseCapture()
    if original is None:  # a scheduler that draws no noise through randn_tensor
        yield capture
        return

    def recording(*args, **kwargs):
        value = original(*args, **kwargs)
        capture.draws.append(value)
        return value

    with _lock:
        module.randn_tensor = recording
        try:
            yield capture
        finally:
            module.randn_tensor = original


__all__ = ["NoiseCapture", "ancestral_noise_std", "capture_step_noise", "sde_dpmpp_noise_std"]
