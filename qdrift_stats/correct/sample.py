"""Sampling with a model pair, optionally Q-Drift-corrected: what ``qdrift sample`` runs.

Batch ``k`` of a request uses the seed ``seed + k``; each batch runs the one denoising loop
(:func:`qdrift_stats.loop.run_sampler`) with the estimator file's :class:`~qdrift_stats.correct.corrector.Corrector`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qdrift_stats.errors import QDriftError
from qdrift_stats.loop import initial_noise, prepared_scheduler, run_sampler, step_generator


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
        estimator: an :class:`qdrift_stats.correct.estimator_file.EstimatorFile` (or ``None``: no correction). Its
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
            corrector = estimator.corrector(
                scheduler, correction=correction, strength=strength, device=x.device, dtype=x.dtype
            )
        with torch.no_grad():
            x = run_sampler(model_fn, scheduler, x, cond, corrector, generator=step_generator(batch_seed))
        outputs.append(x.detach().float().cpu().numpy())
    return np.concatenate(outputs, axis=0).astype(np.float32)


def save_samples(samples: np.ndarray, out: str | Path) -> Path:
    """Write ``samples`` as ``.npy`` to exactly ``out`` (``np.save(path)`` would append ``.npy`` to
    another suffix), atomically: a failed write leaves ``out`` as it was
    (:func:`qdrift_stats.outputs.atomic_output`; call :func:`~qdrift_stats.outputs.check_output` first)."""
    from qdrift_stats.outputs import atomic_output

    with atomic_output(out, "npy") as tmp, open(tmp, "wb") as handle:
        np.save(handle, samples)
    return Path(out)
