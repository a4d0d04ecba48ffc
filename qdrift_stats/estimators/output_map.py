"""The affine output map: a per-step linear model of the quantized output's error, chosen on held-out runs.

PTQD models each step's output error ``e_i = m_q - m_fp`` as ``k_i m_fp + mu_i`` with one scalar ``k_i``
and ``mu_i``; the published Q-Drift code as a per-channel Gaussian conditional mean given ``m_q``. Real
PTQ error has more structure than that: a weight error ``Delta W x`` mixes neighbouring positions and
channels, and an activation error has a mean that depends on the position. This module fits, per step,

    e_i  ~  offset_i + L_i (m_q - center_i)                  (the conditional mean E[e_i | m_q], linear)

on the calibration store's paired outputs, by ridge regression, and the corrector applies the output
``m_q - offset_i - L_i (m_q - center_i)`` (see :class:`qdrift_stats.correct.corrector.Corrector`). Everything
it uses is in the quantized output itself, so it costs no model call. Structures of ``L_i``:

- ``"mean"``: ``L_i = 0``; ``offset_i`` is each output element's mean error (per position and channel);
- ``"local"``: ``L_i`` a ``k x k`` convolution over all channels, the same at every position (needs
  image-shaped samples ``(channels, height, width)``; ``C^2 k^2`` weights per step, any image size);
- ``"full"``: a dense ``D x D`` matrix over the ``D`` output elements (only for ``D <= MAX_FULL_DIM``).

**Choice on held-out runs.** A map that fits the calibration runs may still not predict a new run's
error, and what matters is the final sample, not one step. Each candidate (structure, kernel, ridge) is
fitted leaving one calibration run out and scored by the share of the *predicted final deviation*
``T = sum_i P_i gain_i e_i`` (the error budget's propagation, :func:`qdrift_stats.schedulers.base.propagators`)
of the left-out run that it explains, ``1 - E|T - T_hat|^2 / E|T|^2`` pooled over the left-out runs
(:func:`heldout_shares`). The best candidate is applied if it explains at least ``min_explained``
(:func:`select_output_map`). Derivation and measurements: ``docs/method.md``, "The affine output map".

Ridge: ``(X'X + ridge * tr(X'X)/p I) W = X'Y`` with ``p`` features, so ``ridge`` is relative to the
features' mean square and means the same at every step and scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from qdrift_stats.errors import QDriftError

STRUCTURES = ("mean", "local", "full")
#: The largest output size (elements per sample) a dense map is fitted for: ``D^2`` weights per step.
MAX_FULL_DIM = 1024
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


def candidate_name(structure: str, kernel: int, ridge: float) -> str:
    """``"mean"``, ``"local5@0.1"``, ``"full@1"``: how a candidate is named in fits and reports."""
    if structure == "mean":
        return "mean"
    return f"{structure}{kernel if structure == 'local' else ''}@{ridge:g}"


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


@dataclass(frozen=True)
class OutputMap:
    """A fitted affine output map (module docstring), float64 host arrays.

    Attributes:
        structure, kernel, ridge: the candidate (``kernel`` 0 unless local).
        center, offset: ``(steps, *sample_shape)`` ``center_i`` (mean quantized output) and ``offset_i``
            (mean error), output units.
        weight: ``None`` for ``"mean"``; local: ``(steps, C, C, k, k)`` convolution kernels (out, in);
            full: ``(steps, D, D)`` with ``L_i(x) = x_flat @ weight_i``.
        shares: the held-out share of the predicted final deviation of every candidate tried (name -> share).
    """

    structure: str
    kernel: int
    ridge: float
    center: np.ndarray
    offset: np.ndarray
    weight: np.ndarray | None
    shares: dict[str, float]

    @property
    def name(self) -> str:
        return candidate_name(self.structure, self.kernel, self.ridge)

    @property
    def share(self) -> float:
        """The held-out share of the predicted final deviation this map explains."""
        return float(self.shares.get(self.name, float("nan")))

    def predict(self, i: int, m_q: np.ndarray) -> np.ndarray:
        """The predicted error ``offset_i + L_i (m_q - center_i)`` for quantized outputs ``(n, *sample_shape)``."""
        out = np.broadcast_to(self.offset[i], m_q.shape).astype(np.float64)
        if self.weight is None:
            return out
        d = np.asarray(m_q, dtype=np.float64) - self.center[i]
        if self.structure == "full":
            return out + (d.reshape(len(d), -1) @ self.weight[i]).reshape(d.shape)
        kern = torch.from_numpy(np.ascontiguousarray(self.weight[i]))
        return out + F.conv2d(torch.from_numpy(np.ascontiguousarray(d)), kern, padding=self.kernel // 2).numpy()

    def tensors(self) -> dict[str, np.ndarray]:
        """The estimator file's tensors ``map_center``, ``map_offset`` (and ``map_weight``)."""
        out = {"map_center": self.center, "map_offset": self.offset}
        if self.weight is not None:
            out["map_weight"] = self.weight
        return out

    def metadata(self) -> dict[str, Any]:
        """The estimator file's ``output_map`` metadata entry."""
        return {"structure": self.structure, "kernel": self.kernel, "ridge": self.ridge, "share": self.share}


def fit_output_map(
    m_q: list[np.ndarray], errors: list[np.ndarray], structure: str, kernel: int = 0, ridge: float = 0.0
) -> OutputMap:
    """Fit one structure on every run.

    Args:
        m_q, errors: per step, ``(n, *sample_shape)`` quantized outputs and output errors ``m_q - m_fp``
            (runs and samples pooled).
        structure, kernel, ridge: see the module docstring.
    """
    shape = tuple(m_q[0].shape[1:])
    if structure not in STRUCTURES:
        raise QDriftError(f"unknown output map structure {structure!r}; choose {', '.join(STRUCTURES)}")
    if not applicable(structure, shape, kernel):
        raise QDriftError(f"a {structure} output map does not fit samples of shape {shape}")
    centers, offsets, weights = [], [], []
    for x, y in zip(m_q, errors):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        center, offset = x.mean(axis=0), y.mean(axis=0)
        centers.append(center)
        offsets.append(offset)
        if structure == "mean":
            continue
        X, Y = _features(x - center, structure, kernel), _targets(y - offset, structure)
        solved = _solve(X.T @ X, X.T @ Y, ridge)  # (p, outputs)
        if structure == "local":
            c = shape[0]
            solved = solved.T.reshape(c, c, kernel, kernel)  # conv2d's (out, in, k, k)
        weights.append(solved)
    weight = None if structure == "mean" else np.stack(weights)
    return OutputMap(structure, int(kernel), float(ridge), np.stack(centers), np.stack(offsets), weight, {})


def heldout_shares(
    m_q: list[np.ndarray],
    errors: list[np.ndarray],
    weights: np.ndarray,
    candidates: tuple[tuple[str, int, float], ...] = DEFAULT_CANDIDATES,
) -> dict[str, float]:
    """Leave-one-run-out share of the predicted final deviation each candidate explains.

    ``T = sum_i weights_i e_i`` per left-out sample (``weights_i = P_i gain_i``); each candidate is fitted on
    the other runs at every step and predicts ``T_hat``; the share is ``1 - sum |T - T_hat|^2 / sum |T|^2``
    over all left-out runs (negative: worse than predicting nothing). The per-position mean is left out
    exactly; the slopes are regressed on outputs centred by the mean of all runs (a second-order leak).

    Args:
        m_q, errors: per step, ``(runs, samples, *sample_shape)``.
        weights: ``(steps,)`` ``P_i gain_i``.
    """
    steps, runs = len(errors), errors[0].shape[0]
    shape = tuple(errors[0].shape[2:])
    if runs < 2:
        return {}
    tried = [c for c in candidates if applicable(c[0], shape, c[1])]
    T = sum(weights[i] * np.asarray(errors[i], dtype=np.float64) for i in range(steps))  # (runs, samples, *shape)
    T_hat = {candidate_name(*c): np.zeros_like(T) for c in tried}
    for i in range(steps):
        x = np.asarray(m_q[i], dtype=np.float64)
        y = np.asarray(errors[i], dtype=np.float64)
        n = x.shape[1]
        run_y = y.sum(axis=1)  # (runs, *shape)
        center = x.reshape(-1, *shape).mean(axis=0)
        by_structure: dict[tuple[str, int], tuple[list, list, list]] = {}
        for structure, kernel, _ in tried:
            if structure == "mean" or (structure, kernel) in by_structure:
                continue
            feats = [_features(x[r] - center, structure, kernel) for r in range(runs)]
            # targets centred by each run's own training-fold mean below; here by the pooled mean
            offset_all = y.reshape(-1, *shape).mean(axis=0)
            targs = [_targets(y[r] - offset_all, structure) for r in range(runs)]
            by_structure[(structure, kernel)] = (
                feats,
                [f.T @ f for f in feats],
                [f.T @ t for f, t in zip(feats, targs)],
            )
        for r in range(runs):
            offset = (run_y.sum(axis=0) - run_y[r]) / (n * (runs - 1))  # the training fold's mean error
            for structure, kernel, ridge in tried:
                pred = np.broadcast_to(offset, y[r].shape)
                if structure != "mean":
                    feats, grams, crosses = by_structure[(structure, kernel)]
                    gram = sum(grams) - grams[r]
                    cross = sum(crosses) - crosses[r]
                    solved = _solve(gram, cross, ridge)
                    pred = pred + _apply_features(feats[r] @ solved, structure, y[r].shape)
                T_hat[candidate_name(structure, kernel, ridge)][r] += weights[i] * pred
    denom = float(np.sum(T**2))
    if denom <= 0:
        return {name: 0.0 for name in T_hat}
    return {name: 1.0 - float(np.sum((T - pred) ** 2)) / denom for name, pred in T_hat.items()}


def _apply_features(out: np.ndarray, structure: str, shape: tuple[int, ...]) -> np.ndarray:
    if structure == "full":
        return out.reshape(shape)
    n, _, h, w = shape
    return np.moveaxis(out.reshape(n, h, w, -1), -1, 1)


def select_output_map(
    m_q: list[np.ndarray],
    errors: list[np.ndarray],
    weights: np.ndarray,
    min_explained: float = 0.1,
    candidates: tuple[tuple[str, int, float], ...] = DEFAULT_CANDIDATES,
) -> tuple[OutputMap | None, dict[str, float]]:
    """The candidate with the largest held-out share (:func:`heldout_shares`), fitted on every run, if that
    share reaches ``min_explained``; else ``None``. Returns it with the shares of every candidate tried.

    Args: as :func:`heldout_shares` (``m_q``, ``errors`` per step ``(runs, samples, *sample_shape)``).
    """
    shares = heldout_shares(m_q, errors, weights, candidates)
    if not shares:
        return None, shares
    best = max(shares, key=lambda name: shares[name])
    if not shares[best] >= min_explained:
        return None, shares
    structure, kernel, ridge = next(c for c in candidates if candidate_name(*c) == best)
    shape = tuple(errors[0].shape[2:])
    pooled_x = [np.asarray(a).reshape(-1, *shape) for a in m_q]
    pooled_y = [np.asarray(a).reshape(-1, *shape) for a in errors]
    fitted = fit_output_map(pooled_x, pooled_y, structure, kernel, ridge)
    return OutputMap(
        fitted.structure, fitted.kernel, fitted.ridge, fitted.center, fitted.offset, fitted.weight, dict(shares)
    ), shares
