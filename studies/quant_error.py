"""Relative output error of every PTQ recipe in qdrift_stats.quantize on tiny models.

    python studies/quant_error.py [--seeds 3] [--calib 4] [--eval 4]

Models (random initialisation, so this measures the quantizers, not a trained network):
- ``unet``: diffusers UNet2DModel, 8x8x1, block_out_channels (8, 16), one attention level,
  11 class embeddings; calls are (noise, random timestep, random class label), batch 8;
- ``mlp``: Linear(16,64)-SiLU-Linear(64,64)-SiLU-Linear(64,16), Gaussian inputs, batch 16;
- ``mlp-outliers``: Linear(64,128)-GELU-Linear(128,64) whose inputs have 4 of 64 channels
  scaled by 30 (the activation-outlier situation SVDQuant targets), batch 32.
Relative error = sqrt(sum ||y_q - y_fp||^2 / sum ||y_fp||^2) over held-out calls (not the
calibration calls). Prints a markdown table: mean (min-max) over seeds.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from qdrift_stats.quantize import RECIPES, _call, quantize


def unet(seed: int, n_calib: int, n_eval: int):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    fp = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        num_class_embeds=11,
        layers_per_block=1,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()
    g = torch.Generator().manual_seed(1000 + seed)

    def call():
        return (
            (torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g)),
            {"class_labels": torch.randint(0, 11, (8,), generator=g)},
        )

    return fp, [call() for _ in range(n_calib)], [call() for _ in range(n_eval)]


def mlp(seed: int, n_calib: int, n_eval: int):
    torch.manual_seed(seed)
    fp = nn.Sequential(nn.Linear(16, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 16)).eval()
    g = torch.Generator().manual_seed(1000 + seed)
    return (
        fp,
        [((torch.randn(16, 16, generator=g),), {}) for _ in range(n_calib)],
        [((torch.randn(16, 16, generator=g),), {}) for _ in range(n_eval)],
    )


def mlp_outliers(seed: int, n_calib: int, n_eval: int):
    torch.manual_seed(seed)
    fp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval()
    scale = torch.ones(64)
    scale[torch.randperm(64)[:4]] = 30.0
    g = torch.Generator().manual_seed(1000 + seed)
    return (
        fp,
        [((torch.randn(32, 64, generator=g) * scale,), {}) for _ in range(n_calib)],
        [((torch.randn(32, 64, generator=g) * scale,), {}) for _ in range(n_eval)],
    )


MODELS = {"unet": unet, "mlp": mlp, "mlp-outliers": mlp_outliers}


def rel_error(q, fp, calls) -> float:
    num = sum(float((_call(q, a, k) - _call(fp, a, k)).pow(2).sum()) for a, k in calls)
    den = sum(float(_call(fp, a, k).pow(2).sum()) for a, k in calls)
    return (num / den) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--calib", type=int, default=4)
    ap.add_argument("--eval", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    recipes = list(RECIPES)
    errors = {(m, r): [] for m in MODELS for r in recipes}
    seconds = {r: 0.0 for r in recipes}
    for model_name, make in MODELS.items():
        for seed in range(args.seeds):
            fp, calib, ev = make(seed, args.calib, args.eval)
            for r in recipes:
                t0 = time.perf_counter()
                q = quantize(fp, r, calib)
                if model_name == "unet":
                    seconds[r] += time.perf_counter() - t0
                errors[model_name, r].append(rel_error(q, fp, ev))

    def cell(v):
        return f"{sum(v) / len(v):.4f} ({min(v):.4f}-{max(v):.4f})"

    print(
        f"relative output error, mean (min-max) over {args.seeds} seeds; "
        f"{args.calib} calibration calls, {args.eval} held-out calls\n"
    )
    print("| recipe | W/A bits | " + " | ".join(MODELS) + " | quantize time, unet (s) |")
    print("|---|---|" + "---|" * len(MODELS) + "---|")
    for r in recipes:
        info = RECIPES[r]
        bits = f"{info.weight_bits:g}/{info.activation_bits}"
        cells = " | ".join(cell(errors[m, r]) for m in MODELS)
        print(f"| `{r}` | {bits} | {cells} | {seconds[r] / args.seeds:.2f} |")


if __name__ == "__main__":
    main()
