"""The digits zoo's denoisers: their architectures, noise schedules and loaders.

- ``digits_unet``: diffusers ``UNet2DModel`` (channels 32/64, one ResNet per level, attention at
  4x4), VP diffusion with epsilon prediction, 1000 training steps, linear betas 1e-4..0.02.
- ``digits_dit``: diffusers ``DiTTransformer2DModel`` (patch 2 -> 16 tokens, width 64, 4 heads,
  6 blocks, adaLN-zero), rectified flow: ``x_s = (1 - s) x0 + s eps``, velocity ``eps - x0``,
  timestep ``1000 s``.

Both are class-conditional with 11 classes: digits 0..9 and ``NULL_CLASS = 10`` for classifier-free
guidance (trained with 10 % label dropout). Weights live in ``data/digits_unet`` and
``data/digits_dit`` (diffusers ``save_pretrained`` with safetensors; ``scheduler_config.json``
next to them) and are built by ``studies/train_digits.py``.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from qdrift_stats.errors import QDriftError
from qdrift_stats.zoo.data import NULL_CLASS, NUM_CLASSES

MODEL_KINDS = ("unet", "dit")
FOLDERS = {"unet": "digits_unet", "dit": "digits_dit"}
SCHEDULER_CONFIG_NAME = "scheduler_config.json"

UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "attention_head_dim": 16,
    "num_class_embeds": NUM_CLASSES + 1,
}

DIT_CONFIG: dict[str, Any] = {
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 6,
    "sample_size": 8,
    "patch_size": 2,
    # DiT's label embedding adds one extra row (index NUM_CLASSES) as the CFG null class.
    "num_embeds_ada_norm": NUM_CLASSES,
    "norm_num_groups": 1,
}

#: Scheduler configs (for any diffusers scheduler's ``from_config``).
UNET_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": False,
}
DIT_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "prediction_type": "flow_prediction",
}


def default_data_dir() -> Path:
    """The repository's ``data/`` folder (found relative to the package)."""
    return Path(__file__).resolve().parents[2] / "data"


def _check_kind(kind: str) -> str:
    if kind not in MODEL_KINDS:
        raise QDriftError(f"digits model kind must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")
    return kind


def build_model(kind: str) -> nn.Module:
    """A freshly initialised (untrained) digits denoiser of ``kind`` (``"unet"`` or ``"dit"``)."""
    from diffusers import DiTTransformer2DModel, UNet2DModel

    if _check_kind(kind) == "unet":
        return UNet2DModel(**UNET_CONFIG)
    return DiTTransformer2DModel(**DIT_CONFIG)


def scheduler_config(kind: str) -> dict[str, Any]:
    """A copy of the scheduler config of ``kind``."""
    return dict(UNET_SCHEDULER_CONFIG if _check_kind(kind) == "unet" else DIT_SCHEDULER_CONFIG)


def model_folder(kind: str, path: str | Path | None = None) -> Path:
    """The folder of ``kind``'s weights: ``path`` or ``data/digits_<kind>``."""
    return Path(path) if path is not None else default_data_dir() / FOLDERS[_check_kind(kind)]


def _load(kind: str, path: str | Path | None) -> nn.Module:
    from diffusers import DiTTransformer2DModel, UNet2DModel

    folder = model_folder(kind, path)
    if not (folder / "config.json").is_file():
        raise QDriftError(
            f"no digits {kind} model in {folder}: run 'python studies/train_digits.py {kind}' to train one"
        )
    cls = UNet2DModel if kind == "unet" else DiTTransformer2DModel
    diffusers_logger = logging.getLogger("diffusers")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls.from_pretrained(str(folder), use_safetensors=True)
    finally:
        diffusers_logger.setLevel(level)
    model.eval()
    model.requires_grad_(False)
    return model


def load_digits_unet(path: str | Path | None = None) -> nn.Module:
    """The trained digits ``UNet2DModel`` (eval mode, no grad) from ``path`` or ``data/digits_unet``."""
    return _load("unet", path)


def load_digits_dit(path: str | Path | None = None) -> nn.Module:
    """The trained digits ``DiTTransformer2DModel`` (eval mode, no grad) from ``path`` or ``data/digits_dit``."""
    return _load("dit", path)


def load_digits_model(kind: str, path: str | Path | None = None) -> nn.Module:
    """``load_digits_unet`` or ``load_digits_dit`` by name."""
    return _load(_check_kind(kind), path)


def load_scheduler_config(kind: str, path: str | Path | None = None) -> dict[str, Any]:
    """The scheduler config saved next to the weights (falls back to the built-in one)."""
    file = model_folder(kind, path) / SCHEDULER_CONFIG_NAME
    if not file.is_file():
        return scheduler_config(kind)
    config = json.loads(file.read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


__all__ = [
    "DIT_CONFIG",
    "DIT_SCHEDULER_CONFIG",
    "MODEL_KINDS",
    "NULL_CLASS",
    "UNET_CONFIG",
    "UNET_SCHEDULER_CONFIG",
    "build_model",
    "default_data_dir",
    "load_digits_dit",
    "load_digits_model",
    "load_digits_unet",
    "load_scheduler_config",
    "model_folder",
    "scheduler_config",
]
