"""SVDQuant-style W4A4: smoothing + a full-precision low-rank branch + 4-bit residual (``svdquant-w4a4``).

After Li et al., "SVDQuant: Absorbing Outliers by Low-Rank Components for 4-Bit Diffusion Models"
(ICLR 2025), simulated in float32. For every ``nn.Linear`` and every ``nn.Conv2d`` with ``groups=1``
and zero padding (any kernel size: a conv is linear in its input channels, and zero padding
commutes with a per-channel division):

1. **smoothing** (SmoothQuant): per input channel ``j``,
   ``s_j = max|X_j|^alpha / max|W_{:,j}|^(1-alpha)`` with the activation maxima taken over the
   calibration calls; the layer computes ``(X / s) (W * s)^T``, which moves activation outliers into
   the weight;
2. **low-rank branch**: the rank-``r`` truncated SVD ``L = U_r S_r V_r^T`` of the smoothed weight
   ``W_hat = W * s`` (a conv weight is flattened to ``(out, in*kh*kw)``) stays in full precision and
   sees the *unquantized* smoothed input: ``X_hat L^T``. For a conv it is a ``(r, in, kh, kw)`` conv
   (same stride/padding/dilation) followed by a 1x1 conv ``(out, r)``;
3. **residual**: ``W_hat - L`` is fake-quantized to 4 bits (symmetric, group-wise, torchao, as in
   :mod:`.fake`) and its input ``X_hat`` to 4 bits per token (dynamic, asymmetric, torchao).

``rank`` defaults to 8, capped at ``min(out, fan_in) // 4`` (at least 1) for tiny layers;
``rank=0`` gives smoothing alone. Layers that the calibration calls never reach get ``s = 1``.
Other layers (grouped convs, non-zero padding modes) get plain W4A4 fake quantization.

Written by hand (there is no SVDQuant in torchao or quanto): the smoothing factors, the SVD split
(``torch.linalg.svd``) and the two forward passes. All rounding is torchao's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qdrift_stats.errors import QDriftError
from qdrift_stats.quantize.fake import (
    Calibration,
    QuantLayer,
    TokenFakeQuantizer,
    check_calibration,
    collect_input_absmax,
    fake_quant_layer,
    fake_quantize_weight,
    finish,
    set_submodule,
    target_layers,
)


def _svd_eligible(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Linear):
        return True
    return isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.padding_mode == "zeros"


def smoothing_factors(weight: torch.Tensor, act_absmax: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """SmoothQuant factors ``s_j = a_j^alpha / w_j^(1-alpha)`` per input channel (1 where undefined)."""
    in_ch = weight.shape[1]
    if act_absmax is None:
        return torch.ones(in_ch, dtype=torch.float32)
    w_max = weight.detach().float().abs().transpose(0, 1).reshape(in_ch, -1).amax(dim=1)
    a_max = act_absmax.float()
    ok = (a_max > 0) & (w_max > 0)
    s = torch.ones(in_ch, dtype=torch.float32)
    s[ok] = a_max[ok].pow(alpha) / w_max[ok].pow(1.0 - alpha)
    return s.clamp(min=1e-5, max=1e5)


class _SVDQuantMixin(QuantLayer):
    def _init_svd(
        self,
        layer: nn.Module,
        act_absmax: torch.Tensor | None,
        *,
        alpha: float,
        rank: int,
        weight_bits: int,
        act_bits: int,
        group_size: int,
    ) -> None:
        w = layer.weight.detach().float()
        out_ch, in_ch = w.shape[0], w.shape[1]
        s = smoothing_factors(w, act_absmax, alpha)
        shape = (1, in_ch) + (1,) * (w.dim() - 2)
        w_hat = w * s.reshape(shape)
        w2 = w_hat.reshape(out_ch, -1)
        r = 0 if rank <= 0 else min(int(rank), max(1, min(w2.shape) // 4))
        if r > 0:
            u, sv, vh = torch.linalg.svd(w2.double(), full_matrices=False)
            up = (u[:, :r] * sv[:r]).float()  # (out, r)
            down = vh[:r].float()  # (r, fan_in)
            residual = w2 - up @ down
        else:
            up = torch.zeros(out_ch, 0)
            down = torch.zeros(0, w2.shape[1])
            residual = w2
        dtype = layer.weight.dtype
        self.weight = nn.Parameter(
            fake_quantize_weight(residual.reshape(w.shape), weight_bits, group_size).to(dtype), requires_grad=False
        )
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.register_buffer("smooth", s.to(dtype))
        self.register_buffer("lora_down", down.reshape((r,) + tuple(w.shape[1:])).to(dtype))
        self.register_buffer("lora_up", up.reshape((out_ch, r) + (1,) * (w.dim() - 2)).to(dtype))
        self.rank, self.alpha = r, float(alpha)
        self.weight_bits, self.act_bits, self.group_size = weight_bits, act_bits, group_size

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", rank={self.rank}, alpha={self.alpha}, "
            f"weight_bits={self.weight_bits}, act_bits={self.act_bits}"
        )


class SVDQuantLinear(_SVDQuantMixin, nn.Linear):
    """``y = Q(x/s) Q(W*s - L)^T + (x/s) L^T + b`` with a full-precision rank-``r`` ``L``."""

    @classmethod
    def from_float(cls, layer: nn.Linear, act_absmax: torch.Tensor | None, **kw) -> SVDQuantLinear:
        q = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        q._init_svd(layer, act_absmax, **kw)
        q.act_quant = TokenFakeQuantizer(q.act_bits, channel_dim=-1)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x / self.smooth
        y = F.linear(self.act_quant(xs), self.weight, self.bias)
        if self.rank:
            y = y + F.linear(F.linear(xs, self.lora_down), self.lora_up)
        return y


class SVDQuantConv2d(_SVDQuantMixin, nn.Conv2d):
    """The conv analogue of :class:`SVDQuantLinear` (low-rank branch: a conv to ``r`` channels, then 1x1)."""

    @classmethod
    def from_float(cls, layer: nn.Conv2d, act_absmax: torch.Tensor | None, **kw) -> SVDQuantConv2d:
        q = cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=1,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            device="meta",
        )
        q._init_svd(layer, act_absmax, **kw)
        q.act_quant = TokenFakeQuantizer(q.act_bits, channel_dim=1)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x / self.smooth.reshape(1, -1, 1, 1)
        y = self._conv_forward(self.act_quant(xs), self.weight, self.bias)
        if self.rank:
            low = F.conv2d(xs, self.lora_down, None, self.stride, self.padding, self.dilation)
            y = y + F.conv2d(low, self.lora_up)
        return y


def svdquant_w4a4(
    model: nn.Module,
    calibration: Calibration | None = None,
    *,
    rank: int = 8,
    alpha: float = 0.5,
    group_size: int = 32,
    weight_bits: int = 4,
    act_bits: int = 4,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> nn.Module:
    """SVDQuant-style W4A4 (see the module docstring). Quantizes ``model`` in place; needs calibration."""
    calls = check_calibration(calibration, "svdquant-w4a4", required=True)
    if not 0.0 <= float(alpha) <= 1.0:
        raise QDriftError(f"alpha must be in [0, 1], got {alpha}")
    if int(rank) < 0:
        raise QDriftError(f"rank must be >= 0, got {rank}")
    layers = target_layers(model, include, exclude)
    if not layers:
        raise QDriftError("the model has no nn.Linear or nn.Conv2d layer to quantize (check include/exclude)")
    absmax = collect_input_absmax(model, layers, calls)
    kw = dict(
        alpha=float(alpha),
        rank=int(rank),
        weight_bits=int(weight_bits),
        act_bits=int(act_bits),
        group_size=int(group_size),
    )
    for name, layer in layers.items():
        if isinstance(layer, nn.Linear):
            new = SVDQuantLinear.from_float(layer, absmax.get(name), **kw)
        elif _svd_eligible(layer):
            new = SVDQuantConv2d.from_float(layer, absmax.get(name), **kw)
        else:
            new = fake_quant_layer(layer, int(weight_bits), int(act_bits), int(group_size))
        model = set_submodule(model, name, new)
    return finish(model)
