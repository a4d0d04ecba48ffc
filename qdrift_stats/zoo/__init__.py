"""The digits zoo: small class-conditional diffusion models trained on scikit-learn's digits.

- :func:`digits_unet_fp` / :func:`digits_dit_fp`: pairs whose ``q`` is the FP model (zero error);
- :class:`DiffusersPair`: FP + quantized diffusers denoisers with classifier-free guidance;
- :func:`calibration_inputs`: model calls for a PTQ method's activation statistics;
- :func:`load_digits_unet`, :func:`load_digits_dit`: the shipped weights (``data/digits_*``);
- named quantized pairs ``digits_<unet|dit>_<recipe>`` (e.g. :func:`digits_unet_w4a8`), listed in
  :data:`NAMED_PAIRS` (:mod:`qdrift_stats.zoo.named`).

See ``docs/zoo.md``.
"""

from __future__ import annotations

from qdrift_stats.zoo.data import NULL_CLASS, NUM_CLASSES, SAMPLE_SHAPE, load_digits_tensors, to_model_range, to_pixels
from qdrift_stats.zoo.models import (
    build_model,
    load_digits_dit,
    load_digits_model,
    load_digits_unet,
    load_scheduler_config,
    scheduler_config,
)
from qdrift_stats.zoo.named import (
    NAMED_PAIRS,
    ZOO_RECIPES,
    build_quantized_digits_model,
    digits_dit_mixdq_w4a8,
    digits_dit_mixdq_w5a8,
    digits_dit_svdquant_w4a4,
    digits_dit_w3a4,
    digits_dit_w4a4,
    digits_dit_w4a8,
    digits_dit_w8a8,
    digits_unet_mixdq_w4a8,
    digits_unet_mixdq_w5a8,
    digits_unet_svdquant_w4a4,
    digits_unet_w3a4,
    digits_unet_w4a4,
    digits_unet_w4a8,
    digits_unet_w8a8,
    named_pair,
    quantized_digits_model,
)
from qdrift_stats.zoo.pairs import (
    DEFAULT_GUIDANCE_SCALE,
    DiffusersPair,
    calibration_inputs,
    digits_dit_fp,
    digits_pair,
    digits_unet_fp,
    sample_pair,
)

__all__ = [
    "NAMED_PAIRS",
    "ZOO_RECIPES",
    "build_quantized_digits_model",
    "digits_dit_mixdq_w4a8",
    "digits_dit_mixdq_w5a8",
    "digits_dit_svdquant_w4a4",
    "digits_dit_w3a4",
    "digits_dit_w4a4",
    "digits_dit_w4a8",
    "digits_dit_w8a8",
    "digits_unet_mixdq_w4a8",
    "digits_unet_mixdq_w5a8",
    "digits_unet_svdquant_w4a4",
    "digits_unet_w3a4",
    "digits_unet_w4a4",
    "digits_unet_w4a8",
    "digits_unet_w8a8",
    "named_pair",
    "quantized_digits_model",
    "DEFAULT_GUIDANCE_SCALE",
    "DiffusersPair",
    "NULL_CLASS",
    "NUM_CLASSES",
    "SAMPLE_SHAPE",
    "build_model",
    "calibration_inputs",
    "digits_dit_fp",
    "digits_pair",
    "digits_unet_fp",
    "load_digits_dit",
    "load_digits_model",
    "load_digits_tensors",
    "load_digits_unet",
    "load_scheduler_config",
    "sample_pair",
    "scheduler_config",
    "to_model_range",
    "to_pixels",
]
