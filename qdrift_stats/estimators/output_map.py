"""The affine output map: a per-step linear model of the output error in the FP output, inverted at sampling.

PTQD models each step's output error ``e_i = m_q - m_fp`` as ``k_i m_fp + mu_i`` with one scalar ``k_i``
and ``mu_i`` and recovers ``m_fp = (m_q - mu_i) / (1 + k_i)``. Real PTQ error has more structure than one
slope: a weight error ``Delta W x`` mixes neighbouring positions and channels, and an activation error has a
mean that depends on the position. This module fits, per step, on the calibration store's paired outputs,

    e_i  =  offset_i + K_i (m_fp - c_i) + r_i          (ridge regression; c_i the mean FP output)

and the corrector inverts it: the corrected output solves ``m = m_q - offset_i - K_i (m - c_i)``, i.e.
``m = c_i + (I + K_i)^{-1} (m_q - offset_i - c_i)``, which is ``m_fp + (I + K_i)^{-1} r_i``. As in PTQD the
regression is on the FP output and the map is inverted (an errors-in-variables fit): the part of the error
that is not a function of the output, ``r_i``, keeps its spread, for the variance statistic to remove.
Regressing ``e`` on ``m_q`` instead (the conditional mean ``E[e | m_q]``) would also shrink the noise
``r_i`` towards the mean and, together with the pull, remove spread twice; on the testbed's activation rounding
that overshot by 37-56% of the gap (``docs/method.md``). Everything the corrector uses is in the quantized
output itself, so it costs no model call. Structures of ``K_i``:

- ``"mean"``: ``K_i = 0``; ``offset_i`` is each output element's mean error (per position and channel);
- ``"local"``: ``K_i`` a ``k x k`` convolution over all channels, the same at every position (needs
  image-shaped samples ``(channels, height, width)``; ``C^2 k^2`` weights per step, any image size); the
  inverse is taken by :data:`LOCAL_ITERATIONS` fixed-point steps ``m <- m_q - offset - K (m - c)`` (a Neumann
  series), so a local fit is applied only where the convolution's spectral norm (:func:`local_norm`) is below
  :data:`MAX_LOCAL_NORM` at every step (the remaining error is below ``0.5^7`` of the map's own size);
- ``"full"``: a dense ``D x D`` matrix over the ``D`` output elements (only for ``D <= MAX_FULL_DIM``), inverted
  exactly and stored as ``W = I - (I + K)^{-1}``: ``m = m_q - offset - (m_q - center) W``.

**Choice on held-out runs.** A map that fits the calibration runs may still not predict a new run's
error, and what matters is the final sample, not one step. Each candidate (structure, kernel, ridge) is
fitted leaving one calibration run out and scored by the share of the *predicted final deviation*
``T = sum_i P_i gain_i e_i`` (the error budget's propagation, :func:`qdrift_stats.schedulers.base.propagators`)
of the left-out run that its ``offset_i + K_i (m_fp - c_i)`` explains, ``1 - E|T - T_hat|^2 / E|T|^2`` pooled
over the left-out runs (:func:`heldout_shares`). The best candidate is applied if it explains at least
``min_explained`` (:func:`select_output_map`). Derivation and measurements: ``docs/method.md``, "The affine
output map".

Ridge: ``(X'X + ridge * tr(X'X)/p I) W = X'Y`` with ``p`` features, so ``ridge`` is relative to the
features' mean square and means the same at every step and scale.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from qdrift_stats.errors import QDriftError

STRUCTURES = ("mean", "local", "full")
#: The largest output size (elements per sample) a dense map is fitted for: ``D^2`` weights per step.
MAX_FULL_DIM = 1024
#: Fixed-point steps that invert a local map at sampling time (error below ``norm^(n+1)`` of the map's own size).
LOCAL_ITERATIONS = 6
#: The largest spectral norm of a local map's convolution for which it is applied (the iteration converges).
MAX_LOCAL_NORM = 0.5
#: A state-aware map's largest gain at one step: the spectral norm of its inverse ``(I + K_i)^{-1}`` (dense; a local
#: one is bounded by ``MAX_LOCAL_NORM``) and of its state part (``M_i`` dense, ``L_i`` local). Where the output and
#: the state are nearly collinear (a flow model's last step, ``sigma -> 0``: the velocity is a function of the
#: state) the joint regression is ill-conditioned, and a step whose share of the final deviation is too small for
#: the held-out choice to see it can carry a gain of hundreds; such a step keeps its mean error only.
MAX_STATE_MAP_GAIN = 4.0
#: Candidates tried by :func:`select_output_map`: ``(structure, kernel, ridge)``.
DEFAULT_CANDIDATES: tuple[tuple[str, int, float], ...] = (
    ("mean", 0, 0.0),
    ("local", 3, 0.01),
    ("local", 3, 0.1),
    ("local", 3, 1.0),
    ("local", 5, 0.01),
    ("local", 5, 0.1),
    ("local", 5, 1.0),
    ("full", 0, 0.1),
    ("full", 0, 0.3),
    ("full", 0, 1.0),
    ("full", 0, 3.0),
)


#: The candidates of :data:`DEFAULT_CANDIDATES` that regress on the sampler state beside the FP output (a map
#: ``offset_i + K_i (m_fp - c_i) + L_i (x_i - xbar_i)``; tried by the default ``PersistentEstimator`` where the
#: FP states are known, see its ``map_state``).
STATE_CANDIDATES: tuple[tuple[str, int, float, bool], ...] = tuple(
    (structure, kernel, ridge, True) for structure, kernel, ridge in DEFAULT_CANDIDATES if structure != "mean"
)


def candidate_name(structure: str, kernel: int, ridge: float, state: bool = False) -> str:
    """``"mean"``, ``"local5@0.1"``, ``"full@1"`` (``"full@1+state"`` with the state's features): how a candidate is
    named in fits and reports."""
    if structure == "mean":
        return "mean"
    return f"{structure}{kernel if structure == 'local' else ''}@{ridge:g}{'+state' if state else ''}"


def _candidate(c: tuple) -> tuple[str, int, float, bool]:
    """``(structure, kernel, ridge, state)`` of a 3- or 4-tuple candidate (3-tuples regress on the output alone)."""
    structure, kernel, ridge, *rest = c
    return structure, int(kernel), float(ridge), bool(rest[0]) if rest else False


def applicable(structure: str, sample_shape: tuple[int, ...], kernel: int = 3) -> bool:
    """Whether a structure can be fitted for samples of this shape."""
    if structure == "mean":
        return True
    if structure == "local":
        return len(sample_shape) == 3 and kernel % 2 == 1 and kernel >= 1
    if structure == "full":
        return int(np.prod(sample_shape)) <= MAX_FULL_DIM
    return False


def _features(x: np.ndarray, structure: str, kernel: int) -> np.ndarray:
    """Regression features of centred outputs ``x`` ``(n, *shape)``: ``(rows, p)``."""
    if structure == "full":
        return x.reshape(len(x), -1)
    channels = x.shape[1]
    patches = F.unfold(torch.from_numpy(np.ascontiguousarray(x)), kernel, padding=kernel // 2)  # n, C k k, H W
    return patches.transpose(1, 2).reshape(-1, channels * kernel * kernel).numpy()


def _targets(y: np.ndarray, structure: str) -> np.ndarray:
    """Regression targets of centred errors ``y`` ``(n, *shape)``, rows matching :func:`_features`."""
    if structure == "full":
        return y.reshape(len(y), -1)
    return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])  # (n H W, C)


def _solve(gram: np.ndarray, cross: np.ndarray, ridge: float) -> np.ndarray:
    scale = float(np.trace(gram)) / gram.shape[0]
    if scale <= 0:
        return np.zeros_like(cross)
    return np.linalg.solve(gram + ridge * scale * np.eye(gram.shape[0]), cross)


def local_norm(kernel: np.ndarray, size: tuple[int, int], iterations: int = 50) -> float:
    """The spectral norm of the zero-padded convolution with a ``(C, C, k, k)`` kernel on ``size`` images (power
    iteration on ``K^T K``, from a fixed start): the fixed-point inversion converges where it is below 1."""
    k = torch.from_numpy(np.ascontiguousarray(kernel, dtype=np.float64))
    pad = kernel.shape[-1] // 2
    v = torch.ones((1, kernel.shape[1], *size), dtype=torch.float64)
    v = v + 0.01 * torch.arange(v.numel(), dtype=torch.float64).reshape(v.shape).sin()  # not an eigenvector
    norm = 0.0
    for _ in range(iterations):
        v = v / v.norm()
        w = F.conv_transpose2d(F.conv2d(v, k, padding=pad), k, padding=pad)
        norm = float(w.norm()) ** 0.5
        if norm == 0:
            return 0.0
        v = w
    return norm


def invert_local(
    m_q: Any, offset: Any, center: Any, kernel: Any, iterations: int = LOCAL_ITERATIONS, state_term: Any = None
):
    """``m = m_q - offset - K (m - c) - state_term`` by fixed-point steps, ``c = center - offset`` (torch tensors, any
    device; ``state_term`` the state's part ``L (x - xbar)`` of a state-aware map, or ``None``).

    Without a state term the first step from ``m = m_q - offset`` gives ``m_q - offset - K (m_q - center)``; each
    further one adds a term of the Neumann series of ``(I + K)^{-1}``. With one, the iteration starts from
    ``m_q - offset - state_term``.
    """
    padding = kernel.shape[-1] // 2
    base = m_q - offset
    fp_center = center - offset
    if state_term is None:
        m = base - F.conv2d(m_q - center, kernel, padding=padding)
    else:
        base = base - state_term
        m = base - F.conv2d(base - fp_center, kernel, padding=padding)
    for _ in range(iterations - 1):
        m = base - F.conv2d(m - fp_center, kernel, padding=padding)
    return m


def local_state_term(state: Any, state_center: Any, state_kernel: Any):
    """``L (x - xbar)``: a state-aware local map's state part, a zero-padded ``(C, C, k, k)`` convolution (torch)."""
    return F.conv2d(state - state_center, state_kernel, padding=state_kernel.shape[-1] // 2)


@dataclass(frozen=True)
class OutputMap:
    """A fitted affine output map (module docstring), float64 host arrays.

    Attributes:
        structure, kernel, ridge: the candidate (``kernel`` 0 unless local).
        center, offset: ``(steps, *sample_shape)`` the mean quantized output ``c_i + offset_i`` and the mean
            error ``offset_i``, output units.
        weight: ``None`` for ``"mean"``; local: ``(steps, C, C, k, k)`` the kernels of ``K_i`` (out, in);
            full: ``(steps, D, D)`` ``W_i = I - (I + K_i)^{-1}`` (row vectors: ``x_flat @ W_i``).
        shares: the held-out share of the predicted final deviation of every candidate tried (name -> share).
        state_center, state_weight: a state-aware map's state part (else ``None``): ``(steps, *sample_shape)`` the
            mean FP state ``xbar_i`` at each step's input (state units) and, local: ``(steps, C, C, k, k)`` the
            kernels of ``L_i``; full: ``(steps, D, D)`` ``M_i = L_i (I + K_i)^{-1}`` (row vectors). The corrected
            output is then ``m_fp``'s estimate less ``(x - xbar_i) M_i`` (full) or the fixed point with
            ``L_i (x - xbar_i)`` subtracted (local); see :func:`fit_output_map`.
        mean_only_steps: the steps of a state-aware map whose gain exceeded :data:`MAX_STATE_MAP_GAIN`: there the
            map is the step's mean error alone (``K_i = L_i = 0``).
    """

    structure: str
    kernel: int
    ridge: float
    center: np.ndarray
    offset: np.ndarray
    weight: np.ndarray | None
    shares: dict[str, float]
    state_center: np.ndarray | None = None
    state_weight: np.ndarray | None = None
    mean_only_steps: tuple[int, ...] = ()

    @property
    def uses_state(self) -> bool:
        """Whether the map needs the sampler state (the state at the step's input) beside the model output."""
        return self.state_weight is not None

    @property
    def name(self) -> str:
        return candidate_name(self.structure, self.kernel, self.ridge, self.uses_state)

    @property
    def share(self) -> float:
        """The held-out share of the predicted final deviation this map explains."""
        return float(self.shares.get(self.name, float("nan")))

    def apply(self, i: int, m_q: np.ndarray, state: np.ndarray | None = None) -> np.ndarray:
        """The corrected output of step ``i`` for quantized outputs ``(n, *sample_shape)`` (what the corrector does);
        ``state`` ``(n, *sample_shape)``, the state the outputs were evaluated at, for a state-aware map."""
        m_q = np.asarray(m_q, dtype=np.float64)
        if self.uses_state and state is None:
            raise QDriftError("this output map regresses on the sampler state: pass the state at the step's input")
        ds = (
            None
            if not self.uses_state
            else np.asarray(state, dtype=np.float64).reshape(m_q.shape) - self.state_center[i]
        )
        if self.weight is None:
            return m_q - self.offset[i]
        if self.structure == "full":
            d = (m_q - self.center[i]).reshape(len(m_q), -1)
            out = m_q - self.offset[i] - (d @ self.weight[i]).reshape(m_q.shape)
            if ds is not None:
                out = out - (ds.reshape(len(ds), -1) @ self.state_weight[i]).reshape(m_q.shape)
            return out
        t = [torch.from_numpy(np.ascontiguousarray(a)) for a in (m_q, self.offset[i], self.center[i], self.weight[i])]
        term = None
        if ds is not None:
            term = F.conv2d(torch.from_numpy(ds), torch.from_numpy(np.ascontiguousarray(self.state_weight[i])),
                            padding=self.kernel // 2)  # fmt: skip
        return invert_local(*t, state_term=term).numpy()

    def tensors(self) -> dict[str, np.ndarray]:
        """The estimator file's tensors ``map_center``, ``map_offset`` (and ``map_weight``; ``map_state_center``,
        ``map_state_weight`` for a state-aware map)."""
        out = {"map_center": self.center, "map_offset": self.offset}
        if self.weight is not None:
            out["map_weight"] = self.weight
        if self.uses_state:
            out["map_state_center"] = self.state_center
            out["map_state_weight"] = self.state_weight
        return out

    def metadata(self) -> dict[str, Any]:
        """The estimator file's ``output_map`` metadata entry."""
        meta = {"structure": self.structure, "kernel": self.kernel, "ridge": self.ridge, "share": self.share}
        if self.structure == "local":
            meta["iterations"] = LOCAL_ITERATIONS
        if self.uses_state:
            meta["state"] = True
            meta["mean_only_steps"] = [int(i) for i in self.mean_only_steps]
        return meta


def _regression(x: np.ndarray, y: np.ndarray, structure: str, kernel: int, ridge: float) -> np.ndarray:
    """The solved ridge regression of centred errors ``y`` ``(n, *shape)`` on centred features ``x`` (the FP
    outputs, ``(n, *shape)``, or outputs and states stacked on the channel axis): local ``(C, C_in, k, k)``, full
    ``(D_in, D)`` (row vectors)."""
    solved = _solve(*_normal_equations(x, y, structure, kernel), ridge)
    if structure == "local":
        return solved.T.reshape(y.shape[1], x.shape[1], kernel, kernel)
    return solved


#: Regression features materialised at once (float64 values): the fit and the held-out scores go through the
#: samples in chunks of this size, so memory does not grow with the number of samples (a 5 x 5 map of 4-channel
#: 64 x 64 latents has 100 features per position).
MAX_FEATURE_VALUES = 1 << 24


def _chunks(n: int, structure: str, kernel: int, shape: tuple[int, ...]) -> list[slice]:
    per_sample = int(np.prod(shape)) if structure == "full" else int(np.prod(shape[1:])) * shape[0] * kernel**2
    size = max(1, MAX_FEATURE_VALUES // max(per_sample, 1))
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _normal_equations(x, y, structure, kernel):
    """``(X'X, X'Y)`` of centred outputs ``x`` and errors ``y`` ``(n, *shape)``, accumulated in chunks."""
    gram = cross = 0.0
    for part in _chunks(len(x), structure, kernel, x.shape[1:]):
        X, Y = _features(x[part], structure, kernel), _targets(y[part], structure)
        gram = gram + X.T @ X
        cross = cross + X.T @ Y
    return gram, cross


def _predict(x, solved, structure, kernel, shape=None):
    """``L(x)`` for centred features ``x`` ``(n, *in_shape)`` with a solved ``(p, outputs)`` regression, in chunks;
    ``(n, *shape)`` (``shape``: the targets' sample shape, ``x``'s by default)."""
    shape = tuple(x.shape[1:]) if shape is None else tuple(shape)
    out = np.empty((len(x), *shape), dtype=x.dtype)
    for part in _chunks(len(x), structure, kernel, x.shape[1:]):
        rows = len(out[part])
        out[part] = _apply_features(_features(x[part], structure, kernel) @ solved, structure, (rows, *shape))
    return out


def fit_output_map(
    m_fp: list[np.ndarray],
    errors: list[np.ndarray],
    structure: str,
    kernel: int = 0,
    ridge: float = 0.0,
    states: list[np.ndarray] | None = None,
) -> OutputMap:
    """Fit one structure on every run and invert it (module docstring).

    Args:
        m_fp, errors: per step, ``(n, *sample_shape)`` FP outputs and output errors ``m_q - m_fp`` (runs and
            samples pooled).
        structure, kernel, ridge: see the module docstring.
        states: optional, per step, ``(n, *sample_shape)`` the state at the step's input: the map is then
            state-aware, ``e = offset + K (m_fp - c) + L (x - xbar) + r`` (the state's channels beside the output's;
            not for ``"mean"``), and the corrected output ``m = c + (I + K)^{-1} (m_q - offset - c - L (x - xbar))``.
            A step whose dense ``I + K`` cannot be inverted or whose gain (:func:`state_map_gain`) exceeds
            :data:`MAX_STATE_MAP_GAIN` keeps its mean error only (``K = L = 0``; listed in ``mean_only_steps``).
    """
    shape = tuple(m_fp[0].shape[1:])
    if structure not in STRUCTURES:
        raise QDriftError(f"unknown output map structure {structure!r}; choose {', '.join(STRUCTURES)}")
    if not applicable(structure, shape, kernel):
        raise QDriftError(f"a {structure} output map does not fit samples of shape {shape}")
    if states is not None and structure == "mean":
        raise QDriftError("a mean output map has no slope: it cannot regress on the state")
    centers, offsets, weights, state_centers, state_weights, mean_only = [], [], [], [], [], []
    for i, (x, y) in enumerate(zip(m_fp, errors)):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        fp_center, offset = x.mean(axis=0), y.mean(axis=0)
        centers.append(fp_center + offset)  # the mean quantized output
        offsets.append(offset)
        if structure == "mean":
            continue
        features = x - fp_center
        if states is not None:
            s = np.asarray(states[i], dtype=np.float64)
            state_centers.append(s.mean(axis=0))
            features = np.concatenate([features, s - state_centers[-1]], axis=1)
        solved = _regression(features, y - offset, structure, kernel, ridge)
        if structure == "local":
            K, L = solved[:, : x.shape[1]], solved[:, x.shape[1] :]
        else:
            d = int(np.prod(shape))
            K, L = solved[:d], solved[d:]
        if structure == "full":
            if not invertible("full", K):
                if states is None:
                    raise QDriftError(f"the dense output map of step {len(weights)} is not invertible (I + K singular)")
                K, L = np.zeros_like(K), np.zeros_like(L)  # a state-aware map: this step keeps its mean (below)
            eye = np.eye(K.shape[0])
            inverse = np.linalg.inv(eye + K)
            K = eye - inverse  # W = I - (I + K)^{-1}
            L = L @ inverse  # M = L (I + K)^{-1} (row vectors)
        if states is not None and state_map_gain(structure, K, L, shape) > MAX_STATE_MAP_GAIN:
            K, L = np.zeros_like(K), np.zeros_like(L)  # the step's mean error only (module constant's note)
            mean_only.append(i)
        weights.append(K)
        state_weights.append(L)
    weight = None if structure == "mean" else np.stack(weights)
    if states is None or structure == "mean":
        return OutputMap(structure, int(kernel), float(ridge), np.stack(centers), np.stack(offsets), weight, {})
    return OutputMap(
        structure,
        int(kernel),
        float(ridge),
        np.stack(centers),
        np.stack(offsets),
        weight,
        {},
        np.stack(state_centers),
        np.stack(state_weights),
        tuple(mean_only),
    )


def state_map_gain(structure: str, weight: np.ndarray, state_weight: np.ndarray, shape: tuple[int, ...]) -> float:
    """The largest gain of a state-aware map's step: dense, the spectral norms of ``(I + K)^{-1} = I - W`` and of
    ``M``; local, the spectral norms of the convolutions ``K`` (as a gain ``1 / (1 - |K|)``) and ``L`` on
    ``shape``'s images."""
    if structure == "full":
        eye = np.eye(weight.shape[0])
        return max(float(np.linalg.norm(eye - weight, 2)), float(np.linalg.norm(state_weight, 2)))
    size = tuple(shape[1:])
    k_norm = local_norm(weight, size)
    return max(1.0 / (1.0 - k_norm) if k_norm < 1.0 else float("inf"), local_norm(state_weight, size))


def invertible(structure: str, K: np.ndarray, size: tuple[int, int] = (1, 1)) -> bool:
    """Whether a fitted ``K_i`` can be inverted as the corrector does: a local kernel's spectral norm on ``size``
    images below :data:`MAX_LOCAL_NORM`; a dense ``I + K`` with a condition number below 1e6."""
    if structure == "local":
        return local_norm(K, size) < MAX_LOCAL_NORM
    if structure == "full":
        return bool(np.linalg.cond(np.eye(K.shape[0]) + K) < 1e6)
    return True


def heldout_shares(
    m_fp: list[np.ndarray],
    errors: list[np.ndarray],
    weights: np.ndarray,
    candidates: tuple[tuple, ...] = DEFAULT_CANDIDATES,
    states: list[np.ndarray] | None = None,
) -> dict[str, float]:
    """Leave-one-run-out share of the predicted final deviation each candidate explains.

    ``T = sum_i weights_i e_i`` per left-out sample (``weights_i = P_i gain_i``); each candidate is fitted on
    the other runs at every step and predicts ``T_hat = sum_i weights_i (offset_i + K_i (m_fp - c_i))``; the
    share is ``1 - sum |T - T_hat|^2 / sum |T|^2`` over all left-out runs (negative: worse than predicting
    nothing). The per-position mean is left out exactly (offset and centre from the other runs); the slopes are
    regressed on outputs centred by the mean of all runs (a second-order leak).

    A candidate ``(structure, kernel, ridge, True)`` (:data:`STATE_CANDIDATES`) regresses on the sampler state
    too: ``offset_i + K_i (m_fp - c_i) + L_i (x_i - xbar_i)``, the state's channels stacked beside the output's
    (a local kernel sees both, a dense map both flattened); it needs ``states`` and is skipped without them.

    Args:
        m_fp, errors: per step, ``(runs, samples, *sample_shape)`` FP outputs and output errors.
        weights: ``(steps,)`` ``P_i gain_i``.
        states: optional, per step, ``(runs, samples, *sample_shape)`` the state each output was evaluated at
            (the scheduler's sample at the step's input).
    """
    predicted = _heldout_predictions(m_fp, errors, weights, candidates, states)
    if predicted is None:
        return {}
    T, T_hat = predicted
    return {name: pooled_share(T, pred) for name, pred in T_hat.items()}


def pooled_share(T: np.ndarray, pred: np.ndarray, keep: np.ndarray | None = None) -> float:
    """``1 - sum |T - T_hat|^2 / sum |T|^2`` over the runs ``keep`` (all by default); 0 where ``T`` is all 0."""
    if keep is not None:
        T, pred = T[keep], pred[keep]
    denom = float(np.sum(T**2))
    return 0.0 if denom <= 0 else 1.0 - float(np.sum((T - pred) ** 2)) / denom


def share_jackknife_error(T: np.ndarray, pred: np.ndarray) -> float:
    """Jackknife standard error over calibration runs of the pooled held-out share: the share recomputed without
    each run in turn, ``sqrt((R - 1) / R * sum_r (s_(-r) - mean)^2)`` (Efron and Tibshirani 1993, ch. 11)."""
    runs = T.shape[0]
    if runs < 3:
        return float("nan")
    leave_out = np.array([pooled_share(T, pred, np.arange(runs) != r) for r in range(runs)])
    return float(np.sqrt((runs - 1) / runs * np.sum((leave_out - leave_out.mean()) ** 2)))


def _heldout_predictions(m_fp, errors, weights, candidates, states):
    """``T`` ``(runs, samples, *shape)`` and each tried candidate's held-out ``T_hat`` (:func:`heldout_shares`);
    None with fewer than 2 runs."""
    steps, runs = len(errors), errors[0].shape[0]
    shape = tuple(errors[0].shape[2:])
    if runs < 2:
        return None
    tried = [
        c for c in map(_candidate, candidates) if applicable(c[0], shape, c[1]) and (states is not None or not c[3])
    ]
    T = sum(weights[i] * np.asarray(errors[i], dtype=np.float64) for i in range(steps))  # (runs, samples, *shape)
    T_hat = {candidate_name(*c): np.zeros_like(T) for c in tried}
    for i in range(steps):
        y = np.asarray(errors[i], dtype=np.float64)
        inputs = {False: np.asarray(m_fp[i], dtype=np.float64)}
        if states is not None and any(c[3] for c in tried):
            inputs[True] = np.concatenate([inputs[False], np.asarray(states[i], dtype=np.float64)], axis=2)
        n = y.shape[1]
        run_y = y.sum(axis=1)  # (runs, *shape)
        offset_all = y.reshape(-1, *shape).mean(axis=0)  # targets centred by the pooled mean (the leak above)
        run_x = {key: x.sum(axis=1) for key, x in inputs.items()}
        center = {key: x.reshape(-1, *x.shape[2:]).mean(axis=0) for key, x in inputs.items()}
        by_structure: dict[tuple[str, int, bool], tuple[list, list]] = {}
        for structure, kernel, _, state in tried:
            if structure == "mean" or (structure, kernel, state) in by_structure:
                continue
            x = inputs[state]
            pairs = [_normal_equations(x[r] - center[state], y[r] - offset_all, structure, kernel) for r in range(runs)]
            by_structure[(structure, kernel, state)] = ([g for g, _ in pairs], [c for _, c in pairs])
        for r in range(runs):
            offset = (run_y.sum(axis=0) - run_y[r]) / (n * (runs - 1))  # the training fold's mean error
            for structure, kernel, ridge, state in tried:
                pred = np.broadcast_to(offset, y[r].shape)
                if structure != "mean":
                    grams, crosses = by_structure[(structure, kernel, state)]
                    solved = _solve(sum(grams) - grams[r], sum(crosses) - crosses[r], ridge)
                    # the left-out run centred by the fold's own mean, as the fitted map would centre it
                    fold_center = (run_x[state].sum(axis=0) - run_x[state][r]) / (n * (runs - 1))
                    pred = pred + _predict(inputs[state][r] - fold_center, solved, structure, kernel, shape)
                T_hat[candidate_name(structure, kernel, ridge, state)][r] += weights[i] * pred
    return T, T_hat


def _apply_features(out: np.ndarray, structure: str, shape: tuple[int, ...]) -> np.ndarray:
    if structure == "full":
        return out.reshape(shape)
    n, _, h, w = shape
    return np.moveaxis(out.reshape(n, h, w, -1), -1, 1)


def select_output_map(
    m_fp: list[np.ndarray],
    errors: list[np.ndarray],
    weights: np.ndarray,
    min_explained: float = 0.1,
    candidates: tuple[tuple, ...] = DEFAULT_CANDIDATES,
    states: list[np.ndarray] | None = None,
) -> tuple[OutputMap | None, dict[str, float], dict[str, float]]:
    """The candidate with the largest held-out share (:func:`heldout_shares`), fitted on every run, if that
    share reaches ``min_explained`` and the fit can be inverted at every step (:func:`invertible`; else the next
    best); ``None`` if no candidate qualifies. Returns it with the shares of every candidate tried and their
    jackknife standard errors over the calibration runs (NaN with fewer than 3 runs): a share within about two
    of them of ``min_explained`` means that whether the map is applied depends on which runs were recorded.

    Args: as :func:`heldout_shares` (``m_fp``, ``errors`` and ``states`` per step
    ``(runs, samples, *sample_shape)``; state-aware candidates are tried only with ``states``).
    """
    predicted = _heldout_predictions(m_fp, errors, weights, candidates, states)
    if predicted is None:
        return None, {}, {}
    T, T_hat = predicted
    shares = {name: pooled_share(T, pred) for name, pred in T_hat.items()}
    share_errors = {name: share_jackknife_error(T, pred) for name, pred in T_hat.items()}
    shape = tuple(errors[0].shape[2:])
    pooled_x = [np.asarray(a).reshape(-1, *shape) for a in m_fp]
    pooled_y = [np.asarray(a).reshape(-1, *shape) for a in errors]
    pooled_s = None if states is None else [np.asarray(a).reshape(-1, *shape) for a in states]
    for name in sorted(shares, key=lambda key: -shares[key]):
        if not shares[name] >= min_explained:
            break
        structure, kernel, ridge, state = next(c for c in map(_candidate, candidates) if candidate_name(*c) == name)
        try:
            fitted = fit_output_map(pooled_x, pooled_y, structure, kernel, ridge, pooled_s if state else None)
        except QDriftError:  # a dense map that cannot be inverted
            continue
        if structure == "local" and not all(invertible("local", k, shape[1:]) for k in fitted.weight):
            continue
        return replace(fitted, shares=dict(shares)), shares, share_errors
    return None, shares, share_errors
