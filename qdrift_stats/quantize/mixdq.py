"""MixDQ-style mixed-precision weights with 8-bit activations: ``mixdq-w4a8`` and ``mixdq-w5a8``.

After Zhao et al., "MixDQ: Memory-Efficient Few-Step Text-to-Image Diffusion Models with
Metric-Decoupled Mixed Precision Quantization" (ECCV 2024), reduced to its core, simulated in float32:

1. **sensitivity**: for every ``nn.Linear`` / ``nn.Conv2d`` and every candidate bit width ``b`` below
   the highest, only that layer's weight is fake-quantized to ``b`` bits (everything else, and all
   activations, full precision) and the relative output MSE of the *whole model* over the
   calibration calls is measured: ``sum ||y_b - y_fp||^2 / sum ||y_fp||^2``. The highest bit width
   counts as sensitivity 0.
2. **bit allocation**: every layer starts at the highest bit width; the greedy step that lowers one
   layer to its next bit width with the smallest increase of sensitivity per weight bit saved is taken
   until the parameter-weighted average weight bit width is at most ``budget``; then the spare budget
   is filled back greedily (largest sensitivity decrease per bit spent first).
3. **quantization**: weights symmetric group-wise at the chosen bit width, activations 8-bit per token
   (dynamic, asymmetric) - the same torchao fake quantizers as :mod:`.fake`. (MixDQ itself uses static
   8-bit activation scales; dynamic per-token ones are the simpler stand-in here.)

The chosen bits are recorded on the returned module as ``qdrift_bits: dict[str, int]`` (layer name ->
weight bits), with ``qdrift_avg_bits`` (parameter-weighted average) and ``qdrift_sensitivity``
(layer name -> {bits: relative MSE}).

Written by hand: the sensitivity loop and the greedy allocation (neither library has one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qdrift_stats.errors import QDriftError
from qdrift_stats.quantize.fake import (
    Calibration,
    check_calibration,
    fake_quant_layer,
    fake_quantize_weight,
    finish,
    run_calibration,
    set_submodule,
    target_layers,
)


def _relative_mse(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    num = sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(outs, refs))
    den = sum(float(r.float().pow(2).sum()) for r in refs)
    return num / max(den, 1e-30)


def layer_sensitivity(
    model: nn.Module,
    layers: dict[str, nn.Module],
    calibration: Sequence[tuple[tuple, dict]],
    bits: Sequence[int],
    group_size: int = 32,
) -> dict[str, dict[int, float]]:
    """Relative output MSE of the whole model when only one layer's weight is quantized to ``b`` bits.

    Weights are swapped in place and restored; ``model`` is left as it was.
    """
    refs = run_calibration(model, calibration)
    sens: dict[str, dict[int, float]] = {}
    for name, layer in layers.items():
        original = layer.weight.data
        sens[name] = {}
        try:
            for b in bits:
                layer.weight.data = fake_quantize_weight(original, b, group_size)
                sens[name][int(b)] = _relative_mse(run_calibration(model, calibration), refs)
        finally:
            layer.weight.data = original
    return sens


def allocate_bits(
    sensitivity: dict[str, dict[int, float]],
    sizes: dict[str, int],
    bits: Sequence[int],
    budget: float,
) -> dict[str, int]:
    """Greedy per-layer bit widths with a parameter-weighted average of at most ``budget``."""
    levels = sorted({int(b) for b in bits}, reverse=True)
    total = float(sum(sizes.values()))

    def sens(name: str, level: int) -> float:
        return 0.0 if level == 0 else sensitivity[name][levels[level]]

    def average(assign: dict[str, int]) -> float:
        return sum(levels[lv] * sizes[n] for n, lv in assign.items()) / total

    if budget < levels[-1] - 1e-9:
        raise QDriftError(
            f"bit budget {budget} is below the lowest bit width {levels[-1]}: choose a budget in "
            f"[{levels[-1]}, {levels[0]}]"
        )
    level = {name: 0 for name in sizes}
    eps = 1e-9
    # lower: smallest sensitivity increase per bit saved first
    while average(level) > budget + eps:
        best, best_cost = None, None
        for name, lv in level.items():
            if lv + 1 >= len(levels):
                continue
            saved = (levels[lv] - levels[lv + 1]) * sizes[name]
            cost = (sens(name, lv + 1) - sens(name, lv)) / saved
            if best_cost is None or cost < best_cost or (cost == best_cost and name < best):
                best, best_cost = name, cost
        if best is None:
            break
        level[best] += 1
    # fill the spare budget back: largest sensitivity decrease per bit spent first
    while True:
        spare = (budget - average(level)) * total
        best, best_gain = None, None
        for name, lv in level.items():
            if lv == 0:
                continue
            spent = (levels[lv - 1] - levels[lv]) * sizes[name]
            if spent > spare + eps:
                continue
            gain = (sens(name, lv) - sens(name, lv - 1)) / spent
            if best_gain is None or gain > best_gain or (gain == best_gain and name < best):
                best, best_gain = name, gain
        if best is None or best_gain <= 0:
            break
        level[best] -= 1
    return {name: levels[lv] for name, lv in level.items()}


def mixdq(
    model: nn.Module,
    calibration: Calibration | None = None,
    *,
    budget: float = 4.0,
    bits: Sequence[int] = (8, 4, 3),
    act_bits: int | None = 8,
    group_size: int = 32,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    recipe: str = "mixdq",
) -> nn.Module:
    """MixDQ-style mixed precision (see the module docstring). Quantizes ``model`` in place."""
    calls = check_calibration(calibration, recipe, required=True)
    levels = sorted({int(b) for b in bits}, reverse=True)
    if not levels or any(not 2 <= b <= 8 for b in levels):
        raise QDriftError(f"bits must be bit widths between 2 and 8, got {tuple(bits)}")
    budget = float(budget)
    if not levels[-1] <= budget:
        raise QDriftError(
            f"bit budget {budget} is below the lowest bit width {levels[-1]}: choose a budget in "
            f"[{levels[-1]}, {levels[0]}]"
        )
    layers = target_layers(model, include, exclude)
    if not layers:
        raise QDriftError("the model has no nn.Linear or nn.Conv2d layer to quantize (check include/exclude)")
    sens = layer_sensitivity(model, layers, calls, levels[1:], group_size)
    sizes = {name: layer.weight.numel() for name, layer in layers.items()}
    chosen = allocate_bits(sens, sizes, levels, budget)
    for name, layer in layers.items():
        model = set_submodule(model, name, fake_quant_layer(layer, chosen[name], act_bits, group_size))
    model.qdrift_bits = dict(chosen)
    model.qdrift_avg_bits = sum(chosen[n] * sizes[n] for n in chosen) / float(sum(sizes.values()))
    model.qdrift_sensitivity = sens
    return finish(model)


def mixdq_w4a8(
    model: nn.Module,
    calibration: Calibration | None = None,
    *,
    budget: float = 4.0,
    bits: Sequence[int] = (8, 4, 3),
    act_bits: int | None = 8,
    group_size: int = 32,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> nn.Module:
    """Weights {8, 4, 3} bits averaging at most 4 (parameter-weighted), activations 8 bits per token."""
    return mixdq(
        model,
        calibration,
        budget=budget,
        bits=bits,
        act_bits=act_bits,
        group_size=group_size,
        include=include,
        exclude=exclude,
        recipe="mixdq-w4a8",
    )


def mixdq_w5a8(
    model: nn.Module,
    calibration: Calibration | None = None,
    *,
    budget: float = 5.0,
    bits: Sequence[int] = (8, 4, 3),
    act_bits: int | None = 8,
    group_size: int = 32,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> nn.Module:
    """Weights {8, 4, 3} bits averaging at most 5 (parameter-weighted), activations 8 bits per token."""
    return mixdq(
        model,
        calibration,
        budget=budget,
        bits=bits,
        act_bits=act_bits,
        group_size=group_size,
        include=include,
        exclude=exclude,
        recipe="mixdq-w5a8",
    )
