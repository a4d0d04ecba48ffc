"""Overhead of the Q-Drift correction inside a diffusers pipeline: whole runs and the correction alone.

    python studies/bench_pipeline.py [--batch 64 256] [--steps 50] [--repeats 9] \\
        [--schedulers ddim dpmpp-2m] [--threads N]

The digits U-Net (``data/digits_unet`` when it exists, through ``qdrift_stats.zoo.load_digits_unet``;
otherwise a randomly initialised ``UNet2DModel`` of the same config: the timing is the same) runs
in a small class-conditional pipeline with classifier-free guidance (:class:`DigitsUNetPipeline`, the
loop every diffusers pipeline runs). Per scheduler and batch size it measures

- a whole pipeline call, plain and with ``pipe.scheduler = QDriftScheduler(...)``, alternating the
  two ``--repeats`` times after one warm-up each; the table gives the medians and the overhead
  ``median(wrapped) / median(plain) - 1`` (and the median of the per-pair ratios, less sensitive to
  drifts in machine load);
- one scheduler step alone, plain and wrapped, on the pipeline's latent shape (median over all
  steps of a schedule, ``--step-repeats`` times), and the correction alone (``Corrector.__call__``).
  ``steps x (wrapped step - plain step) / plain run`` is the overhead the step timing predicts.

The estimator is synthetic (``v_i = 0.01 b_{i+1}^2``, non-zero on every step but the last, so the
correction runs on every step): the cost does not depend on the values. Runs on CUDA when
available (the same tables, with ``torch.cuda.synchronize`` around each timed region), else CPU.
Writes the tables to ``docs/results/pipeline.md`` (generated section ``bench_pipeline``).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, command_line, write_section  # noqa: E402

from qdrift_stats.correct.diffusers import QDriftScheduler  # noqa: E402
from qdrift_stats.correct.estimator_file import EstimatorFile  # noqa: E402
from qdrift_stats.schedulers.base import make_scheduler  # noqa: E402
from qdrift_stats.zoo import NULL_CLASS, NUM_CLASSES, build_model, load_digits_unet, load_scheduler_config  # noqa: E402
from qdrift_stats.zoo.models import model_folder  # noqa: E402

PAGE = ROOT / "docs" / "results" / "pipeline.md"


class DigitsUNetPipeline(DiffusionPipeline):
    """Class-conditional sampling with classifier-free guidance for a ``UNet2DModel`` with class embeddings.

    The standard diffusers loop (``init_noise_sigma``, ``scale_model_input``, ``step``); the
    conditional and the null-class (``null_class``) inputs run as one batch of ``2 * batch``.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: Any, scheduler: Any):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int],
        guidance_scale: float = 2.0,
        num_inference_steps: int = 50,
        generator: torch.Generator | None = None,
        null_class: int = NULL_CLASS,
        output_type: str = "pt",
    ) -> ImagePipelineOutput:
        device = self._execution_device
        size, channels = self.unet.config.sample_size, self.unet.config.in_channels
        latents = randn_tensor(
            (len(class_labels), channels, size, size), generator=generator, device=device, dtype=self.unet.dtype
        )
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        labels = torch.tensor(class_labels, device=device)
        labels = torch.cat([labels, torch.full_like(labels, null_class)])
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(torch.cat([latents, latents]), t)
            cond, uncond = self.unet(model_input, t, class_labels=labels).sample.chunk(2)
            guided = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(guided, t, latents).prev_sample
        return ImagePipelineOutput(images=latents)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock seconds for one call of ``fn`` (device work included)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def timed_cpu(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """``(wall, process CPU)`` seconds for one call of ``fn``.

    The process CPU time counts only this process's work, so on a shared machine it is far less
    disturbed by other processes than the wall clock (it is the better CPU figure with one thread).
    """
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def digits_unet(device: torch.device) -> tuple[Any, str]:
    """The shipped digits U-Net, or a random one of the same config; with a description."""
    if (model_folder("unet") / "config.json").is_file():
        model, source = load_digits_unet(), "shipped digits U-Net (data/digits_unet)"
    else:
        torch.manual_seed(0)
        model, source = (
            build_model("unet").eval().requires_grad_(False),
            "UNet2DModel of the digits config, random weights (data/digits_unet absent)",
        )
    return model.to(device), source


def synthetic_estimator(scheduler: Any, steps: int) -> EstimatorFile:
    configured = type(scheduler).from_config(scheduler.config)
    configured.set_timesteps(steps)
    est = EstimatorFile.zeros_like_grid(configured)
    est.tensors["variance"] = 0.01 * est.tensors["b_next"] ** 2
    return est


def bench_pipeline(
    pipe: DigitsUNetPipeline, scheduler_name: str, batch: int, steps: int, repeats: int, device: torch.device
) -> dict[str, float]:
    plain = make_scheduler(scheduler_name, load_scheduler_config("unet"))
    wrapped = QDriftScheduler(
        make_scheduler(scheduler_name, load_scheduler_config("unet")), synthetic_estimator(plain, steps)
    )
    labels = [k % NUM_CLASSES for k in range(batch)]

    def call() -> Any:
        return pipe(labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))

    times: dict[str, list[tuple[float, float]]] = {"plain": [], "wrapped": []}
    for scheduler in (plain, wrapped):  # warm-up
        pipe.scheduler = scheduler
        timed(call, device)
    for k in range(repeats):
        order = (("plain", plain), ("wrapped", wrapped)) if k % 2 == 0 else (("wrapped", wrapped), ("plain", plain))
        for label, scheduler in order:
            pipe.scheduler = scheduler
            times[label].append(timed_cpu(call, device))
    result = {}
    for clock, index in (("wall", 0), ("cpu", 1)):
        plain_t = [t[index] for t in times["plain"]]
        wrapped_t = [t[index] for t in times["wrapped"]]
        plain_median, wrapped_median = statistics.median(plain_t), statistics.median(wrapped_t)
        result.update(
            {
                f"{clock}_plain_s": plain_median,
                f"{clock}_wrapped_s": wrapped_median,
                f"{clock}_overhead": wrapped_median / plain_median - 1.0,
                f"{clock}_paired_overhead": statistics.median(w / p for w, p in zip(wrapped_t, plain_t)) - 1.0,
                f"{clock}_spread": (max(plain_t) - min(plain_t)) / plain_median,
            }
        )
    return result


def bench_steps(
    scheduler_name: str, batch: int, steps: int, step_repeats: int, device: torch.device
) -> dict[str, float]:
    """Median seconds of one step: plain, wrapped, and the correction alone, on ``(batch, 1, 8, 8)``."""
    plain = make_scheduler(scheduler_name, load_scheduler_config("unet"))
    wrapped = QDriftScheduler(
        make_scheduler(scheduler_name, load_scheduler_config("unet")), synthetic_estimator(plain, steps)
    )
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch, 1, 8, 8), generator=generator).to(device)
    out = torch.randn((batch, 1, 8, 8), generator=generator).to(device)
    per_step: dict[str, list[float]] = {"plain": [], "wrapped": [], "correction": []}
    for repeat in range(step_repeats + 1):  # the first pass warms up
        for label, scheduler in (("plain", plain), ("wrapped", wrapped)):
            scheduler.set_timesteps(steps, device=device)
            for t in scheduler.timesteps:
                dt = timed(lambda scheduler=scheduler, t=t: scheduler.step(out, t, x), device)
                if repeat:
                    per_step[label].append(dt)
        corrector = wrapped.corrector
        x_next = x * 0.9
        for i in range(steps - 1):  # the last step is not corrected (it lands on b = 0)
            dt = timed(lambda corrector=corrector, i=i, x_next=x_next: corrector(i, x, out, x_next), device)
            if repeat:
                per_step["correction"].append(dt)
    return {f"{label}_step_s": statistics.median(values) for label, values in per_step.items()}


def fmt_ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def fmt_us(seconds: float) -> str:
    return f"{1e6 * seconds:.0f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--step-repeats", type=int, default=20)
    parser.add_argument("--schedulers", nargs="+", default=["ddim", "dpmpp-2m"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--no-write", action="store_true", help="print the tables, do not write docs/results/pipeline.md"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows, step_rows, sources = [], [], {}
    for device in devices:
        unet, sources[device.type] = digits_unet(device)
        pipe = DigitsUNetPipeline(unet, make_scheduler("ddim", load_scheduler_config("unet")))
        pipe.set_progress_bar_config(disable=True)
        label = (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
        )
        for name in args.schedulers:
            for batch in args.batch:
                r = bench_pipeline(pipe, name, batch, args.steps, args.repeats, device)
                s = bench_steps(name, batch, args.steps, args.step_repeats, device)
                predicted = args.steps * (s["wrapped_step_s"] - s["plain_step_s"]) / r["wall_plain_s"]
                clocks = ("wall", "cpu") if device.type == "cpu" else ("wall",)
                for clock in clocks:
                    rows.append(
                        f"| {label} | {clock} | {name} | {batch} | {fmt_ms(r[f'{clock}_plain_s'])} "
                        f"| {fmt_ms(r[f'{clock}_wrapped_s'])} | "
                        f"{100 * r[f'{clock}_overhead']:+.2f}% | "
                        f"{100 * r[f'{clock}_paired_overhead']:+.2f}% | {100 * r[f'{clock}_spread']:.1f}% |"
                    )
                step_rows.append(
                    f"| {label} | {name} | {batch} | {fmt_us(s['plain_step_s'])} | {fmt_us(s['wrapped_step_s'])} | "
                    f"{fmt_us(s['correction_step_s'])} | {100 * predicted:+.3f}% |"
                )
                print("\n".join(rows[-len(clocks) :]), flush=True)
                print(step_rows[-1], flush=True)

    gpu_line = (
        ""
        if torch.cuda.is_available()
        else "\n**GPU: no GPU was available** for this run; the script detects CUDA and adds the "
        "same rows for it when present.\n"
    )
    markdown = "\n".join(
        [
            f"Command: `{command_line()}`  ",
            f"Machine: {platform.machine()} {platform.processor() or ''} CPU, torch {torch.__version__}, "
            f"{args.steps} steps, guidance 2.0 (U-Net batch = 2 x batch), model: {sources['cpu']}; "
            f"machine load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.",
            gpu_line,
            f"Whole pipeline call, {args.repeats} alternating repeats after a warm-up, medians in ms (`wall`: "
            "wall clock; `cpu`: this process's CPU time, the figure least disturbed by other processes on a shared "
            "machine):",
            "",
            "| device | clock | scheduler | batch | plain (ms) | wrapped (ms) | overhead of "
            "medians | median paired overhead | plain spread (max-min)/median |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "One scheduler step alone (median over the schedule's steps and repeats, microseconds) and the "
            "overhead it predicts for a whole call (`steps x (wrapped - plain) / plain call`):",
            "",
            "| device | scheduler | batch | plain step (us) | wrapped step (us) | correction alone "
            "(us) | predicted overhead |",
            "|---|---|---|---|---|---|---|",
            *step_rows,
        ]
    )
    print(markdown)
    if not args.no_write:
        write_section("bench_pipeline", markdown, page=PAGE)
        print(f"wrote {PAGE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
