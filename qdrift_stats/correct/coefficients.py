"""The Q-Drift correction as small pure functions over tensors.

After the scheduler's step ``i`` lands on the state ``x_{i+1}`` (level ``a_{i+1}, b_{i+1}``), the
correction pulls it towards ``a_{i+1} * x0_hat_i`` along the score of the next marginal:

    x_{i+1} <- x_{i+1} - c_i * (x_{i+1} - a_{i+1} * x0_hat_i)

with, for ``gamma_i = lambda * v_i / b_{i+1}^2`` (``v_i`` the per-step variance statistic,
``lambda`` the strength),

- ``drift``  (first order, as derived): ``c_i = min(gamma_i / 2, 1)``;
- ``shrink`` (exact for a Gaussian convolution, always stable): ``c_i = 1 - 1 / sqrt(1 + gamma_i)``.

Both agree to first order in ``gamma``. The drift form is clipped at ``c = 1``, where the state
lands on ``a_{i+1} x0_hat_i``: the correction must leave a fraction ``(1 - c)^2`` of the residual's
variance, a number in ``[0, 1]`` for any ``v_i >= 0``, and every ``c`` in ``(1, inf)`` gives either a
sign-flipped residual (``c < 2``) or an amplified one. ``gamma / 2 > 1`` happens only where the
first-order expansion is void (``v_i > 2 b_{i+1}^2``: more variance to remove than the state holds),
typically on a scheduler's last nonzero level (FlowMatchEuler's ``sigma = 1/1000``), where the
unclipped drift multiplies the residual by up to ``-1400`` (``studies/replication_table.py``).
The derivation's literal, unclipped form is kept for studies as ``"drift-unclipped"``; it is not
a form an estimator file or the command line takes. ``c_i = 0`` where ``b_{i+1} = 0`` (no correction on a
step that lands on the clean sample). Writing the update as ``x - c * (x - a x0)`` makes a zero
coefficient leave ``x`` unchanged bit for bit.

All coefficients are computed once per step grid on the host (float64), then moved to the
sample's device and dtype, so the per-step update makes no host synchronisation.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from qdrift_stats.errors import QDriftError

CorrectionForm = Literal["drift", "shrink"]
#: The forms an estimator file and the command line take.
CORRECTION_FORMS: tuple[str, ...] = ("drift", "shrink")
#: The derivation's drift without the clip at ``c = 1``: for studies of where it diverges.
UNCLIPPED_DRIFT = "drift-unclipped"
STUDY_FORMS: tuple[str, ...] = CORRECTION_FORMS + (UNCLIPPED_DRIFT,)


def correction_coefficients(
    variance: np.ndarray,
    b_next: np.ndarray,
    form: str = "drift",
    strength: float = 1.0,
    residual_fraction: np.ndarray | None = None,
    residual_error: np.ndarray | None = None,
) -> np.ndarray:
    """Per-step pull coefficients ``c_i``.

    Args:
        variance: ``(steps,)`` or ``(steps, channels)``, the variance statistic ``v_i`` in state units^2.
        b_next: ``(steps,)``, the noise level each step lands on.
        form: ``"drift"``, ``"shrink"`` or, for studies, ``"drift-unclipped"``.
        strength: ``lambda``, multiplies ``v_i``.
        residual_fraction: optional ``(steps,)`` ``rho_i`` in ``(0, 1]``, the mean square of the FP model's noise
            estimate at step ``i``'s input: the share of the marginal's spread around its clean estimate that
            the residual holds (``b^2 / S^2`` for a local spread ``S^2``; 1 where the state is all noise).
        residual_error: optional ``(steps,)`` ``delta_i >= 0``, the mean square difference of the quantized and FP
            noise estimates at step ``i``'s input: the model error in the residual the pull acts on (0 if absent).

    With ``residual_fraction`` the pull is the one that, for a locally Gaussian marginal, maps the
    perturbed spread ``S^2 + v`` back to ``S^2`` (``shrink``; ``docs/method.md``, "The pull where the data's
    spread dominates"): with ``u = 1 / (1 + rho gamma)`` and ``A = rho^2 + rho delta u``, ``c`` solves
    ``(1 - c rho)^2 + c^2 rho delta u = u``: ``c = (rho - sqrt(rho^2 - A (1 - u))) / A``, or the spread-minimising
    ``c = rho / A`` where no pull reaches ``u``. It is the plain shrink at ``rho = 1, delta = 0``, and
    ``gamma / 2`` to first order. The drift is clipped at ``1 / (rho + delta)`` (1 at ``rho = 1, delta = 0``).

    Returns:
        float64 array of the shape of ``variance``; 0 where ``b_next`` is 0. In ``[0, 1]`` for
        ``drift`` and ``shrink`` without ``residual_fraction``; ``gamma / 2`` without bound for
        ``drift-unclipped``.
    """
    if form not in STUDY_FORMS:
        raise QDriftError(f"unknown correction form {form!r}; choose drift or shrink")
    variance = np.asarray(variance, dtype=np.float64)
    b_next = np.asarray(b_next, dtype=np.float64)
    if variance.shape[0] != b_next.shape[0]:
        raise QDriftError(f"estimator has {variance.shape[0]} steps but the sampler has {b_next.shape[0]}")
    if not np.all(np.isfinite(variance)) or np.any(variance < 0):
        raise QDriftError("variance statistic must be finite and non-negative")
    if not np.isfinite(strength) or strength < 0:
        raise QDriftError(f"strength must be a finite non-negative number, got {strength}")
    b2 = (b_next**2).reshape((-1,) + (1,) * (variance.ndim - 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        gamma = np.where(b2 > 0, strength * variance / np.where(b2 > 0, b2, 1.0), 0.0)
    if form == UNCLIPPED_DRIFT:
        return gamma / 2.0
    if residual_fraction is None:
        if form == "drift":
            return np.minimum(gamma / 2.0, 1.0)
        return 1.0 - 1.0 / np.sqrt(1.0 + gamma)
    rho, delta = residual_terms(residual_fraction, residual_error, b_next.shape[0])
    rho, delta = rho.reshape(b2.shape), delta.reshape(b2.shape)
    if form == "drift":
        return np.minimum(gamma / 2.0, 1.0 / (rho + delta))
    u = 1.0 / (1.0 + rho * gamma)
    A = rho * rho + rho * delta * u
    disc = rho * rho - A * (1.0 - u)
    with np.errstate(invalid="ignore"):
        exact = (rho - np.sqrt(np.maximum(disc, 0.0))) / A
    return np.where(b2 > 0, np.where(disc >= 0, exact, rho / A), 0.0)


def own_error_factor(a: np.ndarray, b: np.ndarray, a_next: np.ndarray, b_next: np.ndarray) -> np.ndarray:
    """``(steps,)`` ``eta_i``: the pull's residual ``x_{i+1} - a_{i+1} x0_hat_i`` holds ``eta_i`` times the step's own
    perturbation ``Delta_i = gain_i e_i`` (``e_i`` the output error), for any prediction type.

    With ``s = d x0_hat / d m`` the first-order step's gain is ``(a_{i+1} - b_{i+1} a_i / b_i) s`` and the residual's
    share of ``e`` is ``gain - a_{i+1} s = -(b_{i+1} a_i / b_i) s``; their ratio is
    ``eta = -a_i b_{i+1} / (a_{i+1} b_i - a_i b_{i+1})``, negative on a denoising grid (the pull *enlarges* the
    step's own error: it keeps the part of the error that sits in ``x0_hat``). 0 where ``b_{i+1} = 0``.
    """
    a, b, a_next, b_next = (np.asarray(v, dtype=np.float64) for v in (a, b, a_next, b_next))
    denominator = a_next * b - a * b_next
    with np.errstate(divide="ignore", invalid="ignore"):
        eta = np.where(
            (b_next > 0) & (denominator != 0), -a * b_next / np.where(denominator != 0, denominator, 1.0), 0.0
        )
    return eta


def landing_coefficients(
    variance: np.ndarray,
    independent_variance: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    a_next: np.ndarray,
    b_next: np.ndarray,
    residual_fraction: np.ndarray,
    strength: float = 1.0,
) -> np.ndarray:
    """Pull coefficients that return the landing level's local spread, with the step's own error modelled.

    For data locally ``N(mu, s^2)`` the deviation ``y`` from ``a mu`` has spread ``S^2 = b^2 / rho`` at each level.
    After step ``i`` the deviation is ``y_c + Delta``: ``y_c`` what the FP flow carried (spread ``S_{i+1}^2``),
    ``Delta`` the step's perturbation (``E |Delta|^2 = v``, ``2 E[y_c . Delta] = w - v``: ``w`` the
    persistence-aware statistic, ``v`` the per-step one). The pull's residual is ``q y_c + eta Delta`` with
    ``q = sqrt(rho_i rho_{i+1})`` (the FP noise estimate made at level ``i`` holds that share of the landing
    deviation) and ``eta`` from
    :func:`own_error_factor`. So ``c`` solves, in units of ``S_{i+1}^2`` (``W = lambda w / S^2``,
    ``V = lambda v / S^2``, ``K = (W - V) / 2``),

        (1 - c q)^2 + (1 - c eta)^2 V + 2 (1 - c q)(1 - c eta) K = 1,

    the smaller root, or the spread-minimising ``c`` where no pull reaches the target. At ``q = eta = 1`` it is the
    shrink form ``1 - 1 / sqrt(1 + W)``. ``rho_{i+1}`` is the next step's fraction (the last step keeps its own).

    Args:
        variance, independent_variance: ``(steps,)`` or ``(steps, channels)`` ``w_i`` and ``v_i`` (state units^2).
        a, b, a_next, b_next: ``(steps,)`` the grid's levels.
        residual_fraction: ``(steps,)`` ``rho_i`` in ``(0, 1]`` at each step's input.
        strength: ``lambda``, multiplies ``w`` and ``v``.

    Returns:
        float64 ``c_i >= 0`` of the variance's shape; 0 where ``b_{i+1} = 0``.
    """
    w = np.asarray(variance, dtype=np.float64)
    v = np.asarray(independent_variance, dtype=np.float64)
    if v.shape != w.shape:
        raise QDriftError(f"independent variance has shape {v.shape}, the variance {w.shape}")
    rho = np.asarray(residual_fraction, dtype=np.float64)
    b_next = np.asarray(b_next, dtype=np.float64)
    shape = (-1,) + (1,) * (w.ndim - 1)
    rho_next = np.append(rho[1:], rho[-1:])
    q = np.sqrt(rho * rho_next).reshape(shape)
    eta = own_error_factor(a, b, a_next, b_next).reshape(shape)
    spread = (b_next**2 / rho_next).reshape(shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        W = np.where(spread > 0, strength * w / np.where(spread > 0, spread, 1.0), 0.0)
        V = np.where(spread > 0, strength * v / np.where(spread > 0, spread, 1.0), 0.0)
    K = (W - V) / 2.0
    A = q * q + V * eta * eta + 2.0 * K * q * eta
    B = q + V * eta + K * (q + eta)
    disc = B * B - A * W
    with np.errstate(divide="ignore", invalid="ignore"):
        root = np.where(
            disc >= 0, (B - np.sqrt(np.maximum(disc, 0.0))) / np.where(A > 0, A, 1.0), B / np.where(A > 0, A, 1.0)
        )
        c = np.where(A > 0, root, np.where(B > 0, W / (2.0 * np.where(B > 0, B, 1.0)), 0.0))
    return np.where(b_next.reshape(shape) > 0, np.maximum(c, 0.0), 0.0)


def residual_terms(
    residual_fraction: np.ndarray, residual_error: np.ndarray | None, steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(rho_i, delta_i)`` per step, checked (one line on bad values); ``delta`` is 0 when not given."""
    rho = np.asarray(residual_fraction, dtype=np.float64)
    if rho.shape != (steps,) or not np.all(np.isfinite(rho)) or np.any(rho <= 0) or np.any(rho > 1):
        raise QDriftError(f"residual fraction must be {steps} numbers in (0, 1]")
    delta = np.zeros(steps) if residual_error is None else np.asarray(residual_error, dtype=np.float64)
    if delta.shape != (steps,) or not np.all(np.isfinite(delta)) or np.any(delta < 0):
        raise QDriftError(f"residual error must be {steps} finite numbers >= 0")
    return rho, delta


def apply_correction(
    x_next: torch.Tensor,
    x0_hat: torch.Tensor,
    a_next: torch.Tensor | float,
    coefficient: torch.Tensor,
    channel_axis: int = 1,
) -> torch.Tensor:
    """One corrected state: ``x_next - c * (x_next - a_next * x0_hat)``.

    Args:
        x_next: ``(batch, *sample_shape)``, the scheduler's output state.
        x0_hat: same shape, the clean-sample estimate of the step.
        a_next: signal scale of the target level (0-d tensor or float).
        coefficient: 0-d (scalar statistic) or ``(channels,)`` (per-channel statistic), already on
            ``x_next``'s device and dtype.
        channel_axis: the axis of ``x_next`` that holds the channels (1: ``(batch, channel, ...)``;
            -1 for packed token latents ``(batch, token, channel)``).
    """
    if coefficient.ndim:
        coefficient = channelwise(coefficient, x_next, channel_axis)
    return x_next - coefficient * (x_next - a_next * x0_hat)


def stochastic_split(
    variance: np.ndarray, noise_std: np.ndarray, strength: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """The marginal-preserving correction of a stochastic step (``docs/method.md``, "Stochastic samplers").

    A step that injects fresh noise ``s_i z`` already adds variance ``s_i^2``; the quantized model adds
    ``lambda v_i`` more. Lowering the injected variance to ``s_i^2 - lambda v_i`` keeps the total, and
    so the FP marginal, exactly (both are independent, zero-mean additions); where ``lambda v_i > s_i^2``
    the noise is removed and the rest, ``lambda v_i - s_i^2``, is left to the pull (drift / shrink).

    Args:
        variance: ``(steps,)`` or ``(steps, channels)``, ``v_i`` in state units squared.
        noise_std: ``(steps,)``, ``s_i`` (0 on deterministic steps).
        strength: ``lambda``.

    Returns:
        ``(remaining, noise_factor)``, each of ``variance``'s shape: the variance left to the pull
        (already multiplied by ``lambda``) and ``f_i = s_i (1 - sqrt(1 - lambda v_i / s_i^2))``, so that
        ``x_{i+1} - f_i z`` holds noise of variance ``max(s_i^2 - lambda v_i, 0)``. Both are 0 (and
        ``remaining = lambda v``) where ``s_i = 0``; ``f_i = 0`` where ``v_i = 0``.
    """
    variance = np.asarray(variance, dtype=np.float64) * float(strength)
    s = np.asarray(noise_std, dtype=np.float64).reshape((-1,) + (1,) * (variance.ndim - 1))
    s2 = s**2
    remaining = np.maximum(variance - s2, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        keep = np.where(s2 > 0, np.sqrt(np.clip(1.0 - variance / np.where(s2 > 0, s2, 1.0), 0.0, None)), 1.0)
    factor = np.where(variance > 0, s * (1.0 - keep), 0.0)
    return remaining, np.broadcast_to(factor, variance.shape).copy()


def channelwise(value: torch.Tensor, like: torch.Tensor, channel_axis: int = 1) -> torch.Tensor:
    """A 0-d or ``(channels,)`` tensor shaped to broadcast over ``like`` along ``channel_axis``."""
    if not value.ndim:
        return value
    axis = channel_axis % like.ndim
    shape = [1] * like.ndim
    shape[axis] = -1
    return value.reshape(shape)


def divergence_risk(variance: np.ndarray, b_next: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """``lambda v_i / (2 b_{i+1}^2)`` per step: the unclipped drift overshoots as this nears 1.

    Where it exceeds 1 the ``drift`` form is clipped (module docstring) and no longer first order.
    """
    return correction_coefficients(variance, b_next, UNCLIPPED_DRIFT, strength)


#: The published Q-Drift code's correction (a baseline; see :func:`published_coefficients`).
PUBLISHED = "published"
#: The forms an estimator file may record: the library's, and the published baseline.
FILE_FORMS: tuple[str, ...] = CORRECTION_FORMS + (PUBLISHED,)


def published_coefficients(
    scheduler: str,
    a: np.ndarray,
    b: np.ndarray,
    a_next: np.ndarray,
    b_next: np.ndarray,
    output_variance: np.ndarray,
    gain: np.ndarray | None = None,
    gain_previous: np.ndarray | None = None,
    strength: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The published Q-Drift code's per-step correction, as ``(c, ratio)`` for an increment rescaling.

    The published schedulers scale each step's deterministic increment by ``1 + c_i`` in the
    coordinates ``y = x / a`` (Euler and flow-matching Euler step in ``x`` itself):

        y_{i+1} <- y_i + (1 + c_i) (y_{i+1} - y_i),   i.e.   x_{i+1} <- x_{i+1} + c_i (x_{i+1} - ratio_i x_i)

    with ``ratio_i = a_{i+1} / a_i`` (1 for ``euler`` and ``flow-euler``). ``V`` is the conditional
    variance of the output error (output units, per step and channel). Per scheduler:

    - ``euler``, ``flow-euler`` (as published): ``c = V |sigma_{i+1} - sigma_i| / (2 sigma_i)`` at the
      *current* level ``sigma = b``; on the last step (``sigma_{i+1} = 0``) that is ``V / 2``.
    - ``ddim`` (no published version; the same rule in DDIM's own Euler coordinates
      ``sigma = b / a``, ``y = x / a``).
    - ``dpmpp-2m``, ``flow-dpmpp-2m`` (as published): the variance of the step in ``y`` propagated
      through the solver's coefficients on the current and the previous output,
      ``Var(dy) = (gain_i^2 V_i + gain_prev_i^2 V_{i-1}) / a_{i+1}^2`` (errors of different steps
      taken as independent), matched to the marginal-preserving diffusion:
      ``c = Var(dy) / (sbar_i^2 - sbar_{i+1}^2)``, ``sbar = b / a``.

    ``strength`` multiplies ``c`` (the published ``qdrift_scale``). Returns float64 ``c`` of the
    shape of ``output_variance`` and ``ratio`` ``(steps,)``. Nothing is clipped: this is the
    published rule, kept as a baseline.
    """
    a, b, a_next, b_next = (np.asarray(v, dtype=np.float64) for v in (a, b, a_next, b_next))
    V = np.asarray(output_variance, dtype=np.float64)
    if V.shape[0] != len(b):
        raise QDriftError(f"estimator has {V.shape[0]} steps but the sampler has {len(b)}")
    if not np.all(np.isfinite(V)) or np.any(V < 0):
        raise QDriftError("output variance must be finite and non-negative")

    def col(x: np.ndarray) -> np.ndarray:
        return x.reshape((-1,) + (1,) * (V.ndim - 1))

    if scheduler in ("euler", "flow-euler"):
        sigma, sigma_next = b, b_next
        c = V * col(np.abs(sigma_next - sigma) / (2.0 * sigma))
        ratio = np.ones_like(b)
    elif scheduler == "ddim":
        sigma, sigma_next = b / a, b_next / a_next
        c = V * col(np.abs(sigma_next - sigma) / (2.0 * sigma))
        ratio = a_next / a
    elif scheduler in ("dpmpp-2m", "flow-dpmpp-2m"):
        if gain is None:
            raise QDriftError("the published DPM-Solver++ correction needs the solver's gains")
        gp = np.zeros_like(gain) if gain_previous is None else np.asarray(gain_previous, dtype=np.float64)
        V_prev = np.concatenate([np.zeros_like(V[:1]), V[:-1]], axis=0)
        var_dy = (col(np.asarray(gain, dtype=np.float64) ** 2) * V + col(gp**2) * V_prev) / col(a_next**2)
        sbar, sbar_next = b / a, b_next / a_next
        c = var_dy / col(np.maximum(np.abs(sbar**2 - sbar_next**2), 1e-20))
        ratio = a_next / a
    else:
        raise QDriftError(f"no published correction for scheduler {scheduler!r}")
    return strength * c, ratio
