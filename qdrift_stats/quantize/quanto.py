"""optimum-quanto recipes: ``w8a8`` and ``w4a8``.

The standard quanto flow (https://github.com/huggingface/optimum-quanto, "Quantization workflow"):

1. ``optimum.quanto.quantize(model, weights=qint8|qint4, activations=qint8)`` swaps every
   ``nn.Linear`` / ``nn.Conv2d`` / ``nn.LayerNorm`` for ``QLinear`` / ``QConv2d`` / ``QLayerNorm``;
2. ``with optimum.quanto.Calibration(): model(*args, **kwargs)`` over the calibration calls records
   static per-tensor activation scales (absmax, momentum 0.9) and, with ``streamline=True``,
   switches off the output quantization of layers whose outputs feed only non-quantized functions;
3. ``optimum.quanto.freeze(model)`` replaces the float weights by quantized ones.

What quanto does (0.2.7): qint8 weights are symmetric per output channel (absmax); qint4 weights are
asymmetric (min/max with a shift) per output channel, in groups of 128/96/64/32 along the input where
the fan-in allows (otherwise per channel). Activations are symmetric int8 per tensor with static
scales: ``QLinear`` quantizes its input and its output, ``QConv2d`` only its output, ``QLayerNorm``
its output; with ``streamline`` an output is left in float when only non-quantized functions
(add, norm, activation) consume it - in a diffusers U-Net that is nearly every output. So that
"a8" also covers the convolutions of a U-Net, these recipes (``conv_inputs=True``, the default)
also attach quanto's own ``quantize_input`` hook to every ``QConv2d``: then the input of every
Linear and Conv2d is int8. ``conv_inputs=False`` gives quanto's stock behaviour.

Everything runs on CPU (quanto falls back to dequantize-then-matmul where it has no CPU kernel). A
forward hook on the root dequantizes a quantized tensor that would otherwise leave the model.
Nothing is rounded by hand here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from qdrift_stats.errors import QDriftError
from qdrift_stats.quantize.fake import Calibration, check_calibration, finish, quiet_import_logs

with quiet_import_logs():
    from optimum.quanto import Calibration as QuantoCalibration
    from optimum.quanto import QTensor, freeze, qint4, qint8
    from optimum.quanto import quantize as quanto_quantize
    from optimum.quanto.nn import QConv2d, QModuleMixin, quantize_module


def _dequantize(obj: Any) -> Any:
    if isinstance(obj, QTensor):
        return obj.dequantize()
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_dequantize(o) for o in obj)
    if isinstance(obj, list):
        return [_dequantize(o) for o in obj]
    if isinstance(obj, dict):  # includes diffusers BaseOutput (an OrderedDict dataclass)
        for key in list(obj.keys()):
            value = obj[key]
            if isinstance(value, QTensor):
                obj[key] = value.dequantize()
        return obj
    return obj


def _dequantize_output_hook(module: nn.Module, inputs: Any, output: Any) -> Any:
    return _dequantize(output)


def _quanto(
    model: nn.Module,
    calibration: Calibration | None,
    *,
    recipe: str,
    weights,
    activations=qint8,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    streamline: bool = True,
    momentum: float = 0.9,
    conv_inputs: bool = True,
) -> nn.Module:
    calls = check_calibration(calibration, recipe, required=activations is not None)
    model.eval()
    root = quantize_module(model, weights=weights, activations=activations)
    if root is not None:  # the model is itself one Linear/Conv2d/LayerNorm
        model = root
    else:
        quanto_quantize(model, weights=weights, activations=activations, include=include, exclude=exclude)
    if not any(isinstance(m, QModuleMixin) for m in model.modules()):
        raise QDriftError(f"recipe {recipe!r}: the model has no layer that optimum-quanto can quantize")
    if conv_inputs and activations is not None:
        # quanto's QConv2d quantizes only its output (QLinear is created with quantize_input=True,
        # QConv2d is not); in a U-Net most conv outputs feed add/norm/silu, so streamlining then
        # drops them and the convs would see float activations. Register quanto's own input
        # quantization hook, as QModuleMixin does for quantize_input=True; Calibration calibrates
        # input_scale for every QModuleMixin with activations either way.
        for m in model.modules():
            if isinstance(m, QConv2d) and "input" not in m._quantize_hooks:
                m._quantize_hooks["input"] = m.register_forward_pre_hook(m.quantize_input)
    if calls:
        with torch.no_grad(), QuantoCalibration(momentum=momentum, streamline=streamline):
            for args, kwargs in calls:
                model(*args, **kwargs)
    freeze(model)
    model.register_forward_hook(_dequantize_output_hook)
    return finish(model)


def w8a8(
    model: nn.Module,
    calibration: Calibration | None = None,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    streamline: bool = True,
    momentum: float = 0.9,
    conv_inputs: bool = True,
) -> nn.Module:
    """quanto qint8 weights (per channel) + qint8 activations (static, calibrated). In place; needs calibration."""
    return _quanto(
        model,
        calibration,
        recipe="w8a8",
        weights=qint8,
        activations=qint8,
        include=include,
        exclude=exclude,
        streamline=streamline,
        momentum=momentum,
        conv_inputs=conv_inputs,
    )


def w4a8(
    model: nn.Module,
    calibration: Calibration | None = None,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    streamline: bool = True,
    momentum: float = 0.9,
    conv_inputs: bool = True,
) -> nn.Module:
    """quanto qint4 weights (grouped/per channel) + qint8 activations (static, calibrated). In
    place; needs calibration."""
    return _quanto(
        model,
        calibration,
        recipe="w4a8",
        weights=qint4,
        activations=qint8,
        include=include,
        exclude=exclude,
        streamline=streamline,
        momentum=momentum,
        conv_inputs=conv_inputs,
    )
