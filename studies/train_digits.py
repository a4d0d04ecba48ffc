"""Train and evaluate the digits zoo: a class-conditional UNet (VP, epsilon), a flow-matching DiT,
and the digits classifier used as the feature network of the image metrics.

    python studies/train_digits.py classifier --seed 0 --out data/digits_classifier
    python studies/train_digits.py unet --steps 5000 --seed 0 --out data/digits_unet
    python studies/train_digits.py dit --steps 5000 --seed 0 --out data/digits_dit
    python studies/train_digits.py evaluate --model unet --num-samples 1000 --steps 50
    python studies/train_digits.py grid --out docs/img/zoo_samples.png

Training is deterministic given ``--seed`` (and ``--threads``): model initialisation uses
``torch.manual_seed(seed)``, every batch, label drop, noise and timestep comes from one
``torch.Generator`` seeded with ``seed``. Data: scikit-learn's ``load_digits`` train split
(1437 images, see ``qdrift_stats.zoo.data``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qdrift_stats.zoo.data import NULL_CLASS, NUM_CLASSES, load_digits_tensors  # noqa: E402
from qdrift_stats.zoo.models import build_model, scheduler_config  # noqa: E402


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)


def train_diffusion(
    kind: str,
    steps: int,
    seed: int,
    out: Path,
    batch_size: int = 128,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    label_drop: float = 0.1,
    warmup: int = 200,
) -> dict:
    """Train the digits ``unet`` (VP, epsilon) or ``dit`` (rectified flow, velocity); save the EMA weights."""
    from diffusers.models.embeddings import LabelEmbedding

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_model(kind)
    # Label dropout is done here, with the seeded generator; switch off DiT's built-in one.
    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = 0.0
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    x_all, y_all = load_digits_tensors("train")
    sched_cfg = scheduler_config(kind)
    if kind == "unet":
        betas = torch.linspace(
            sched_cfg["beta_start"], sched_cfg["beta_end"], sched_cfg["num_train_timesteps"], dtype=torch.float64
        )
        abar = torch.cumprod(1.0 - betas, 0).float()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, warmup))
    t0 = time.time()
    running, log = None, []
    for step in range(steps):
        idx = torch.randint(0, len(y_all), (batch_size,), generator=gen)
        x0, y = x_all[idx], y_all[idx]
        drop = torch.rand(batch_size, generator=gen) < label_drop
        y = torch.where(drop, torch.full_like(y, NULL_CLASS), y)
        eps = torch.randn(x0.shape, generator=gen)
        if kind == "unet":
            t = torch.randint(0, sched_cfg["num_train_timesteps"], (batch_size,), generator=gen)
            a = abar[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
            target, t_in = eps, t.float()
        else:
            s = torch.rand(batch_size, generator=gen)
            sv = s.view(-1, 1, 1, 1)
            xt = (1 - sv) * x0 + sv * eps
            target, t_in = eps - x0, s * 1000.0
        pred = model(xt, t_in, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        _ema_update(ema, model, min(ema_decay, (1 + step) / (10 + step)))
        running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
        if (step + 1) % 500 == 0 or step + 1 == steps:
            log.append({"step": step + 1, "loss_ema": round(running, 5), "seconds": round(time.time() - t0, 1)})
            print(f"[{kind}] step {step + 1}/{steps} loss {running:.4f} ({time.time() - t0:.0f} s)", flush=True)
    seconds = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(str(out), safe_serialization=True)
    scheduler_class = "DDIMScheduler" if kind == "unet" else "FlowMatchEulerDiscreteScheduler"
    (out / "scheduler_config.json").write_text(
        json.dumps({"_class_name": scheduler_class, **sched_cfg}, indent=2) + "\n"
    )
    info = {
        "model": kind,
        "objective": "vp-epsilon" if kind == "unet" else "rectified-flow-velocity",
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "lr_schedule": "linear warmup, cosine to 5%",
        "ema_decay": ema_decay,
        "label_drop": label_drop,
        "null_class": NULL_CLASS,
        "data": "sklearn load_digits, train split (1437), x/8-1",
        "parameters": sum(p.numel() for p in ema.parameters()),
        "train_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "log": log,
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _shift_augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translations by up to ``max_shift`` pixels (background -1 fills the border)."""
    n = x.shape[0]
    padded = torch.nn.functional.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
    return out


def train_classifier(epochs: int, seed: int, out: Path, batch_size: int = 64, lr: float = 1e-3) -> dict:
    """Train the digits classifier on the train split (shift augmentation); report test accuracy."""
    from qdrift_stats.metrics.classifier import DigitsClassifier

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitsClassifier()
    x_tr, y_tr = load_digits_tensors("train")
    x_te, y_te = load_digits_tensors("test")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(y_tr) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, epochs * steps_per_epoch, 50))
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y_tr), generator=gen)
        for k in range(steps_per_epoch):
            idx = perm[k * batch_size : (k + 1) * batch_size]
            x = _shift_augment(x_tr[idx], gen)
            x = x + 0.05 * torch.randn(x.shape, generator=gen)
            loss = torch.nn.functional.cross_entropy(model(x), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
            model.eval()
            with torch.no_grad():
                acc = (model(x_te).argmax(1) == y_te).float().mean().item()
            print(f"[classifier] epoch {epoch + 1}/{epochs} loss {loss.item():.4f} test acc {acc:.4f}", flush=True)
    seconds = time.time() - t0
    model.eval()
    model.set_feature_normalization(x_tr)
    with torch.no_grad():
        test_acc = (model(x_te).argmax(1) == y_te).float().mean().item()
        train_acc = (model(x_tr).argmax(1) == y_tr).float().mean().item()
    info = {
        "epochs": epochs,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "augmentation": "random shift up to 1 px, gaussian noise 0.05",
        "data": "sklearn load_digits, train split (1437); test split (360)",
        "test_accuracy": round(test_acc, 4),
        "train_accuracy": round(train_acc, 4),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    model.save(out, extra={"training": info})
    return info


def evaluate(
    kind: str, num_samples: int, steps: int, seed: int, guidance: float, scheduler: str | None, n_boot: int
) -> dict:
    """FP samples of the shipped ``kind``: class consistency, FD and KID against the real digits."""
    from qdrift_stats.metrics.images import (
        bootstrap_ci,
        class_consistency,
        frechet_distance,
        kernel_inception_distance,
    )
    from qdrift_stats.zoo.pairs import digits_pair, sample_pair

    pair = digits_pair(kind, guidance_scale=guidance)
    scheduler = scheduler or ("ddim" if kind == "unet" else "flow-euler")
    t0 = time.time()
    samples, labels = sample_pair(pair, scheduler=scheduler, steps=steps, num_samples=num_samples, seed=seed)
    sample_seconds = time.time() - t0
    x_te, _ = load_digits_tensors("test")
    x_tr, _ = load_digits_tensors("train")
    cc, cc_lo, cc_hi = bootstrap_ci(lambda s, y: class_consistency(s, y), samples, labels=labels, n_boot=n_boot)
    fd_te, fd_te_lo, fd_te_hi = bootstrap_ci(lambda s: frechet_distance(x_te, s), samples, n_boot=n_boot)
    fd_tr = frechet_distance(x_tr, samples)
    kid = kernel_inception_distance(x_te, samples, subset_size=min(200, num_samples, len(x_te)))
    return {
        "model": kind,
        "scheduler": scheduler,
        "steps": steps,
        "guidance_scale": guidance,
        "num_samples": num_samples,
        "seed": seed,
        "sample_seconds": round(sample_seconds, 1),
        "class_consistency": [round(cc, 4), round(cc_lo, 4), round(cc_hi, 4)],
        "fd_vs_test": [round(fd_te, 3), round(fd_te_lo, 3), round(fd_te_hi, 3)],
        "fd_vs_train": round(fd_tr, 3),
        "kid_vs_test": [round(kid[0], 5), round(kid[1], 5)],
        "out_of_range_fraction": round(float((samples.abs() > 1.05).float().mean()), 5),
    }


def reference_metrics(n_boot: int) -> dict:
    """Real-vs-real floor: the train split (1437) against the test split (360), and the classifier."""
    from qdrift_stats.metrics.images import class_consistency, frechet_distance, kernel_inception_distance

    x_te, y_te = load_digits_tensors("test")
    x_tr, y_tr = load_digits_tensors("train")
    gen = torch.Generator().manual_seed(0)
    sub = torch.randperm(len(y_tr), generator=gen)[:1000]
    return {
        "classifier_test_accuracy": round(class_consistency(x_te, y_te), 4),
        "fd_train1000_vs_test": round(frechet_distance(x_te, x_tr[sub]), 3),
        "fd_train_vs_test": round(frechet_distance(x_te, x_tr), 3),
        "kid_train_vs_test": [round(v, 5) for v in kernel_inception_distance(x_te, x_tr, subset_size=200)],
    }


def grid(out: Path, steps: int, guidance: float, seed: int) -> None:
    """A PNG: per model one block of 10 rows (digits 0..9) x 10 samples, real digits on the left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qdrift_stats.zoo.data import to_pixels
    from qdrift_stats.zoo.pairs import DiffusersPair, digits_pair

    cols = 10
    x_te, y_te = load_digits_tensors("test")
    panels = [("real (test split)", torch.stack([x_te[y_te == d][:cols] for d in range(NUM_CLASSES)]))]
    for kind, scheduler in (("unet", "DDIMScheduler"), ("dit", "FlowMatchEulerDiscreteScheduler")):
        pair: DiffusersPair = digits_pair(kind, guidance_scale=guidance)
        labels = torch.arange(NUM_CLASSES).repeat_interleave(cols)
        import diffusers

        sched = getattr(diffusers, scheduler).from_config(pair.scheduler_config)
        sched.set_timesteps(steps)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((len(labels), 1, 8, 8), generator=gen)
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
            x = sched.step(pair.fp(inp, t, class_labels=labels), t, x).prev_sample
        name = "UNet, DDIM" if kind == "unet" else "DiT, flow Euler"
        panels.append((f"{name} {steps} steps, CFG {guidance}", x.view(NUM_CLASSES, cols, 1, 8, 8)))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4))
    for ax, (title, imgs) in zip(axes, panels):
        pix = to_pixels(imgs).squeeze(2)  # (10, cols, 8, 8)
        mosaic = torch.zeros(NUM_CLASSES * 9 - 1, cols * 9 - 1)  # white separators
        for r in range(NUM_CLASSES):
            for c in range(cols):
                mosaic[r * 9 : r * 9 + 8, c * 9 : c * 9 + 8] = pix[r, c]
        ax.imshow(16.0 - mosaic.numpy(), cmap="gray", vmin=0, vmax=16, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for kind in ("unet", "dit"):
        p = sub.add_parser(kind, help=f"train the digits {kind}")
        p.add_argument("--steps", type=int, default=5000)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--batch-size", type=int, default=128)
        p.add_argument("--lr", type=float, default=1e-3)
        p.add_argument("--out", type=Path, default=ROOT / "data" / f"digits_{kind}")
        p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("classifier", help="train the digits classifier")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "data" / "digits_classifier")
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("evaluate", help="FP-sample metrics of a shipped model (JSON on stdout)")
    p.add_argument("--model", choices=("unet", "dit", "reference"), required=True)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scheduler", default=None, help="ddim, euler, dpmpp-2m, flow-euler (default per model)")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("grid", help="sample grid PNG of both models")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "zoo_samples.png")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command in ("unet", "dit"):
        info = train_diffusion(args.command, args.steps, args.seed, args.out, batch_size=args.batch_size, lr=args.lr)
        print(json.dumps({k: v for k, v in info.items() if k != "log"}))
    elif args.command == "classifier":
        print(json.dumps(train_classifier(args.epochs, args.seed, args.out)))
    elif args.command == "evaluate":
        if args.model == "reference":
            print(json.dumps(reference_metrics(args.n_boot)))
        else:
            print(
                json.dumps(
                    evaluate(
                        args.model, args.num_samples, args.steps, args.seed, args.guidance, args.scheduler, args.n_boot
                    )
                )
            )
    else:
        grid(args.out, args.steps, args.guidance, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
