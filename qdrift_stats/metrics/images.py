"""Image metrics for generated samples: Fréchet distance, KID, class consistency, bootstrap CIs.

For the digits zoo the feature network is the shipped digits classifier
(:mod:`qdrift_stats.metrics.classifier`, penultimate layer, 64 features): ``frechet_distance`` is
FID with that network in place of Inception, ``class_consistency`` is the analogue of CLIP score
(does the sample show the class it was conditioned on). Both Fréchet distance and KID are
computed by torchmetrics (``FrechetInceptionDistance`` / ``KernelInceptionDistance`` with a custom
``feature`` module). Images are float tensors ``(N, 1, 8, 8)`` in ``[-1, 1]``; values outside are
clamped by the feature network (as a uint8 conversion would).

:func:`inception_fid` is the standard FID (Inception-v3 pool features, 2048) for users whose
images are natural images and who have the Inception weights on disk; it never downloads.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qdrift_stats.errors import QDriftError

#: File name of torch-fidelity's Inception-v3 weights (what torchmetrics' FID uses).
INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
#: Environment variable that may point at the Inception weights file.
INCEPTION_WEIGHTS_ENV = "QDRIFT_INCEPTION_WEIGHTS"

_BATCH = 512


def _as_images(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if t.dim() != 4:
        raise QDriftError(f"{name} must be images shaped (N, C, H, W), got shape {tuple(t.shape)}")
    if len(t) < 2:
        raise QDriftError(f"{name} needs at least 2 images, got {len(t)}")
    if not torch.isfinite(t.float()).all():
        raise QDriftError(f"{name} contains NaN or infinite values")
    return t.detach().cpu().float()


def default_features() -> nn.Module:
    """The digits classifier's penultimate layer as a torchmetrics feature module."""
    from qdrift_stats.metrics.classifier import ClassifierFeatures

    return ClassifierFeatures()


def _update(metric: Any, images: torch.Tensor, real: bool) -> None:
    for start in range(0, len(images), _BATCH):
        metric.update(images[start : start + _BATCH], real=real)


def frechet_distance(real: Any, fake: Any, features: nn.Module | None = None) -> float:
    """Fréchet distance between ``real`` and ``fake`` in the feature space of ``features``.

    ``features`` defaults to the digits classifier (see the module docstring); it is any module
    mapping a batch of images to ``(N, d)`` and may carry a ``num_features`` attribute.
    Computed by torchmetrics' ``FrechetInceptionDistance`` (in float64).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    real_t, fake_t = _as_images(real, "real"), _as_images(fake, "fake")
    metric = FrechetInceptionDistance(feature=features if features is not None else default_features())
    _update(metric, real_t, real=True)
    _update(metric, fake_t, real=False)
    return float(metric.compute())


def kernel_inception_distance(
    real: Any,
    fake: Any,
    subset_size: int | None = None,
    subsets: int = 100,
    features: nn.Module | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (polynomial-kernel MMD, degree 3) in the feature space of ``features``: ``(mean, std)`` over subsets.

    ``subset_size`` defaults to ``min(1000, len(real), len(fake))``; torchmetrics draws the
    subsets from torch's global generator, so it runs under ``fork_rng`` seeded with ``seed``
    (deterministic, and the caller's random state is left untouched).
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    real_t, fake_t = _as_images(real, "real"), _as_images(fake, "fake")
    largest = min(len(real_t), len(fake_t))
    size = min(1000, largest) if subset_size is None else int(subset_size)
    if not 2 <= size <= largest:
        raise QDriftError(f"KID subset_size must be between 2 and {largest} (the smaller set), got {size}")
    with warnings.catch_warnings():  # "will save all extracted features in buffer": a few KB here
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(
            feature=features if features is not None else default_features(), subsets=int(subsets), subset_size=size
        )
    _update(metric, real_t, real=True)
    _update(metric, fake_t, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        mean, std = metric.compute()
    return float(mean), float(std)


@torch.no_grad()
def class_hits(samples: Any, labels: Any, classifier: nn.Module | None = None) -> np.ndarray:
    """Per sample: does ``classifier`` (default: the digits classifier) assign it to its label? ``(N,)`` bool.

    Images are clamped to ``[-1, 1]`` first. Labels outside ``0..num_classes-1`` (e.g. the null
    class of an unconditional sample) never count as consistent. Two sample sets drawn from the same
    seeds give paired hit vectors (e.g. for statsmodels' McNemar test).
    """
    from qdrift_stats.metrics.classifier import default_classifier

    x = _as_images(samples, "samples").clamp(-1.0, 1.0)
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).long().reshape(-1)
    if len(y) != len(x):
        raise QDriftError(f"class labels: got {len(x)} samples but {len(y)} labels")
    model = classifier if classifier is not None else default_classifier()
    was_training = model.training
    model.eval()
    try:
        pred = torch.cat([model(x[i : i + _BATCH]).argmax(1) for i in range(0, len(x), _BATCH)])
    finally:
        model.train(was_training)
    return (pred == y.to(pred.device)).cpu().numpy()


def class_consistency(samples: Any, labels: Any, classifier: nn.Module | None = None) -> float:
    """Fraction of ``samples`` that ``classifier`` (default: the digits classifier) assigns to their ``labels``.

    The mean of :func:`class_hits`: images clamped to ``[-1, 1]``, labels outside the classes never match.
    """
    return float(class_hits(samples, labels, classifier).mean())


def class_consistency_ci(
    samples: Any, labels: Any, classifier: nn.Module | None = None, confidence: float = 0.95
) -> tuple[float, float, float]:
    """``(consistency, low, high)``: :func:`class_consistency` with a Wilson score interval.

    Class consistency is a binomial proportion (``hits`` of ``n`` samples), so its interval comes from
    statsmodels' ``proportion_confint(method="wilson")``, not a bootstrap: near 1 a percentile
    bootstrap collapses (1000 hits of 1000 resample to ``[1, 1]``, claiming certainty), while the
    Wilson interval stays honest (``[0.9962, 1]`` for 1000 of 1000).
    """
    from statsmodels.stats.proportion import proportion_confint

    value = class_consistency(samples, labels, classifier)
    n = len(_as_images(samples, "samples"))
    hits = int(round(value * n))
    low, high = proportion_confint(hits, n, alpha=1 - confidence, method="wilson")
    return value, float(low), float(high)


def bootstrap_ci(
    metric: Callable[..., Any],
    samples: Any,
    *,
    labels: Any = None,
    n_boot: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(estimate, low, high)``: ``metric`` on all generated ``samples`` and a percentile bootstrap interval.

    ``metric(samples)`` (or ``metric(samples, labels)`` when ``labels`` is given) returns a float,
    or a tuple whose first entry is the value (e.g. KID's ``(mean, std)``). The generated samples
    (with their labels) are resampled with replacement ``n_boot`` times; the reference set inside
    ``metric`` stays fixed. Note the Fréchet distance is biased upwards under resampling (duplicates
    shrink the sample covariance's rank), so its interval sits a little above a fresh-sample one.
    """
    if not 0.0 < confidence < 1.0:
        raise QDriftError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 2:
        raise QDriftError(f"n_boot must be at least 2, got {n_boot}")
    x = torch.as_tensor(np.asarray(samples) if not isinstance(samples, torch.Tensor) else samples)
    y = (
        None
        if labels is None
        else torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    )
    if y is not None and len(y) != len(x):
        raise QDriftError(f"bootstrap_ci got {len(x)} samples but {len(y)} labels")

    def value(xs: torch.Tensor, ys: torch.Tensor | None) -> float:
        out = metric(xs) if ys is None else metric(xs, ys)
        return float(out[0] if isinstance(out, (tuple, list)) else out)

    estimate = value(x, y)
    gen = torch.Generator().manual_seed(int(seed))
    values = []
    for _ in range(int(n_boot)):
        idx = torch.randint(0, len(x), (len(x),), generator=gen)
        values.append(value(x[idx], None if y is None else y[idx]))
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.asarray(values), [alpha, 1.0 - alpha])
    return estimate, float(low), float(high)


# --- standard FID (Inception-v3) -------------------------------------------------------------


def find_inception_weights(weights_path: str | os.PathLike | None = None) -> Path | None:
    """The local Inception-v3 weights file for FID, or ``None``.

    Looks at ``weights_path``, then ``$QDRIFT_INCEPTION_WEIGHTS``, then torch's hub cache
    (``torch.hub.get_dir()/checkpoints``, where torch-fidelity keeps ``weights-inception-2015-12-05-6726825d.pth``).
    """
    candidates: list[Path] = []
    if weights_path is not None:
        return Path(weights_path) if Path(weights_path).is_file() else None
    if os.environ.get(INCEPTION_WEIGHTS_ENV):
        candidates.append(Path(os.environ[INCEPTION_WEIGHTS_ENV]))
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME)
    return next((c for c in candidates if c.is_file()), None)


def to_inception_input(images: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` float images ``(N, C, H, W)`` to uint8 RGB ``(N, 3, H, W)`` (grey is repeated).

    The Inception network resizes to 299x299 itself.
    """
    x = ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif x.shape[1] != 3:
        raise QDriftError(f"standard FID needs 1- or 3-channel images, got {x.shape[1]} channels")
    return x


def inception_fid(
    real: Any, fake: Any, *, weights_path: str | os.PathLike | None = None, feature_network: nn.Module | None = None
) -> float:
    """Standard FID (Inception-v3, 2048 pool features) of ``[-1, 1]`` images; never downloads.

    Needs torch-fidelity and the Inception weights on disk (see :func:`find_inception_weights`);
    otherwise raises :class:`QDriftError`. ``feature_network`` replaces Inception (same uint8 RGB
    inputs, same torchmetrics code path): for tests, or for another local feature network.
    For 8x8 digits prefer :func:`frechet_distance` (Inception features of upsampled 8x8 images
    say little).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    real_t, fake_t = _as_images(real, "real"), _as_images(fake, "fake")
    if feature_network is None:
        path = find_inception_weights(weights_path)
        if path is None:
            where = (
                str(weights_path)
                if weights_path is not None
                else (
                    f"${INCEPTION_WEIGHTS_ENV} or {Path(torch.hub.get_dir()) / 'checkpoints' / INCEPTION_WEIGHTS_NAME}"
                )
            )
            raise QDriftError(
                f"standard FID needs the Inception-v3 weights {INCEPTION_WEIGHTS_NAME} on disk, none found at "
                f"{where}; pass weights_path=..., or use frechet_distance() with the digits classifier"
            )
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            raise QDriftError("standard FID needs torch-fidelity: pip install torch-fidelity") from None
        metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path))
    else:
        metric = FrechetInceptionDistance(feature=feature_network)
    _update(metric, to_inception_input(real_t), real=True)
    _update(metric, to_inception_input(fake_t), real=False)
    return float(metric.compute())


__all__ = [
    "INCEPTION_WEIGHTS_ENV",
    "INCEPTION_WEIGHTS_NAME",
    "bootstrap_ci",
    "class_consistency",
    "default_features",
    "find_inception_weights",
    "frechet_distance",
    "inception_fid",
    "kernel_inception_distance",
    "to_inception_input",
]
