"""End-to-end evaluation of the correction on the testbed: record, fit, sample, measure.

Used by ``qdrift demo`` and by ``studies/mixture_table.py``. Every sampler (FP, Q, corrected)
starts from the same seeds, so differences between them are paired.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qdrift_stats.correct.estimator_file import EstimatorFile
from qdrift_stats.correct.sample import sample
from qdrift_stats.estimators import EmpiricalEstimator
from qdrift_stats.record.lockstep import record
from qdrift_stats.testbed.metrics import gap_closed, mixture_metrics
from qdrift_stats.testbed.mixture import MixturePair

DIVERGED = "diverged"


@dataclass
class CorrectionResult:
    """Metrics of one (pair, scheduler, steps) cell: ``metrics[model]`` for fp, q, drift, shrink."""

    scheduler: str
    steps: int
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)
    max_coefficient: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def closed(self, form: str, metric: str = "within_var") -> float:
        """Fraction of the FP-to-Q gap closed by ``form`` on ``metric`` (NaN if it diverged)."""
        if self.status.get(form) == DIVERGED:
            return float("nan")
        m = self.metrics
        return gap_closed(m["fp"][metric], m["q"][metric], m[form][metric])

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for model, values in self.metrics.items():
            row = {
                "scheduler": self.scheduler,
                "steps": self.steps,
                "model": model,
                **values,
                "status": self.status.get(model, "ok"),
            }
            if model in ("drift", "shrink"):
                row["closed_within_var"] = self.closed(model, "within_var")
                row["closed_nll"] = self.closed(model, "nll")
                row["max_coefficient"] = self.max_coefficient.get(model, float("nan"))
            out.append(row)
        return out


def _measure(
    samples: np.ndarray, pair: MixturePair, reference: np.ndarray, q_metrics: dict[str, float] | None
) -> tuple[dict[str, float], str]:
    finite = np.isfinite(samples).all(axis=tuple(range(1, samples.ndim)))
    if finite.mean() < 0.99:
        return {"within_var": float("nan"), "nll": float("nan"), "energy": float("nan")}, DIVERGED
    values = mixture_metrics(samples[finite], pair.mixture, reference)
    if q_metrics is not None and values["within_var"] > 10 * q_metrics["within_var"]:
        return values, DIVERGED
    return values, "ok"


def evaluate_correction(
    pair: MixturePair,
    scheduler_name: str,
    steps: int,
    *,
    pair_name: str = "testbed",
    runs: int = 5,
    batch: int = 64,
    calibration_seed: int = 0,
    num_samples: int = 6000,
    sample_seed: int = 100_000,
    forms: tuple[str, ...] = ("drift", "shrink"),
    strength: float = 1.0,
    estimator: Any = None,
    workdir: str | Path | None = None,
    keep_samples: bool = False,
    trajectories: bool = False,
) -> CorrectionResult:
    """Record ``runs`` calibration runs, fit the empirical statistic, and compare FP, Q and corrected Q.

    ``estimator``: an unfitted estimator (default: the first-order empirical statistic). The fitted
    statistic goes through an exported file (save + load), as in production.
    """
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        store = root / f"{scheduler_name}_{steps}.zarr"
        record(
            pair,
            store,
            pair_name=pair_name,
            scheduler_name=scheduler_name,
            steps=steps,
            runs=runs,
            batch_size=batch,
            seed=calibration_seed,
            overwrite=True,
            trajectories=trajectories,
        )
        fitted = (estimator or EmpiricalEstimator(statistic="first-order")).fit(store)
        path = root / f"{scheduler_name}_{steps}.safetensors"
        fitted.export(path, overwrite=True)
        estimator = EstimatorFile.load(path)
        reference = pair.mixture.sample(num_samples, seed=sample_seed + 1).numpy()
        result = CorrectionResult(scheduler_name, steps)
        batch_size = min(num_samples, 2000)
        draws = {
            "fp": sample(pair, scheduler_name, steps, num_samples, batch_size, sample_seed, model="fp"),
            "q": sample(pair, scheduler_name, steps, num_samples, batch_size, sample_seed, model="q"),
        }
        for form in forms:
            draws[form] = sample(
                pair,
                scheduler_name,
                steps,
                num_samples,
                batch_size,
                sample_seed,
                model="q",
                estimator=estimator,
                correction=form,
                strength=strength,
            )
            from qdrift_stats.loop import prepared_scheduler
            from qdrift_stats.schedulers.base import step_grid

            grid = step_grid(prepared_scheduler(pair, scheduler_name, steps))
            result.max_coefficient[form] = float(np.max(estimator.coefficients(grid, form, strength)))
        if keep_samples:
            result.extra["draws"] = draws
        q_metrics = None
        for model, samples in draws.items():
            result.metrics[model], result.status[model] = _measure(samples, pair, reference, q_metrics)
            if model == "q":
                q_metrics = result.metrics["q"]
    return result
