"""Two-sample distances between sets of samples.

Written here (a few lines of torch) because the design packages offer no multivariate energy
distance: scipy's ``energy_distance`` is one-dimensional and torchmetrics' KID works on image
feature networks.
"""

from __future__ import annotations

import numpy as np
import torch


def energy_distance(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Energy distance ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` (V-statistic) between ``(n, ...)`` and ``(m, ...)``.

    Samples are flattened to vectors. Zero iff the distributions are equal (in the limit);
    same units as the samples.
    """
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64).reshape(len(x), -1)
    y = torch.as_tensor(np.asarray(y), dtype=torch.float64).reshape(len(y), -1)
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).mean()
    yy = torch.cdist(y, y).mean()
    return float(2 * xy - xx - yy)
