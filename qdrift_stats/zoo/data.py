"""The digits data set (scikit-learn's bundled ``load_digits``), as diffusion models see it.

1797 grey-scale images of 8x8 pixels with values 0..16 and labels 0..9. The zoo scales them to
``[-1, 1]`` (``x / 8 - 1``) and shapes them ``(N, 1, 8, 8)``. A fixed, stratified split (seed 0)
holds out 360 images (20 %) as the test set: the zoo's models are trained on the other 1437 only,
so the test set is a clean reference for metrics.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from qdrift_stats.errors import QDriftError

#: Number of classes; index ``NULL_CLASS`` is the "no label" class used for classifier-free guidance.
NUM_CLASSES = 10
NULL_CLASS = 10
#: Shape of one digit image as the models see it.
SAMPLE_SHAPE = (1, 8, 8)
#: Size of the held-out test split and the seed of the split.
TEST_SIZE = 360
SPLIT_SEED = 0
_MAX_PIXEL = 16.0


def to_model_range(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Pixel values ``0..16`` to float32 ``[-1, 1]``."""
    x = torch.as_tensor(np.asarray(pixels), dtype=torch.float32)
    return x / (_MAX_PIXEL / 2) - 1.0


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Model range ``[-1, 1]`` back to pixel values ``0..16`` (clamped, float)."""
    return ((x + 1.0) * (_MAX_PIXEL / 2)).clamp(0.0, _MAX_PIXEL)


@lru_cache(maxsize=1)
def _load_all() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - depends on the environment
        raise QDriftError("the digits zoo needs scikit-learn: pip install 'qdrift-stats[zoo]'") from None
    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


@lru_cache(maxsize=1)
def _split_indices() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    _, labels = _load_all()
    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=labels)
    return np.sort(train), np.sort(test)


def load_digits_tensors(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as ``(images, labels)``: float32 ``(N, 1, 8, 8)`` in ``[-1, 1]`` and int64 ``(N,)``.

    ``split`` is ``"train"`` (1437 images), ``"test"`` (360) or ``"all"`` (1797).
    """
    images, labels = _load_all()
    if split == "all":
        idx = np.arange(len(labels))
    elif split in ("train", "test"):
        idx = _split_indices()[0 if split == "train" else 1]
    else:
        raise QDriftError(f"digits split must be 'train', 'test' or 'all', got {split!r}")
    x = to_model_range(images[idx]).unsqueeze(1)
    y = torch.as_tensor(labels[idx])
    return x, y
