"""The Q-Drift corrector: the per-step update applied after a scheduler step, on the state's device.

A :class:`Corrector` holds, for one step grid, the pull coefficients ``c_i`` (and optionally the
PTQD-style output decomposition ``k_i, mu_i``) as tensors on the sampler's device and dtype; the
denoising loop (:func:`qdrift_stats.loop.run_sampler`) or the diffusers wrapper
(:class:`qdrift_stats.correct.diffusers.QDriftScheduler`) calls it once per step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qdrift_stats.correct.coefficients import apply_correction, channelwise, correction_coefficients
from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators.output_map import LOCAL_ITERATIONS, invert_local, local_state_term
from qdrift_stats.schedulers import StepGrid


class Corrector:
    """Applies the Q-Drift correction after each scheduler step of one sampling run.

    Args:
        grid: the scheduler's step coordinates.
        coefficients: ``(steps,)`` or ``(steps, channels)`` pull coefficients ``c_i`` (see
            :func:`qdrift_stats.correct.coefficients.correction_coefficients`).
        device, dtype: those of the sampler's state; coefficients are moved there once.
        k, mu: optional ``(steps[, channels])`` decomposition of the output error
            ``m_q - m_fp = k m_fp + mu + r``; the output is first mapped to ``(m_q - mu) / (1 + k)``.
        channel_axis: the state's channel axis for per-channel values (1; -1 for packed token latents).
        noise_factor: optional ``(steps[, channels])`` ``f_i`` of a stochastic sampler: the step's
            injected noise ``z`` (shown to :meth:`__call__`) is lowered, ``x_{i+1} - f_i z``
            (:func:`qdrift_stats.correct.coefficients.stochastic_split`).
        output_map: optional affine output map (:class:`AffineOutputMap`), applied to the model output after
            ``k, mu``.
    """

    def __init__(
        self,
        grid: StepGrid,
        coefficients: np.ndarray,
        device: torch.device,
        dtype: torch.dtype,
        k: np.ndarray | None = None,
        mu: np.ndarray | None = None,
        channel_axis: int = 1,
        noise_factor: np.ndarray | None = None,
        output_map: AffineOutputMap | None = None,
    ):
        coefficients = np.asarray(coefficients, dtype=np.float64)
        self.channel_axis = int(channel_axis)
        self._noise_host = None if noise_factor is None else np.asarray(noise_factor, dtype=np.float64)
        if coefficients.shape[0] != grid.num_steps:
            raise QDriftError(f"correction has {coefficients.shape[0]} steps but the sampler has {grid.num_steps}")
        self.grid = grid
        self._host = (coefficients, k, mu)  # float64 originals, for :meth:`to`
        self.coefficients = torch.as_tensor(coefficients, device=device, dtype=dtype)
        # Decided on the host once: steps whose coefficient is 0 everywhere are skipped entirely.
        self.pull_active: list[bool] = [bool(np.any(row != 0)) for row in coefficients.reshape(grid.num_steps, -1)]
        self.noise_active: list[bool] = [False] * grid.num_steps
        self.noise_factor = None
        if self._noise_host is not None:
            if self._noise_host.shape[0] != grid.num_steps:
                raise QDriftError(
                    f"noise correction has {self._noise_host.shape[0]} steps but the sampler has {grid.num_steps}"
                )
            self.noise_active = [bool(np.any(row != 0)) for row in self._noise_host.reshape(grid.num_steps, -1)]
            self.noise_factor = torch.as_tensor(self._noise_host, device=device, dtype=dtype)
        self.active: list[bool] = [p or n for p, n in zip(self.pull_active, self.noise_active)]
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
            self.output_active = [
                bool(np.any(kk != 0) or np.any(mm != 0))
                for kk, mm in zip(k.reshape(len(k), -1), mu.reshape(len(mu), -1))
            ]
        self.output_map = None if output_map is None else output_map.to(device, dtype)
        if self.output_map is not None:
            if self.output_map.num_steps != grid.num_steps:
                raise QDriftError(
                    f"output map has {self.output_map.num_steps} steps but the sampler has {grid.num_steps}"
                )
            self.output_active = [a or m for a, m in zip(self.output_active, self.output_map.active)]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Corrector:
        """The same correction with its per-step tensors on ``device`` in ``dtype`` (one transfer each,
        from the float64 host values, so no precision is lost on the way)."""
        coefficients, k, mu = self._host
        return Corrector(
            self.grid,
            coefficients,
            torch.device(device),
            dtype,
            k=k,
            mu=mu,
            channel_axis=self.channel_axis,
            noise_factor=self._noise_host,
            output_map=self.output_map,
        )

    @property
    def needs_noise(self) -> bool:
        """Whether some step lowers the sampler's injected noise (the loop must show the step's noise)."""
        return any(self.noise_active)

    def correct_output(self, i: int, model_output: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """The output correction: the decomposition's ``(m_q - mu_i) / (1 + k_i)``, then the affine output map's
        ``m - offset_i - L_i (m - center_i)`` (identity without either). ``state``: the scheduler's sample the
        output was computed from (``(batch, *sample_shape)``), needed by a state-aware map only."""
        if not self.output_active[i]:
            return model_output
        if self.scale is not None:
            axis = self.channel_axis
            _check_channels(self.scale, model_output, axis, "decomposition")
            scale, shift = (
                channelwise(self.scale[i], model_output, axis),
                channelwise(self.shift[i], model_output, axis),
            )
            model_output = scale * (model_output - shift)
        if self.output_map is not None and self.output_map.active[i]:
            model_output = self.output_map(i, model_output, state)
        return model_output

    @classmethod
    def from_variance(
        cls,
        grid: StepGrid,
        variance: np.ndarray,
        form: str,
        strength: float,
        device: torch.device,
        dtype: torch.dtype,
    ) -> Corrector:
        return cls(grid, correction_coefficients(variance, grid.b_next, form, strength), device, dtype)

    def __call__(
        self,
        i: int,
        x: torch.Tensor,
        model_output: torch.Tensor,
        x_next: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Corrected ``x_next`` for step ``i`` (``x``: state before the step, same shapes; ``noise``: the
        standard normal tensor a stochastic step drew, needed where the injected noise is lowered)."""
        if not self.active[i]:
            return x_next
        _check_channels(self.coefficients, x_next, self.channel_axis, "estimator")
        if self.noise_active[i]:
            if noise is None:
                raise QDriftError(f"step {i} injects noise that the correction lowers, but the sampler did not show it")
            x_next = x_next - channelwise(self.noise_factor[i], x_next, self.channel_axis) * noise.to(x_next.dtype)
        if not self.pull_active[i]:
            return x_next
        x0_hat = self.grid.x0_from_output(i, x, model_output)
        return apply_correction(x_next, x0_hat, float(self.grid.a_next[i]), self.coefficients[i], self.channel_axis)


class IncrementCorrector(Corrector):
    """The published Q-Drift code's update: the step's increment rescaled, ``x_{i+1} + c_i (x_{i+1} - ratio_i x_i)``.

    ``coefficients``: ``(steps[, channels])`` ``c_i`` and ``ratio``: ``(steps,)`` (see
    :func:`qdrift_stats.correct.coefficients.published_coefficients`). The output map ``k, mu``
    (the conditional-mean bias) works as for :class:`Corrector`.
    """

    def __init__(self, grid, coefficients, ratio, device, dtype, k=None, mu=None, channel_axis: int = 1):
        super().__init__(grid, coefficients, device, dtype, k=k, mu=mu, channel_axis=channel_axis)
        self._ratio_host = np.asarray(ratio, dtype=np.float64)
        self.ratio = [float(r) for r in self._ratio_host]

    def to(self, device, dtype) -> IncrementCorrector:
        coefficients, k, mu = self._host
        return IncrementCorrector(
            self.grid,
            coefficients,
            self._ratio_host,
            torch.device(device),
            dtype,
            k=k,
            mu=mu,
            channel_axis=self.channel_axis,
        )

    def __call__(self, i, x, model_output, x_next):
        if not self.active[i]:
            return x_next
        c = channelwise(self.coefficients[i], x_next, self.channel_axis)
        return x_next + c * (x_next - self.ratio[i] * x)


class AffineOutputMap:
    """The affine output map on the sampler's device and dtype: the corrected output solves
    ``m = m_q - offset_i - K_i (m - c_i)`` (``c_i = center_i - offset_i``; see
    :mod:`qdrift_stats.estimators.output_map`), less the state's part for a state-aware map.

    Fitted by :mod:`qdrift_stats.estimators.output_map` and carried by estimator files (``map_center``,
    ``map_offset``, ``map_weight``; ``map_state_center``, ``map_state_weight``). Pure tensor operations, no host
    synchronisation.

    Args:
        structure: ``"mean"`` (no ``weight``: ``m_q - offset_i``), ``"local"`` (``weight`` ``(steps, C, C, k, k)``,
            ``K_i`` a convolution with zero padding, inverted by ``iterations`` fixed-point steps) or ``"full"``
            (``weight`` ``(steps, D, D)`` ``W_i = I - (I + K_i)^{-1}``: ``m_q - offset_i - (m_q - center_i) W_i``).
        center, offset: ``(steps, *sample_shape)``, output units.
        active: per step, whether the map does anything there (a step outside a calibrated img2img range does not).
        state_center, state_weight: a state-aware map's state part (both or neither): ``(steps, *sample_shape)`` the
            mean FP state, and local ``(steps, C, C, k, k)`` the kernels of ``L_i`` (``L_i (x - xbar_i)`` is
            subtracted inside the fixed point) or full ``(steps, D, D)`` ``M_i`` (``(x - xbar_i) M_i`` is
            subtracted). Calls then need the state.
    """

    def __init__(
        self,
        structure: str,
        center: Any,
        offset: Any,
        weight: Any = None,
        active: list[bool] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        iterations: int = LOCAL_ITERATIONS,
        state_center: Any = None,
        state_weight: Any = None,
    ):
        if structure not in ("mean", "local", "full") or (weight is None) != (structure == "mean"):
            raise QDriftError(f"an output map of structure {structure!r} needs {'no ' if weight is None else ''}weight")
        if (state_center is None) != (state_weight is None) or (state_weight is not None and weight is None):
            raise QDriftError("a state-aware output map needs both state tensors and a slope (local or full)")
        self.structure = structure
        self._host = (center, offset, weight, state_center, state_weight)
        self.center = torch.as_tensor(np.asarray(center), device=device, dtype=dtype)
        self.offset = torch.as_tensor(np.asarray(offset), device=device, dtype=dtype)
        self.weight = None if weight is None else torch.as_tensor(np.asarray(weight), device=device, dtype=dtype)
        self.state_center, self.state_weight = (
            None if a is None else torch.as_tensor(np.asarray(a), device=device, dtype=dtype)
            for a in (state_center, state_weight)
        )
        self.num_steps = int(self.center.shape[0])
        self.active = [True] * self.num_steps if active is None else list(active)
        self.iterations = int(iterations)

    @property
    def uses_state(self) -> bool:
        """Whether the map needs the sampler state beside the model output."""
        return self.state_weight is not None

    def to(self, device: torch.device | str, dtype: torch.dtype) -> AffineOutputMap:
        center, offset, weight, state_center, state_weight = self._host
        return AffineOutputMap(
            self.structure, center, offset, weight, self.active, device, dtype, self.iterations,
            state_center, state_weight,
        )  # fmt: skip

    def __call__(self, i: int, output: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """The mapped output ``(batch, *sample_shape)`` of step ``i`` (shapes checked, values not); ``state``, the
        scheduler's sample the output was computed from, for a state-aware map."""
        if tuple(output.shape[1:]) != tuple(self.center.shape[1:]):
            raise QDriftError(
                f"the output map was fitted for samples of shape {tuple(self.center.shape[1:])}, the model output "
                f"has {tuple(output.shape[1:])}; fit it on a store of this model and resolution"
            )
        if self.weight is None:
            return output - self.offset[i]
        ds = None
        if self.uses_state:
            if state is None or tuple(state.shape) != tuple(output.shape):
                raise QDriftError(
                    "this output map regresses on the sampler state: it needs the state the output was computed from, "
                    f"of the output's shape {tuple(output.shape)}"
                )
            ds = state.to(output.dtype) - self.state_center[i]
        if self.structure == "local":
            term = None if ds is None else local_state_term(ds, 0.0, self.state_weight[i])
            return invert_local(output, self.offset[i], self.center[i], self.weight[i], self.iterations, term)
        d = output - self.center[i]
        out = output - self.offset[i] - (d.reshape(len(d), -1) @ self.weight[i]).reshape(d.shape)
        if ds is not None:
            out = out - (ds.reshape(len(ds), -1) @ self.state_weight[i]).reshape(d.shape)
        return out


def _check_channels(per_step: torch.Tensor, like: torch.Tensor, axis: int, what: str) -> None:
    """Refuse a per-channel correction whose channel count is not the state's (shapes only, no sync)."""
    if per_step.ndim == 2 and (like.ndim < 2 or like.shape[axis % like.ndim] != per_step.shape[1]):
        raise QDriftError(
            f"the {what} is per channel with {per_step.shape[1]} channels, the samples have shape "
            f"{tuple(like.shape[1:])}; fit it on a store of this model"
        )
