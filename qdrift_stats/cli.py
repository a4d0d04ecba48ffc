"""The ``qdrift`` command line.

Exit codes: 0 success; 2 bad input (one line on stderr, no traceback); 1 an internal error
(one line; set ``QDRIFT_DEBUG=1`` for the traceback); 130 interrupted.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import click

from qdrift_stats.errors import QDriftError
from qdrift_stats.outputs import check_output

# Kept literal so that 'qdrift --help' does not import torch and diffusers (tests compare it with
# qdrift_stats.schedulers.base.SCHEDULER_NAMES).
_SCHEDULERS_LITERAL = (
    "euler",
    "ddim",
    "dpmpp-2m",
    "euler-ancestral",
    "ddpm",
    "lcm",
    "unipc",
    "deis",
    "dpmpp-2m-sde",
    "heun",
    "pndm",
    "flow-euler",
    "flow-dpmpp-2m",
)
SCHEDULER_HELP = f"One of {', '.join(_SCHEDULERS_LITERAL)}."
PAIR_HELP = "Model pair MODULE:FACTORY or path/to/file.py:FACTORY (the current folder is importable)."
QUIET_HELP = "No progress lines (they go to stderr: a bar on a terminal, one line per item elsewhere)."

EPILOG_RECORD = """\b
Example:
  qdrift record --pair qdrift_stats.testbed:mixture_vp_noise --scheduler euler \\
      --steps 50 --runs 5 --batch 64 --seed 0 --out calib.zarr
"""
EPILOG_FIT = """\b
Example:
  qdrift fit calib.zarr --out est.safetensors --correction shrink
"""
EPILOG_SAMPLE = """\b
Example:
  qdrift sample --pair qdrift_stats.testbed:mixture_vp_noise --scheduler euler --steps 50 \\
      --num-samples 1000 --batch 250 --seed 7 --model q --estimator est.safetensors --out q.npy
"""
EPILOG_DEMO = """\b
Example:
  qdrift demo                 # about a minute on 2 CPU cores
"""


def _progress(label: str, *units: str, quiet: bool = False):
    """Progress of a command's loops (:mod:`qdrift_stats.progress`): the k-th loop counts ``units[k]``."""
    from qdrift_stats.progress import progress

    calls = iter(units or ("item",))
    last = [units[-1] if units else "item"]

    def wrap(items: Iterable) -> Iterator:
        last[0] = next(calls, last[0])
        return progress(f"qdrift {label}", last[0], quiet=quiet)(items)

    return wrap


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qdrift-stats", prog_name="qdrift")
def cli() -> None:
    """Quantization-aware sampling of diffusion models (Q-Drift): record, fit, sample."""


@cli.command(epilog=EPILOG_RECORD)
@click.option("--pair", required=True, help=PAIR_HELP)
@click.option("--scheduler", required=True, help=SCHEDULER_HELP)
@click.option("--steps", required=True, type=int, help="Number of sampling steps.")
@click.option("--runs", required=True, type=int, help="Number of paired calibration runs (seeds SEED..SEED+RUNS-1).")
@click.option("--batch", required=True, type=int, help="Samples per run.")
@click.option("--seed", required=True, type=int, help="Seed of the first run.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Calibration store (zarr v3 folder).")
@click.option(
    "--trajectories", is_flag=True, help="Also store free-running FP and Q trajectories (for accumulation plots)."
)
@click.option(
    "--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16"]), help="Storage dtype."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing store recorded with other settings.")
@click.option(
    "--workers", type=int, help="Record on a local dask cluster of N worker processes (same store as without)."
)
@click.option(
    "--scheduler-address", help="Record on a running dask cluster, e.g. tcp://host:8786 (same store as without)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (store, runs, seeds).")
@click.option("--quiet", "-q", is_flag=True, help=QUIET_HELP)
def record(
    pair,
    scheduler,
    steps,
    runs,
    batch,
    seed,
    out,
    trajectories,
    dtype,
    overwrite,
    workers,
    scheduler_address,
    as_json,
    quiet,
):
    """Record paired FP/Q calibration runs into a zarr store.

    An existing store with the same settings is extended: only missing seeds are recorded, so an
    interrupted recording resumes where it stopped. With --workers or --scheduler-address the runs
    are computed on a dask cluster (the pair is built on each worker) and written here in seed order.
    """
    check_output(out, "store", overwrite=overwrite, resumable=True)
    if workers is not None or scheduler_address is not None:
        from qdrift_stats.record.distributed import record_distributed

        path = record_distributed(
            pair,
            out,
            scheduler_name=scheduler,
            steps=steps,
            runs=runs,
            batch_size=batch,
            seed=seed,
            trajectories=trajectories,
            dtype=dtype,
            overwrite=overwrite,
            scheduler_address=scheduler_address,
            n_workers=workers if workers is not None else 2,
        )
        _report_recording(path, runs, batch, steps, scheduler, as_json)
        return
    from qdrift_stats.pair import load_pair
    from qdrift_stats.record.lockstep import record as run_record

    model_pair = load_pair(pair)
    path = run_record(
        model_pair,
        out,
        pair_name=pair,
        scheduler_name=scheduler,
        steps=steps,
        runs=runs,
        batch_size=batch,
        seed=seed,
        trajectories=trajectories,
        dtype=dtype,
        overwrite=overwrite,
        progress=_progress("record", "run", quiet=quiet),
    )
    _report_recording(path, runs, batch, steps, scheduler, as_json)


EPILOG_CALIBRATE = """\b
Example (the shipped digits U-Net as a class-conditional pipeline):
  echo "3 7" > labels.txt
  qdrift calibrate data/digits_pipeline --recipe w4a8 --class-labels labels.txt \\
      --runs 5 --seed 0 --steps 25 --guidance 2.0 --out calib.zarr
"""


def _per_run(label: str, quiet: bool):
    """Progress: one line per finished run on stderr (unless ``quiet``)."""

    def wrap(items: Iterable) -> Iterator:
        import time

        items = list(items)
        for k, item in enumerate(items):
            start = time.perf_counter()
            yield item
            if not quiet:
                click.echo(
                    f"{label}: run {k + 1}/{len(items)} (seed {item}) done in {time.perf_counter() - start:.1f} s",
                    err=True,
                )

    return wrap


def _per_commit(label: str, runs: int):
    """``on_commit`` of a distributed calibration: one progress line per run written (in seed order)."""
    import time

    start = time.perf_counter()
    written = [0]

    def report(seed: int, total: int) -> None:
        written[0] += 1
        click.echo(
            f"{label}: run {written[0]}/{runs} (seed {seed}) written, {time.perf_counter() - start:.1f} s elapsed",
            err=True,
        )

    return report


@cli.command(epilog=EPILOG_CALIBRATE)
@click.argument("pipeline", type=click.Path(path_type=Path))
@click.option("--recipe", help="Quantize the pipeline's denoiser with this recipe (qdrift_stats.quantize).")
@click.option(
    "--q-pipeline", type=click.Path(path_type=Path), help="Or: a pipeline folder holding the quantized model."
)
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), help="Prompts file, one per line.")
@click.option("--class-labels", "labels_file", type=click.Path(path_type=Path), help="Class labels file (integers).")
@click.option("--runs", required=True, type=int, help="Number of paired runs (seeds SEED..SEED+RUNS-1).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the first run.")
@click.option("--steps", required=True, type=int, help="num_inference_steps of every run.")
@click.option("--guidance", type=float, help="guidance_scale (default: the pipeline's).")
@click.option("--height", type=int, help="Image height (text-to-image pipelines).")
@click.option("--width", type=int, help="Image width (text-to-image pipelines).")
@click.option("--pipeline-class", help="MODULE:CLASS of the pipeline (default: model_index.json's class).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Calibration store (zarr v3 folder).")
@click.option("--trajectories", is_flag=True, help="Also store free-running FP and Q trajectories.")
@click.option(
    "--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16"]), help="Storage dtype."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing store recorded with other settings.")
@click.option(
    "--workers",
    type=int,
    help="Compute the runs on a local dask cluster of N worker processes, each loading the pipelines once "
    "(same store as without).",
)
@click.option("--quiet", is_flag=True, help="No progress lines.")
def calibrate(
    pipeline,
    recipe,
    q_pipeline,
    prompts_file,
    labels_file,
    runs,
    seed,
    steps,
    guidance,
    height,
    width,
    pipeline_class,
    out,
    trajectories,
    dtype,
    overwrite,
    workers,
    quiet,
):
    """Record paired FP/quantized runs through a local diffusers pipeline folder (calibrate_pipeline).

    The store is the one calibrate_pipeline writes (and qdrift record's schema): fit it with 'qdrift fit'.
    An existing store with the same settings is extended with the missing seeds.
    """
    from qdrift_stats.record.folder import calibrate_folder

    if runs < 1:
        raise QDriftError("--runs must be positive")
    extra = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    path = calibrate_folder(
        pipeline,
        out,
        seeds=list(range(seed, seed + runs)),
        steps=steps,
        recipe=recipe,
        q_pipeline=q_pipeline,
        prompts_file=prompts_file,
        labels_file=labels_file,
        guidance_scale=guidance,
        pipeline_kwargs=extra or None,
        pipeline_class_spec=pipeline_class,
        trajectories=trajectories,
        dtype=dtype,
        overwrite=overwrite,
        progress=_per_run("calibrate", quiet),
        workers=workers,
        on_commit=None if quiet else _per_commit("calibrate", runs),
    )
    if not quiet:
        click.echo(f"calibrated {runs} runs, {steps} steps of {pipeline} -> {path}")


def _report_recording(path: Path, runs: int, batch: int, steps: int, scheduler: str, as_json: bool) -> None:
    if not as_json:
        click.echo(f"recorded {runs} runs x {batch} samples, {steps} {scheduler} steps -> {path}")
        return
    import json

    from qdrift_stats.record.store import store_summary

    click.echo(json.dumps(store_summary(path)))


@cli.command(epilog=EPILOG_FIT)
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Estimator file (.safetensors).")
@click.option(
    "--estimator",
    "estimator_name",
    default="persistent",
    show_default=True,
    help="Estimator name: persistent (default: an output map that regresses each step's error on the FP output and "
    "the sampler state, inverted at sampling, and the per-step statistic plus the persistence of the error along the "
    "path the corrected sampler follows before its pull; it re-runs the store's seeds with --pair; without --pair the "
    "map sees the FP output only, persistence is measured on the FP path, and the fit says so), first-order (the "
    "per-step statistic alone), empirical, decomposed, persistent-plain-map (the default before: the map sees the FP "
    "output only), persistent-nobias, persistent-noise-pull, persistent-landing, persistent-quantized-path, "
    "persistent-ptqd, auto (chosen by "
    "cross-validation; needs --pair), published and ptqd (the peers), ...",
)
@click.option(
    "--correction",
    default=None,
    type=click.Choice(["drift", "shrink", "published"]),
    help="Correction form: shrink (the default: exact for a Gaussian convolution, never diverges), drift (first order, "
    "clipped at 1) or published (the published Q-Drift code's step rescaling; the default of --estimator published).",
)
@click.option(
    "--strength", default=1.0, show_default=True, type=float, help="Strength lambda multiplying the statistic."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing estimator file.")
@click.option(
    "--pair",
    help="Model pair, for estimators that re-sample it (moment, persistent, auto); never taken from the store. "
    + PAIR_HELP,
)
@click.option("--quiet", "-q", is_flag=True, help="Do not print the summary table.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the estimate (per step, with its CI) as JSON instead of the table."
)
def fit(store, out, estimator_name, correction, strength, overwrite, pair, quiet, as_json):
    """Fit the variance statistic from a calibration store and export it."""
    from qdrift_stats.estimators import get_estimator
    from qdrift_stats.inputs import check_number

    check_number(strength, "--strength", low=0.0)
    check_output(out, "estimator", overwrite=overwrite, inputs=(store,))
    estimator = get_estimator(estimator_name)
    if pair:
        if "pair" not in estimator.param_names():
            raise QDriftError(
                "--pair is used only by estimators that re-sample the pair (moment, persistent, auto), "
                f"not {estimator_name}"
            )
        from qdrift_stats.pair import load_pair

        estimator = estimator.with_params(pair=load_pair(pair))
    fitted = estimator.fit(store)
    written = fitted.export(
        out, correction=correction, strength=strength, provenance={"store": str(store)}, overwrite=overwrite
    )
    if as_json:
        import json

        fields = {"estimator_file": str(out), "correction": written.form, "strength": strength}
        click.echo(json.dumps({**fields, **fitted.to_json()}))
        return
    if not quiet:
        click.echo(fitted.summary())
    elif fitted.interval_note():
        click.echo(f"note: {fitted.interval_note()}", err=True)
    click.echo(f"wrote {out}")


@cli.command(epilog=EPILOG_SAMPLE)
@click.option("--pair", required=True, help=PAIR_HELP)
@click.option("--scheduler", required=True, help=SCHEDULER_HELP)
@click.option("--steps", required=True, type=int)
@click.option("--num-samples", required=True, type=int)
@click.option("--batch", required=True, type=int)
@click.option("--seed", required=True, type=int, help="Seed of the first batch (batch k uses SEED+k).")
@click.option("--model", required=True, type=click.Choice(["fp", "q"]))
@click.option(
    "--estimator", "estimator_path", type=click.Path(path_type=Path), help="Estimator file: turns on the correction."
)
@click.option("--correction", type=click.Choice(["drift", "shrink"]), help="Override the file's correction form.")
@click.option("--strength", type=float, help="Override the file's strength.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output .npy, float32 (M, *sample_shape).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (output file, shape, notes).")
@click.option("--quiet", "-q", is_flag=True, help=QUIET_HELP)
def sample(
    pair,
    scheduler,
    steps,
    num_samples,
    batch,
    seed,
    model,
    estimator_path,
    correction,
    strength,
    out,
    overwrite,
    as_json,
    quiet,
):
    """Draw final clean samples with the FP or Q model, optionally corrected."""
    from qdrift_stats.correct.estimator_file import EstimatorFile
    from qdrift_stats.correct.sample import sample as run_sample
    from qdrift_stats.correct.sample import save_samples
    from qdrift_stats.inputs import check_number
    from qdrift_stats.pair import load_pair

    if strength is not None:
        check_number(strength, "--strength", low=0.0)
    check_output(out, "npy", overwrite=overwrite, inputs=(estimator_path,))  # before any sampling
    estimator = EstimatorFile.load(estimator_path) if estimator_path else None
    warnings_ = estimator.use_warnings(pair=pair, model=model) if estimator is not None else []
    for line in warnings_ if not as_json else ():
        click.echo(f"warning: {line}", err=True)
    model_pair = load_pair(pair)
    samples = run_sample(
        model_pair,
        scheduler,
        steps,
        num_samples,
        batch,
        seed,
        model=model,
        estimator=estimator,
        correction=correction,
        strength=strength,
        progress=_progress("sample", "batch", quiet=quiet),
    )
    save_samples(samples, out)
    notes = warnings_ + (list(estimator.notes) if estimator else [])
    if as_json:
        import json

        click.echo(
            json.dumps(
                {
                    "out": str(out),
                    "shape": list(samples.shape),
                    "model": model,
                    "corrected": estimator is not None,
                    "notes": notes,
                }
            )
        )
        return
    for note in notes[len(warnings_) :]:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {samples.shape[0]} samples {tuple(samples.shape[1:])} -> {out}")


@cli.command(epilog=EPILOG_DEMO)
@click.option("--out", type=click.Path(path_type=Path), help="Keep the store and estimator files in this folder.")
@click.option(
    "--samples", "num_samples", default=4000, show_default=True, type=int, help="Samples per sampler and model."
)
@click.option("--quiet", "-q", is_flag=True, help=QUIET_HELP)
def demo(out, num_samples, quiet):
    """The whole chain on the embedded default (the mixture testbed): record, fit, correct, measure."""
    from qdrift_stats.demo import run_demo

    click.echo(run_demo(out, num_samples=num_samples, progress=_progress("demo", "scheduler", quiet=quiet)))


EPILOG_PLOT = """\b
Example:
  qdrift plot accumulation calib.zarr --estimator est.safetensors --pair P --out accumulation.png
  qdrift plot variance calib.zarr --fit empirical --fit per-channel --out variance.png
  qdrift plot runs-needed cv.zarr --out runs_needed.png
  qdrift plot diagnostics calib.zarr --out diagnostics.png
  qdrift plot budget calib.zarr --out budget.png
"""


@cli.command(epilog=EPILOG_PLOT)
@click.argument(
    "kind", metavar="KIND", type=click.Choice(["accumulation", "variance", "runs-needed", "diagnostics", "budget"])
)
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Figure file (.png, .pdf or .svg).")
@click.option(
    "--estimator",
    "estimator_path",
    type=click.Path(path_type=Path),
    help="Estimator file: the correction (accumulation, required) or one more estimate to compare (variance).",
)
@click.option("--pair", help="accumulation: the model pair (required; never taken from the store). " + PAIR_HELP)
@click.option(
    "--fit",
    "fit_names",
    multiple=True,
    help="variance of a store: estimator to fit (repeatable; 'all': every registered one; default: "
    "empirical, first-order, decomposed, smooth-glm, robust).",
)
@click.option("--x", "x_axis", type=click.Choice(["b", "step"]), help="x axis: noise level b (log) or step.")
@click.option("--overwrite", is_flag=True, help="Replace an existing figure file.")
def plot(kind, source, out, estimator_path, pair, fit_names, x_axis, overwrite):
    """Draw a figure: noise accumulation, the variance statistic, runs needed or diagnostics.

    KIND is accumulation, variance, runs-needed, diagnostics or budget (the error budget of a store). SOURCE is a
    calibration store (accumulation: recorded with --trajectories; budget), an estimator file (variance), or a saved
    runs-needed / diagnostics Dataset (zarr or netCDF).
    """
    from qdrift_stats.outputs import atomic_output
    from qdrift_stats.plots.figures import figure_for, save_figure

    check_output(out, "figure", overwrite=overwrite, inputs=(source, estimator_path))
    fig = figure_for(kind, source, estimator=estimator_path, pair=pair, fits=fit_names, x=x_axis)
    with atomic_output(out, "figure") as tmp:
        save_figure(fig, tmp)
    click.echo(f"wrote {kind} figure -> {out}")


EPILOG_DIAGNOSE = """\b
Example:
  qdrift diagnose calib.zarr
  qdrift diagnose calib.zarr --json --out diagnostics.zarr
"""


@cli.command(epilog=EPILOG_DIAGNOSE)
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the verdict, summaries and per-step values as JSON.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Also save the per-step diagnostics Dataset (zarr), e.g. for 'qdrift plot diagnostics'.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def diagnose(store, as_json, out, overwrite):
    """Check Q-Drift's noise assumption on a calibration store; say which estimator and correction to use.

    Per step: kurtosis and Jarque-Bera normality of the perturbation, its correlation with the
    model output (R^2), whether the Q output lies on a grid, the spread across channels; across
    steps: Ljung-Box autocorrelation of each sample's standardised errors.
    """
    import json

    from qdrift_stats.outputs import write_zarr_dataset
    from qdrift_stats.validate.diagnostics import diagnose as run_diagnose
    from qdrift_stats.validate.diagnostics import report, to_json

    if out is not None:
        check_output(out, "diagnostics", overwrite=overwrite, inputs=(store,))
    diag = run_diagnose(store)
    if out is not None:
        write_zarr_dataset(diag, out, "diagnostics")
    click.echo(json.dumps(to_json(diag), indent=1) if as_json else report(diag))


EPILOG_CV = """\b
Example:
  qdrift cv calib.zarr --out cv.zarr
  qdrift cv calib.zarr --out cv.zarr --estimator robust --no-strength --json
"""


@cli.command(epilog=EPILOG_CV)
@click.argument("store", type=click.Path(path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Results (zarr); an interrupted run with the same settings resumes.",
)
@click.option(
    "--estimator",
    "estimator_name",
    default="first-order",
    show_default=True,
    help="Estimator name (as for 'qdrift fit').",
)
@click.option(
    "--splits",
    "n_splits",
    default=50,
    show_default=True,
    type=int,
    help="Most random subsets of runs per calibration count.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the splits.")
@click.option("--tolerance", default=0.1, show_default=True, type=float, help="Relative error for 'runs needed'.")
@click.option("--confidence", default=0.95, show_default=True, type=float, help="Probability for 'runs needed'.")
@click.option(
    "--strength/--no-strength",
    default=None,
    help="Choose the correction form and strength by CV (re-samples the pair, so needs --pair). "
    "Default: when --pair is given.",
)
@click.option("--pair", help="Model pair for the strength search (never taken from the store). " + PAIR_HELP)
@click.option(
    "--samples",
    "num_samples",
    default=1024,
    show_default=True,
    type=int,
    help="Samples per sampler and fold in the strength search.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the headline numbers as JSON.")
@click.option("--overwrite", is_flag=True, help="Start over, replacing an existing --out.")
@click.option("--quiet", "-q", is_flag=True, help=QUIET_HELP)
def cv(
    store,
    out,
    estimator_name,
    n_splits,
    seed,
    tolerance,
    confidence,
    strength,
    pair,
    num_samples,
    as_json,
    overwrite,
    quiet,
):
    """Cross-validate over calibration runs: error against the number of runs, runs needed, correction strength.

    Runs are the groups. For N = 1..M-1 runs, repeated random subsets are fitted and scored
    against the all-runs fit and on the held-out runs; each N is saved as it finishes.
    """
    import json

    from qdrift_stats.validate.crossval import cross_validate

    check_output(out, "cv", overwrite=overwrite, inputs=(store,), resumable=True)
    model_pair = None
    if pair:
        from qdrift_stats.pair import load_pair

        model_pair = load_pair(pair)
    result = cross_validate(
        estimator_name,
        store,
        out,
        n_splits=n_splits,
        seed=seed,
        strength=strength,
        pair=model_pair,
        num_samples=num_samples,
        overwrite=overwrite,
        progress=_progress("cv", "calibration count", "strength fold", quiet=quiet),
    )
    click.echo(
        json.dumps(result.to_json(tolerance, confidence), indent=1)
        if as_json
        else result.summary(tolerance, confidence)
    )


def _quiet_third_party() -> None:
    """Silence warnings users cannot act on (the library's own warnings and notes stay)."""
    import logging
    import warnings

    for module in ("torchao", "torch", "diffusers", "transformers", "zarr", "xarray", "optimum", "dask", "numcodecs"):
        warnings.filterwarnings("ignore", module=rf"{module}(\.|$)")
    warnings.filterwarnings("ignore", message=r".*(pytree|_register_pytree_node|Consolidated metadata).*")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # read when diffusers configures its logger
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("torchao", "diffusers", "transformers", "optimum", "distributed", "numcodecs", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _silence_shutdown_noise() -> None:
    """After Ctrl-C: no "Task was destroyed but it is pending" / "Exception ignored" lines from zarr's event loop."""
    import logging

    logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
    sys.unraisablehook = lambda _unraisable: None


def _os_error_line(exc: OSError) -> str:
    import errno

    reason = exc.strerror or type(exc).__name__
    where = f": {exc.filename}" if exc.filename else ""
    hint = {
        errno.ENOSPC: "; free some space or choose another --out",
        errno.EROFS: "; choose another --out",
        errno.EACCES: "; check the permissions or choose another --out",
        errno.EDQUOT: "; free some space or choose another --out",
    }.get(exc.errno, "")
    return f"{reason}{where}{hint}"


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the CLI and turns errors into one line and an exit code."""
    _quiet_third_party()
    try:
        result = cli.main(args=argv, prog_name="qdrift", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except QDriftError as exc:
        click.echo(f"qdrift: error: {exc}", err=True)
        code = 2
    except click.exceptions.UsageError as exc:
        click.echo(f"qdrift: error: {' '.join(exc.format_message().split())}", err=True)
        code = 2
    except (click.exceptions.Abort, KeyboardInterrupt):
        _silence_shutdown_noise()
        click.echo("qdrift: interrupted", err=True)
        code = 130
    except OSError as exc:  # a missing file, a read-only or full disk: the user's environment, one line
        if os.environ.get("QDRIFT_DEBUG"):
            raise
        click.echo(f"qdrift: error: {' '.join(_os_error_line(exc).split())}", err=True)
        code = 2
    except Exception as exc:  # an internal error: one line, the traceback on request
        if os.environ.get("QDRIFT_DEBUG"):
            raise
        click.echo(
            f"qdrift: internal error: {type(exc).__name__}: {' '.join(str(exc).split())} "
            "(QDRIFT_DEBUG=1 shows the traceback)",
            err=True,
        )
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
