"""Named pairs of the digits zoo: each shipped model under each PTQ recipe.

``--pair qdrift_stats.zoo:digits_unet_w4a8`` (or ``digits_dit_svdquant_w4a4``, ...) builds a
:class:`~qdrift_stats.zoo.pairs.DiffusersPair` whose ``fp`` is the shipped model loaded from
``data/`` with ``from_pretrained`` and whose ``q`` is a quantized copy of it made by
:func:`qdrift_stats.quantize.quantize` with the recipe, calibrated on
``calibration_inputs(kind, n=CALIBRATION_CALLS, seed=CALIBRATION_SEED)`` (fixed, so the quantized
model is deterministic). Names are ``digits_<model>_<recipe>`` with the recipe's ``-`` written
``_``; :data:`NAMED_PAIRS` maps each name to ``(model, recipe)``.

Quantizing takes from a fraction of a second (``w4a4``) to tens of seconds (MixDQ's sensitivity
pass), so the quantized model is built once per process and shared by every pair of that name
(:func:`quantized_digits_model`; the models are in eval mode without gradients and are only
called, never changed). The FP model is loaded afresh for each pair.
"""

from __future__ import annotations

from functools import cache

from torch import nn

from qdrift_stats.errors import QDriftError
from qdrift_stats.zoo.models import MODEL_KINDS, load_digits_model
from qdrift_stats.zoo.pairs import DEFAULT_GUIDANCE_SCALE, DiffusersPair, calibration_inputs, digits_pair

#: The recipes every shipped model is offered under (see ``qdrift_stats.quantize.RECIPES``).
ZOO_RECIPES: tuple[str, ...] = ("w8a8", "w4a8", "w4a4", "w3a4", "svdquant-w4a4", "mixdq-w4a8", "mixdq-w5a8")
#: Calibration of every named pair's PTQ: ``calibration_inputs(kind, n=32, seed=0)`` (batches of 16, guided: 32 rows).
CALIBRATION_CALLS = 32
CALIBRATION_SEED = 0


def pair_name(kind: str, recipe: str) -> str:
    """``digits_<kind>_<recipe>`` with ``-`` replaced by ``_`` (a Python identifier)."""
    return f"digits_{kind}_{recipe.replace('-', '_')}"


#: name -> (model kind, recipe) for every named quantized pair.
NAMED_PAIRS: dict[str, tuple[str, str]] = {
    pair_name(kind, recipe): (kind, recipe) for kind in MODEL_KINDS for recipe in ZOO_RECIPES
}


def build_quantized_digits_model(
    kind: str, recipe: str, *, calibration_calls: int = CALIBRATION_CALLS, calibration_seed: int = CALIBRATION_SEED
) -> nn.Module:
    """A fresh quantized copy of the shipped ``kind`` model under ``recipe`` (not cached)."""
    from qdrift_stats.quantize import quantize, recipe_info

    if kind not in MODEL_KINDS:
        raise QDriftError(f"digits model kind must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")
    recipe = recipe_info(recipe).name
    fp_model = load_digits_model(kind)
    calibration = calibration_inputs(kind, n=calibration_calls, seed=calibration_seed)
    return quantize(fp_model, recipe, calibration)


@cache
def quantized_digits_model(kind: str, recipe: str) -> nn.Module:
    """The quantized ``kind`` model under ``recipe`` with the default calibration, built once per process."""
    return build_quantized_digits_model(kind, recipe)


def named_pair(name: str, *, guidance_scale: float = DEFAULT_GUIDANCE_SCALE) -> DiffusersPair:
    """The pair called ``name`` (a key of :data:`NAMED_PAIRS`, e.g. ``"digits_unet_w4a8"``)."""
    if name not in NAMED_PAIRS:
        raise QDriftError(f"unknown digits pair {name!r}; known: {', '.join(NAMED_PAIRS)}")
    kind, recipe = NAMED_PAIRS[name]
    return digits_pair(kind, quantized_digits_model(kind, recipe), guidance_scale=guidance_scale, name=name)


# One factory per name, so that ``--pair qdrift_stats.zoo:<name>`` finds a plain function.


def digits_unet_w8a8() -> DiffusersPair:
    """Digits UNet, FP vs optimum-quanto W8A8 (int8 weights, static int8 activations)."""
    return named_pair("digits_unet_w8a8")


def digits_unet_w4a8() -> DiffusersPair:
    """Digits UNet, FP vs optimum-quanto W4A8 (int4 weights, static int8 activations)."""
    return named_pair("digits_unet_w4a8")


def digits_unet_w4a4() -> DiffusersPair:
    """Digits UNet, FP vs torchao fake-quant W4A4 (group-wise int4 weights, per-token int4 activations)."""
    return named_pair("digits_unet_w4a4")


def digits_unet_w3a4() -> DiffusersPair:
    """Digits UNet, FP vs torchao fake-quant W3A4."""
    return named_pair("digits_unet_w3a4")


def digits_unet_svdquant_w4a4() -> DiffusersPair:
    """Digits UNet, FP vs SVDQuant-style W4A4 (smoothing + FP rank-8 branch + W4A4 residual)."""
    return named_pair("digits_unet_svdquant_w4a4")


def digits_unet_mixdq_w4a8() -> DiffusersPair:
    """Digits UNet, FP vs MixDQ-style mixed {8,4,3}-bit weights (average <= 4), A8."""
    return named_pair("digits_unet_mixdq_w4a8")


def digits_unet_mixdq_w5a8() -> DiffusersPair:
    """Digits UNet, FP vs MixDQ-style mixed {8,4,3}-bit weights (average <= 5), A8."""
    return named_pair("digits_unet_mixdq_w5a8")


def digits_dit_w8a8() -> DiffusersPair:
    """Digits flow DiT, FP vs optimum-quanto W8A8."""
    return named_pair("digits_dit_w8a8")


def digits_dit_w4a8() -> DiffusersPair:
    """Digits flow DiT, FP vs optimum-quanto W4A8."""
    return named_pair("digits_dit_w4a8")


def digits_dit_w4a4() -> DiffusersPair:
    """Digits flow DiT, FP vs torchao fake-quant W4A4."""
    return named_pair("digits_dit_w4a4")


def digits_dit_w3a4() -> DiffusersPair:
    """Digits flow DiT, FP vs torchao fake-quant W3A4."""
    return named_pair("digits_dit_w3a4")


def digits_dit_svdquant_w4a4() -> DiffusersPair:
    """Digits flow DiT, FP vs SVDQuant-style W4A4."""
    return named_pair("digits_dit_svdquant_w4a4")


def digits_dit_mixdq_w4a8() -> DiffusersPair:
    """Digits flow DiT, FP vs MixDQ-style mixed weights (average <= 4 bits), A8."""
    return named_pair("digits_dit_mixdq_w4a8")


def digits_dit_mixdq_w5a8() -> DiffusersPair:
    """Digits flow DiT, FP vs MixDQ-style mixed weights (average <= 5 bits), A8."""
    return named_pair("digits_dit_mixdq_w5a8")


__all__ = [
    "CALIBRATION_CALLS",
    "CALIBRATION_SEED",
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
    "pair_name",
    "quantized_digits_model",
]
