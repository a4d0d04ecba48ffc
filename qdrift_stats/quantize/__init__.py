"""Post-training quantization recipes for any diffusers model (or any ``torch.nn.Module``).

``quantize(model, recipe, calibration, **options)`` returns the quantized twin of ``model``: a deep
copy with its ``nn.Linear`` / ``nn.Conv2d`` layers quantized, in eval mode and without gradients; the
full-precision model is left untouched. ``calibration`` is a list of model calls ``(args, kwargs)``,
e.g. ``((sample, timestep), {"class_labels": labels})`` for a ``UNet2DModel``; recipes with static
activation scales or data-dependent choices need it. The twin is called like the original
(``return_dict=False`` included), runs on CPU in float32 and is deterministic.

========================  =======================================================  ======  =====
recipe                    what                                                     W bits  A bits
========================  =======================================================  ======  =====
``w8a8``                  optimum-quanto qint8 weights, calibrated static qint8    8       8
``w4a8``                  optimum-quanto qint4 weights, calibrated static qint8    4       8
``w4a4``                  torchao fake quant: group-wise W4, per-token dynamic A4  4       4
``w3a4``                  torchao fake quant: group-wise W3, per-token dynamic A4  3       4
``svdquant-w4a4``         smoothing + FP low-rank branch + W4A4 residual           4       4
``mixdq-w4a8``            per-layer {8,4,3}-bit weights by sensitivity, avg <= 4   4       8
``mixdq-w5a8``            as above, average <= 5 bits                              5       8
========================  =======================================================  ======  =====

See ``docs/quantization.md`` for details and measured errors.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from qdrift_stats.errors import QDriftError


@dataclass(frozen=True)
class RecipeInfo:
    """One quantization recipe: where its function lives, what it does, its nominal bit widths."""

    name: str
    module: str  # submodule of qdrift_stats.quantize holding the function
    function: str
    description: str
    weight_bits: float  # nominal (for mixed precision: the average budget)
    activation_bits: int
    library: str
    needs_calibration: bool

    @property
    def fn(self) -> Callable[..., nn.Module]:
        """The recipe function ``fn(model, calibration=None, **options)`` (imported on first use)."""
        return getattr(importlib.import_module(f"{__name__}.{self.module}"), self.function)


RECIPES: dict[str, RecipeInfo] = {
    info.name: info
    for info in (
        RecipeInfo(
            "w8a8",
            "quanto",
            "w8a8",
            "optimum-quanto: qint8 per-channel weights, static per-tensor qint8 activations (Calibration)",
            8,
            8,
            "optimum-quanto",
            True,
        ),
        RecipeInfo(
            "w4a8",
            "quanto",
            "w4a8",
            "optimum-quanto: qint4 group-wise/per-channel weights, static per-tensor qint8 activations",
            4,
            8,
            "optimum-quanto",
            True,
        ),
        RecipeInfo(
            "w4a4",
            "fake",
            "w4a4",
            "torchao fake quant: symmetric group-wise (32) int4 weights, per-token dynamic int4 activations",
            4,
            4,
            "torchao",
            False,
        ),
        RecipeInfo(
            "w3a4",
            "fake",
            "w3a4",
            "torchao fake quant: symmetric group-wise (32) int3 weights, per-token dynamic int4 activations",
            3,
            4,
            "torchao",
            False,
        ),
        RecipeInfo(
            "svdquant-w4a4",
            "svdquant",
            "svdquant_w4a4",
            "SVDQuant-style: SmoothQuant smoothing, full-precision rank-8 SVD branch, W4A4 residual",
            4,
            4,
            "torchao + torch.linalg.svd",
            True,
        ),
        RecipeInfo(
            "mixdq-w4a8",
            "mixdq",
            "mixdq_w4a8",
            "MixDQ-style: per-layer {8,4,3}-bit weights chosen by output sensitivity, average <= 4 bits, A8",
            4,
            8,
            "torchao",
            True,
        ),
        RecipeInfo(
            "mixdq-w5a8",
            "mixdq",
            "mixdq_w5a8",
            "MixDQ-style: per-layer {8,4,3}-bit weights chosen by output sensitivity, average <= 5 bits, A8",
            5,
            8,
            "torchao",
            True,
        ),
    )
}


def recipe_info(recipe: str) -> RecipeInfo:
    """The :class:`RecipeInfo` of ``recipe``; QDriftError naming the known recipes if there is none."""
    info = RECIPES.get(str(recipe).strip().lower()) if isinstance(recipe, str) else None
    if info is None:
        raise QDriftError(f"unknown quantization recipe {recipe!r}; known recipes: {', '.join(RECIPES)}")
    return info


def recipe_options(recipe: str) -> list[str]:
    """The keyword options accepted by ``recipe``."""
    params = inspect.signature(recipe_info(recipe).fn).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def quantize(
    model: nn.Module,
    recipe: str,
    calibration: Sequence[tuple[tuple, dict]] | None = None,
    **options: Any,
) -> nn.Module:
    """Return a quantized deep copy of ``model`` under ``recipe`` (see :data:`RECIPES`).

    ``calibration``: a list of ``(args, kwargs)`` model calls (representative inputs; a few
    batches are enough). ``options``: recipe-specific keyword options (``include`` / ``exclude``
    fnmatch patterns on layer names for every recipe; ``group_size``; ``rank`` and ``alpha`` for
    SVDQuant; ``budget`` and ``bits`` for MixDQ). Bad input raises :class:`QDriftError`.
    """
    info = recipe_info(recipe)
    if not isinstance(model, nn.Module):
        raise QDriftError(f"quantize needs a torch.nn.Module, got {type(model).__name__}")
    allowed = recipe_options(info.name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise QDriftError(
            f"recipe {info.name!r} has no option {', '.join(unknown)}; its options: {', '.join(allowed) or 'none'}"
        )
    twin = copy.deepcopy(model)
    return info.fn(twin, calibration, **options)


def __getattr__(name: str) -> Any:
    if name == "call_model":
        from qdrift_stats.quantize.fake import call_model

        return call_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["RECIPES", "RecipeInfo", "quantize", "recipe_info", "recipe_options"]
