"""Sample-quality metrics: two-sample distances and image metrics in a classifier's feature space."""

from .distances import energy_distance

__all__ = ["energy_distance"]
