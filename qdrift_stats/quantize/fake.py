"""Fake (simulated) quantization built on torchao's QAT fake quantizers: recipes ``w4a4`` and ``w3a4``.

Every ``nn.Linear`` and ``nn.Conv2d`` of the model is replaced by a layer that

- holds a **weight fake-quantized once** at quantization time: symmetric, group-wise along the
  input dimension (``group_size`` 32 by default) with torchao's
  :class:`~torchao.quantization.qat.IntxFakeQuantizer` (``IntxFakeQuantizeConfig(torch.intN,
  group_size=g, is_symmetric=True)``). A conv weight ``(out, in, kh, kw)`` is flattened to
  ``(out, in*kh*kw)`` first, so groups run along the flattened input fan-in of each output channel.
  Where the fan-in is not a multiple of the group size (or smaller than it) the group is the whole
  row, i.e. per-output-channel quantization. The integer range is the signed ``N``-bit range
  (``[-8, 7]`` for 4 bits, ``[-4, 3]`` for 3 bits: ``torch.int3`` is a torchao QAT dtype in 0.18);
- fake-quantizes its **input activations per token, dynamically, asymmetrically** (torchao's per-token
  fake quantizer only exists in the asymmetric form) with ``IntxFakeQuantizeConfig(torch.intN,
  "per_token", is_symmetric=False)``: one scale and zero point per row of a Linear input and per
  pixel (over the channels) of a Conv2d input.

Nothing here rounds by hand; all rounding, clamping and scale choice is torchao's. The values are
float32 throughout (simulated quantization: the point is the numerical error, not the speed).

This module also holds the machinery shared by :mod:`.svdquant` and :mod:`.mixdq`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from fnmatch import fnmatch
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qdrift_stats.errors import QDriftError

Calibration = Sequence[tuple[tuple, dict]]


@contextlib.contextmanager
def quiet_import_logs():
    """torchao logs a warning per CUDA-only extension it cannot load on a CPU-only machine; hide them."""
    names = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


with quiet_import_logs():
    from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer


# --------------------------------------------------------------------------------------------------
# calling models and checking calibration data


def _to_tensor(out: Any) -> torch.Tensor:
    """The main output tensor of a model call: ``.sample`` of a diffusers output, else element 0."""
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, dict) and out:
        return _to_tensor(next(iter(out.values())))
    if isinstance(out, (tuple, list)) and out:
        return _to_tensor(out[0])
    raise QDriftError(f"cannot find the output tensor in a model output of type {type(out).__name__}")


def call_model(model: nn.Module, args: tuple = (), kwargs: dict | None = None) -> torch.Tensor:
    """Call ``model(*args, **kwargs)`` without gradients and return its main output tensor."""
    with torch.no_grad():
        out = model(*args, **(kwargs or {}))
    out = _to_tensor(out)
    dequantize = getattr(out, "dequantize", None)
    if type(out) is not torch.Tensor and callable(dequantize):  # a quanto QTensor
        out = dequantize()
    return out


def check_calibration(calibration: Any, recipe: str, required: bool) -> list[tuple[tuple, dict]]:
    """Validate calibration calls: a list of ``(args, kwargs)``; raise QDriftError when malformed."""
    if calibration is None:
        if required:
            raise QDriftError(
                f"recipe {recipe!r} needs calibration data: pass calibration=[(args, kwargs), ...] "
                "with a few representative model calls"
            )
        return []
    calls = list(calibration)
    if required and not calls:
        raise QDriftError(f"recipe {recipe!r} needs at least one calibration call, got an empty list")
    out = []
    for i, call in enumerate(calls):
        if not (isinstance(call, (tuple, list)) and len(call) == 2):
            raise QDriftError(f"calibration call {i} must be a pair (args, kwargs), got {type(call).__name__}")
        args, kwargs = call
        if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
            raise QDriftError(f"calibration call {i} must be (tuple of args, dict of kwargs)")
        out.append((tuple(args), dict(kwargs)))
    return out


def run_calibration(model: nn.Module, calibration: Iterable[tuple[tuple, dict]]) -> list[torch.Tensor]:
    """Run every calibration call through ``model``; return the main outputs."""
    return [call_model(model, args, kwargs) for args, kwargs in calibration]


# --------------------------------------------------------------------------------------------------
# finding and replacing layers


def _selected(name: str, include: str | Sequence[str] | None, exclude: str | Sequence[str] | None) -> bool:
    if include is not None:
        include = [include] if isinstance(include, str) else include
        if not any(fnmatch(name, p) for p in include):
            return False
    if exclude is not None:
        exclude = [exclude] if isinstance(exclude, str) else exclude
        if any(fnmatch(name, p) for p in exclude):
            return False
    return True


def target_layers(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> dict[str, nn.Module]:
    """The ``nn.Linear`` and ``nn.Conv2d`` layers of ``model`` to quantize, by qualified name.

    ``include``/``exclude`` are fnmatch patterns on the names (as in optimum-quanto). Layers
    already replaced by this package are skipped. The root module itself has the name ``""``.
    """
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLayer) or not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if any(isinstance(p, QuantLayer) for p in _parents(model, name)):
            continue
        if _selected(name, include, exclude):
            layers[name] = module
    return layers


def _parents(model: nn.Module, name: str) -> list[nn.Module]:
    if not name:
        return []
    parts = name.split(".")
    mods, m = [], model
    for p in parts[:-1]:
        m = getattr(m, p)
        mods.append(m)
    return mods


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` in ``model``; return the (possibly new) root."""
    if not name:
        return new
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return model


def collect_input_absmax(
    model: nn.Module, layers: dict[str, nn.Module], calibration: Sequence[tuple[tuple, dict]]
) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of each layer's input over the calibration calls.

    The channel dimension is the last one for ``nn.Linear`` and dim 1 for ``nn.Conv2d``. Layers that
    are never called are absent from the result.
    """
    stats: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(name: str, layer: nn.Module) -> Callable:
        def hook(module, inputs):
            x = inputs[0].detach().abs().float()
            if isinstance(layer, nn.Conv2d):
                x = x.movedim(1, -1)
            amax = x.reshape(-1, x.shape[-1]).amax(dim=0)
            stats[name] = amax if name not in stats else torch.maximum(stats[name], amax)

        return hook

    for name, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(hook_for(name, layer)))
    try:
        run_calibration(model, calibration)
    finally:
        for h in handles:
            h.remove()
    return stats


# --------------------------------------------------------------------------------------------------
# torchao fake quantizers


def _int_dtype(bits: int) -> torch.dtype:
    if not 2 <= int(bits) <= 8:
        raise QDriftError(f"bit width must be between 2 and 8, got {bits}")
    return torch.int8 if int(bits) == 8 else getattr(torch, f"int{int(bits)}")


def fake_quantize_weight(weight: torch.Tensor, bits: int, group_size: int = 32) -> torch.Tensor:
    """Symmetric group-wise fake quantization of a weight with torchao's ``IntxFakeQuantizer``.

    The weight is viewed as ``(out, fan_in)``; groups of ``group_size`` run along ``fan_in``, or the
    whole row (per output channel) when ``fan_in`` is not a multiple of ``group_size``. A weight with
    ``fan_in == 1`` (e.g. a 1x1 conv on one channel) is quantized per tensor.
    """
    w = weight.detach()
    w2 = w.reshape(w.shape[0], -1).float()
    cols = w2.shape[1]
    transpose = False
    if cols == 1:
        # torchao's group path needs groups of >= 2 elements: quantize the column as one group
        w2, cols, transpose = w2.t(), w2.shape[0], True
        if cols == 1:
            return w.clone()  # a single scalar: nothing to group (left in full precision)
    if group_size and cols > group_size and cols % group_size == 0:
        config = IntxFakeQuantizeConfig(_int_dtype(bits), group_size=int(group_size), is_symmetric=True)
    else:
        config = IntxFakeQuantizeConfig(_int_dtype(bits), "per_channel", is_symmetric=True)
    with torch.no_grad():
        q = IntxFakeQuantizer(config)(w2.contiguous())
    if transpose:
        q = q.t()
    return q.reshape(w.shape).to(w.dtype)


class TokenFakeQuantizer(nn.Module):
    """Dynamic per-token asymmetric activation fake quantization (torchao ``IntxFakeQuantizer``).

    ``channel_dim`` is the dimension that holds the features of a token: -1 for Linear inputs,
    1 for Conv2d inputs (a token is then one pixel). ``bits=None`` disables it.
    """

    def __init__(self, bits: int | None, channel_dim: int = -1):
        super().__init__()
        self.bits = None if bits is None else int(bits)
        self.channel_dim = channel_dim
        self.quantizer = (
            None
            if bits is None
            else IntxFakeQuantizer(IntxFakeQuantizeConfig(_int_dtype(bits), "per_token", is_symmetric=False))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantizer is None or x.numel() == 0:
            return x
        if x.shape[self.channel_dim] == 1:
            # One feature per token: asymmetric quantization with zero in range represents a single
            # value exactly, so this is the identity. (torchao 0.18 also mis-reduces this case: a
            # block of size 1 gives an empty reduction list and amin/amax then reduce everything.)
            return x
        moved = self.channel_dim not in (-1, x.dim() - 1)
        y = x.movedim(self.channel_dim, -1).contiguous() if moved else x.contiguous()
        dtype = y.dtype
        y = self.quantizer(y.float()).to(dtype)
        # the torchao quantizer keeps the last scales as attributes; drop them (nothing is reused)
        self.quantizer.scale = None
        self.quantizer.zero_point = None
        return y.movedim(-1, self.channel_dim) if moved else y

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_token, asymmetric, channel_dim={self.channel_dim}"


class QuantLayer:
    """Marker base of every layer this package puts in a model."""

    weight_bits: int | None
    act_bits: int | None


class FakeQuantLinear(QuantLayer, nn.Linear):
    """``nn.Linear`` with a fake-quantized weight and per-token fake-quantized inputs."""

    @classmethod
    def from_float(
        cls, layer: nn.Linear, weight_bits: int | None, act_bits: int | None, group_size: int = 32
    ) -> FakeQuantLinear:
        q = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        w = layer.weight.detach()
        q.weight = nn.Parameter(
            w.clone() if weight_bits is None else fake_quantize_weight(w, weight_bits, group_size), requires_grad=False
        )
        q.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        q.weight_bits, q.act_bits, q.group_size = weight_bits, act_bits, group_size
        q.act_quant = TokenFakeQuantizer(act_bits, channel_dim=-1)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act_quant(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight_bits={self.weight_bits}, act_bits={self.act_bits}"


class FakeQuantConv2d(QuantLayer, nn.Conv2d):
    """``nn.Conv2d`` with a fake-quantized weight and per-pixel fake-quantized inputs."""

    @classmethod
    def from_float(
        cls, layer: nn.Conv2d, weight_bits: int | None, act_bits: int | None, group_size: int = 32
    ) -> FakeQuantConv2d:
        q = cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            device="meta",
        )
        w = layer.weight.detach()
        q.weight = nn.Parameter(
            w.clone() if weight_bits is None else fake_quantize_weight(w, weight_bits, group_size), requires_grad=False
        )
        q.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        q.weight_bits, q.act_bits, q.group_size = weight_bits, act_bits, group_size
        q.act_quant = TokenFakeQuantizer(act_bits, channel_dim=1)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.act_quant(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight_bits={self.weight_bits}, act_bits={self.act_bits}"


def fake_quant_layer(
    layer: nn.Module, weight_bits: int | None, act_bits: int | None, group_size: int = 32
) -> nn.Module:
    """The fake-quantized replacement of one ``nn.Linear`` / ``nn.Conv2d``."""
    if isinstance(layer, nn.Linear):
        return FakeQuantLinear.from_float(layer, weight_bits, act_bits, group_size)
    if isinstance(layer, nn.Conv2d):
        return FakeQuantConv2d.from_float(layer, weight_bits, act_bits, group_size)
    raise TypeError(f"cannot fake-quantize a {type(layer).__name__}")


def finish(model: nn.Module) -> nn.Module:
    """Inference mode for a quantized twin: eval, no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def fake_quantize_model(
    model: nn.Module,
    weight_bits: int | None,
    act_bits: int | None,
    *,
    group_size: int = 32,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> nn.Module:
    """Replace, in place, every selected Linear/Conv2d with its fake-quantized version; return the root."""
    if group_size is not None and int(group_size) < 2:
        raise QDriftError(f"group_size must be at least 2, got {group_size}")
    layers = target_layers(model, include, exclude)
    if not layers:
        raise QDriftError("the model has no nn.Linear or nn.Conv2d layer to quantize (check include/exclude)")
    for name, layer in layers.items():
        model = set_submodule(model, name, fake_quant_layer(layer, weight_bits, act_bits, group_size))
    return finish(model)


# --------------------------------------------------------------------------------------------------
# recipes


def w4a4(
    model: nn.Module,
    calibration: Calibration | None = None,
    *,
    group_size: int = 32,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> nn.Module:
    """4-bit symmetric group-wise weights, 4-bit per-token dynamic activations (torchao fake quant).

    Quantizes ``model`` in place (``quantize`` hands it a deep copy). Calibration is not needed
    (activation ranges are dynamic) and is ignored.
    """
    check_calibration(calibration, "w4a4", required=False)
    return fake_quantize_model(model, 4, 4, group_size=group_size, include=include, exclude=exclude)


def w3a4(
    model: nn.Module,
    calibration: Calibration | None = None,
    *,
    group_size: int = 32,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> nn.Module:
    """3-bit (``[-4, 3]``) symmetric group-wise weights, 4-bit per-token dynamic activations."""
    check_calibration(calibration, "w3a4", required=False)
    return fake_quantize_model(model, 3, 4, group_size=group_size, include=include, exclude=exclude)
