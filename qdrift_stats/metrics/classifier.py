"""A small digits classifier: the feature network of the digits image metrics.

Its penultimate layer (64 features, taken before the ReLU and standardised) plays the role Inception's pool layer
plays for FID; its argmax plays the role of CLIP for "does the sample show what it was conditioned on". Inputs are
float ``(N, 1, 8, 8)`` images in ``[-1, 1]`` (see :mod:`qdrift_stats.zoo.data`).

Weights ship as ``data/digits_classifier/model.safetensors`` plus ``config.json`` and are read
with :mod:`safetensors` (never pickle).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdrift_stats.errors import QDriftError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def default_data_dir() -> Path:
    """The repository's ``data/`` folder (found relative to the package)."""
    return Path(__file__).resolve().parents[2] / "data"


class DigitsClassifier(nn.Module):
    """conv 1->c1 -> conv c1->c2 -> maxpool -> conv c2->c2 -> linear -> ``num_features`` -> linear -> 10."""

    def __init__(
        self, channels: tuple[int, int] = (32, 64), num_features: int = 64, num_classes: int = 10, dropout: float = 0.3
    ):
        super().__init__()
        c1, c2 = channels
        self.config: dict[str, Any] = {
            "channels": [c1, c2],
            "num_features": num_features,
            "num_classes": num_classes,
            "dropout": dropout,
        }
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * 4 * 4, num_features)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(num_features, num_classes)
        self.num_features = num_features
        self.register_buffer("feature_mean", torch.zeros(num_features))
        self.register_buffer("feature_scale", torch.ones(1))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate layer before its ReLU: ``(N, num_features)``."""
        x = torch.relu(self.conv1(x))
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.conv3(x))
        return self.fc(x.flatten(1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Metric features: the penultimate layer (pre-ReLU, no dead units), centred and scaled.

        ``(embed(x) - feature_mean) / feature_scale`` with the mean and one overall scale measured on
        the training digits, so features have mean 0 and average variance 1 per dimension there
        (KID's polynomial kernel assumes features of order one).
        """
        return (self.embed(x) - self.feature_mean) / self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, num_classes)``."""
        return self.head(self.drop(torch.relu(self.embed(x))))

    @torch.no_grad()
    def set_feature_normalization(self, images: torch.Tensor) -> None:
        """Measure ``feature_mean`` and ``feature_scale`` on ``images`` (the training digits)."""
        was_training = self.training
        self.eval()
        e = self.embed(images)
        self.feature_mean.copy_(e.mean(0))
        self.feature_scale.copy_(e.var(0).mean().sqrt().reshape(1))
        self.train(was_training)

    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write ``model.safetensors`` and ``config.json`` (plus ``extra`` entries) into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        (folder / CONFIG_NAME).write_text(json.dumps({**self.config, **(extra or {})}, indent=2) + "\n")


def load_digits_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """The shipped digits classifier in eval mode (``path``: its folder; default ``data/digits_classifier``)."""
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else default_data_dir() / "digits_classifier"
    weights, config_file = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    if not weights.is_file() or not config_file.is_file():
        raise QDriftError(f"no digits classifier in {folder}: expected {WEIGHTS_NAME} and {CONFIG_NAME}")
    config = json.loads(config_file.read_text())
    model = DigitsClassifier(
        channels=tuple(config["channels"]),
        num_features=int(config["num_features"]),
        num_classes=int(config["num_classes"]),
        dropout=float(config.get("dropout", 0.0)),
    )
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


_CACHED: dict[str, DigitsClassifier] = {}


def default_classifier() -> DigitsClassifier:
    """The shipped classifier, loaded once per process."""
    if "default" not in _CACHED:
        _CACHED["default"] = load_digits_classifier()
    return _CACHED["default"]


class ClassifierFeatures(nn.Module):
    """Feature extractor for torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance``.

    torchmetrics passes the images given to ``update`` straight to a custom ``feature`` module
    (it converts to uint8 only for its own Inception network) and reads ``num_features`` to size
    its state. This wrapper takes float images in ``[-1, 1]``, clamps them to that range (as a
    uint8 conversion would), and returns the classifier's penultimate features.
    """

    def __init__(self, classifier: DigitsClassifier | None = None):
        super().__init__()
        self.classifier = classifier if classifier is not None else default_classifier()
        self.num_features = int(self.classifier.num_features)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:  # 0..255 images, e.g. from a generic pipeline
            images = images.float() / 127.5 - 1.0
        x = images.float().clamp(-1.0, 1.0)
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.shape[1] == 3:  # RGB with equal channels -> grey
            x = x.mean(dim=1, keepdim=True)
        return self.classifier.features(x)
