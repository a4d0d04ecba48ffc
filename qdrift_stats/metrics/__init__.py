"""Sample-quality metrics: two-sample distances and image metrics in a classifier's feature space."""

from qdrift_stats.metrics.classifier import ClassifierFeatures, DigitsClassifier, load_digits_classifier
from qdrift_stats.metrics.distances import energy_distance
from qdrift_stats.metrics.images import (
    bootstrap_ci,
    class_consistency,
    class_consistency_ci,
    class_hits,
    frechet_distance,
    inception_fid,
    kernel_inception_distance,
)

__all__ = [
    "ClassifierFeatures",
    "DigitsClassifier",
    "bootstrap_ci",
    "class_consistency",
    "class_consistency_ci",
    "class_hits",
    "energy_distance",
    "frechet_distance",
    "inception_fid",
    "kernel_inception_distance",
    "load_digits_classifier",
]
