"""Sampling loops: plain diffusers sampling, optionally Q-Drift-corrected, in the k-diffusion style.

The loop is exactly the one a diffusers pipeline runs,

    x = randn(batch, *sample_shape) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t, **cond)
        x = scheduler.step(out, t, x).prev_sample

with one optional hook after each step: a :class:`Corrector` that moves ``x`` by the Q-Drift
correction, using only the step's own model output (no extra model call).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch

from .correction import apply_correction, correction_coefficients
from .errors import QDriftError
from .pair import pair_conditions, pair_device, pair_dtype
from .schedulers import StepGrid, make_scheduler, step_kwargs

ModelFn = Callable[..., torch.Tensor]
StepCallback = Callable[[dict[str, Any]], None]


class Corrector:
    """Applies the Q-Drift correction after each scheduler step of one sampling run.

    Args:
        grid: the scheduler's step coordinates.
        coefficients: ``(steps,)`` or ``(steps, channels)`` pull coefficients ``c_i`` (see
            :func:`qdrift_stats.correction.correction_coefficients`).
        device, dtype: those of the sampler's state; coefficients are moved there once.
        k, mu: optional ``(steps[, channels])`` decomposition of the output error
            ``m_q - m_fp = k m_fp + mu + r``; the output is first mapped to ``(m_q - mu) / (1 + k)``.
    """

    def __init__(
        self,
        grid: StepGrid,
        coefficients: np.ndarray,
        device: torch.device,
        dtype: torch.dtype,
        k: np.ndarray | None = None,
        mu: np.ndarray | None = None,
    ):
        coefficients = np.asarray(coefficients, dtype=np.float64)
        if coefficients.shape[0] != grid.num_steps:
            raise QDriftError(f"correction has {coefficients.shape[0]} steps but the sampler has {grid.num_steps}")
        self.grid = grid
        self._host = (coefficients, k, mu)  # float64 originals, for :meth:`to`
        self.coefficients = torch.as_tensor(coefficients, device=device, dtype=dtype)
        # Decided on the host once: steps whose coefficient is 0 everywhere are skipped entirely.
        self.active: list[bool] = [bool(np.any(row != 0)) for row in coefficients.reshape(grid.num_steps, -1)]
        self.scale = self.shift = None
        self.output_active = [False] * grid.num_steps
        if k is not None or mu is not None:
            k = np.zeros_like(coefficients) if k is None else np.asarray(k, dtype=np.float64)
            mu = np.zeros_like(k) if mu is None else np.asarray(mu, dtype=np.float64)
            if k.shape[0] != grid.num_steps or mu.shape[0] != grid.num_steps:
                raise QDriftError(f"decomposition has {k.shape[0]} steps but the sampler has {grid.num_steps}")
            if np.any(1.0 + k <= 0):
                raise QDriftError("decomposition coefficient k must be > -1 at every step")
            self.scale = torch.as_tensor(1.0 / (1.0 + k), device=device, dtype=dtype)
            self.shift = torch.as_tensor(mu, device=device, dtype=dtype)
            self.output_active = [bool(np.any(kk != 0) or np.any(mm != 0)) for kk, mm in zip(k.reshape(len(k), -1), mu.reshape(len(mu), -1))]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "Corrector":
        """The same correction with its per-step tensors on ``device`` in ``dtype`` (one transfer each,
        from the float64 host values, so no precision is lost on the way)."""
        coefficients, k, mu = self._host
        return Corrector(self.grid, coefficients, torch.device(device), dtype, k=k, mu=mu)

    def correct_output(self, i: int, model_output: torch.Tensor) -> torch.Tensor:
        """The decomposition's output correction ``(m_q - mu_i) / (1 + k_i)`` (identity without one)."""
        if not self.output_active[i]:
            return model_output
        return _channelwise(self.scale[i], model_output) * (model_output - _channelwise(self.shift[i], model_output))

    @classmethod
    def from_variance(
        cls,
        grid: StepGrid,
        variance: np.ndarray,
        form: str,
        strength: float,
        device: torch.device,
        dtype: torch.dtype,
    ) -> "Corrector":
        return cls(grid, correction_coefficients(variance, grid.b_next, form, strength), device, dtype)

    def __call__(self, i: int, x: torch.Tensor, model_output: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
        """Corrected ``x_next`` for step ``i`` (``x``: state before the step, same shapes)."""
        if not self.active[i]:
            return x_next
        x0_hat = self.grid.x0_from_output(i, x, model_output)
        return apply_correction(x_next, x0_hat, float(self.grid.a_next[i]), self.coefficients[i])


def _channelwise(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a 0-d or ``(channels,)`` tensor over ``(batch, channels, ...)``."""
    return value.reshape((1, -1) + (1,) * (like.ndim - 2)) if value.ndim else value


def scale_model_input(scheduler, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``scheduler.scale_model_input(x, t)``, or ``x`` for schedulers without it (flow matching)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return scale(x, t) if scale is not None else x


def initial_noise(pair: Any, scheduler, batch_size: int, seed: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """The starting state and the conditions of one run.

    One ``torch.Generator`` (CPU, seeded with ``seed``) draws the noise ``(batch, *sample_shape)``
    first, then the pair's conditions, so a seed fixes both. The noise is drawn in float32 on the
    CPU (as diffusers' ``randn_tensor`` does for a CPU generator), then moved to the pair's device
    and dtype and scaled by ``init_noise_sigma``.
    """
    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((batch_size, *pair.sample_shape), generator=generator, dtype=torch.float32)
    cond = pair_conditions(pair, batch_size, generator)
    x = noise.to(device=pair_device(pair), dtype=pair_dtype(pair))
    init_sigma = getattr(scheduler, "init_noise_sigma", None)  # flow-matching schedulers have none
    if init_sigma is not None:
        x = x * init_sigma
    return x, cond


def run_sampler(
    model: ModelFn,
    scheduler,
    x: torch.Tensor,
    cond: dict[str, Any] | None = None,
    corrector: Corrector | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Run a configured scheduler from state ``x``; return the final state.

    Args:
        model: ``model(model_input, timestep, **cond) -> output`` (a pair's ``fp`` or ``q``).
        scheduler: a diffusers scheduler after ``set_timesteps``.
        x: ``(batch, *sample_shape)`` initial state (already scaled by ``init_noise_sigma``).
        corrector: optional Q-Drift correction applied after each step.
        callback: optional, called after each step with ``{"i", "t", "x", "x_next", "output"}``.
    """
    cond = cond or {}
    kwargs = step_kwargs(scheduler)
    for i, t in enumerate(scheduler.timesteps):
        model_input = scale_model_input(scheduler, x, t)
        output = model(model_input, t, **cond)
        if corrector is not None:
            output = corrector.correct_output(i, output)
        x_next = scheduler.step(output, t, x, **kwargs, return_dict=False)[0]
        if corrector is not None:
            x_next = corrector(i, x, output, x_next)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x_next": x_next, "output": output})
        x = x_next
    return x


def prepared_scheduler(pair: Any, scheduler_name: str, steps: int):
    """A fresh scheduler of the given name for the pair, with ``set_timesteps(steps)`` done."""
    if not isinstance(steps, int) or steps < 1:
        raise QDriftError(f"--steps must be a positive integer, got {steps!r}")
    scheduler = make_scheduler(scheduler_name, pair.scheduler_config)
    scheduler.set_timesteps(steps, device=pair_device(pair))
    return scheduler


def batch_seeds(num_samples: int, batch_size: int, seed: int) -> Iterator[tuple[int, int]]:
    """``(seed, size)`` of each batch: batch ``k`` uses ``seed + k``; the last may be smaller."""
    if num_samples < 1 or batch_size < 1:
        raise QDriftError("--num-samples and --batch must be positive")
    for k, start in enumerate(range(0, num_samples, batch_size)):
        yield seed + k, min(batch_size, num_samples - start)


def sample(
    pair: Any,
    scheduler_name: str,
    steps: int,
    num_samples: int,
    batch_size: int,
    seed: int,
    model: str = "q",
    estimator=None,
    correction: str | None = None,
    strength: float | None = None,
    progress: Callable[[Iterator], Iterator] | None = None,
) -> np.ndarray:
    """Draw ``num_samples`` final clean samples, float32 ``(M, *sample_shape)``.

    Args:
        model: ``"fp"`` or ``"q"``.
        estimator: an :class:`qdrift_stats.export.EstimatorFile` (or ``None``: no correction). Its
            correction form and strength are used unless ``correction`` / ``strength`` are given.
    """
    if model not in ("fp", "q"):
        raise QDriftError(f"--model must be fp or q, got {model!r}")
    model_fn = pair.fp if model == "fp" else pair.q
    outputs = []
    batches = batch_seeds(num_samples, batch_size, seed)
    for batch_seed, size in progress(batches) if progress else batches:
        scheduler = prepared_scheduler(pair, scheduler_name, steps)
        x, cond = initial_noise(pair, scheduler, size, batch_seed)
        corrector = None
        if estimator is not None:
            corrector = estimator.corrector(scheduler, correction=correction, strength=strength, device=x.device, dtype=x.dtype)
        with torch.no_grad():
            x = run_sampler(model_fn, scheduler, x, cond, corrector)
        outputs.append(x.detach().float().cpu().numpy())
    return np.concatenate(outputs, axis=0).astype(np.float32)
