"""``qdrift calibrate``: :func:`~qdrift_stats.record.pipelines.calibrate_pipeline` from folders and files.

- the FP pipeline: a local diffusers pipeline folder (``from_pretrained``, no download); its class is
  the folder's ``model_index.json`` ``_class_name`` looked up in diffusers or among this package's
  pipelines (:data:`PACKAGE_PIPELINES`), or given as ``MODULE:CLASS`` on the command line (never
  imported from a name in the folder);
- the quantized twin: a recipe of :mod:`qdrift_stats.quantize` applied to the FP denoiser (recipes that
  need activation statistics get the denoiser calls of one FP pipeline run), or a second pipeline
  folder of the same class holding the quantized model (one that reloads quantized, e.g. with a
  diffusers ``quantization_config``);
- the conditions: prompts (one per line) or class labels (integers separated by spaces, commas or
  newlines) from a file.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from qdrift_stats.errors import QDriftError

#: Pipelines of this package a folder may name in its ``model_index.json``.
PACKAGE_PIPELINES: dict[str, str] = {"DigitsPipeline": "qdrift_stats.zoo.pipeline:DigitsPipeline"}
#: Seed of the FP run whose denoiser calls calibrate a static PTQ recipe (apart from calibration seeds).
RECIPE_CALIBRATION_SEED = 987_654


def _import_class(spec: str):
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise QDriftError(f"--pipeline-class must be MODULE:CLASS, got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise QDriftError(f"cannot import {spec} ({type(exc).__name__})") from None


def pipeline_class(folder: Path, spec: str | None = None):
    """The pipeline class for a folder: ``spec`` (``MODULE:CLASS``), else its ``model_index.json`` class name."""
    if spec:
        return _import_class(spec)
    index = folder / "model_index.json"
    if not index.is_file():
        raise QDriftError(f"{folder} holds no model_index.json: not a diffusers pipeline folder")
    try:
        name = str(json.loads(index.read_text()).get("_class_name"))
    except (json.JSONDecodeError, AttributeError):
        raise QDriftError(f"{index} is not a JSON object") from None
    if name in PACKAGE_PIPELINES:
        return _import_class(PACKAGE_PIPELINES[name])
    import diffusers

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise QDriftError(
            f"{index} names the pipeline class {name!r}, which diffusers does not have; pass --pipeline-class"
        )
    return cls


def load_pipeline(folder: str | Path, spec: str | None = None):
    """A pipeline from a local folder (progress bars off)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QDriftError(f"pipeline folder {folder} does not exist")
    cls = pipeline_class(folder, spec)
    try:
        pipe = cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise QDriftError(f"cannot load {folder} as {cls.__name__} ({type(exc).__name__}: {detail})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file, one per line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise QDriftError(f"prompts file {path} does not exist")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise QDriftError(f"{path} holds no prompt")
    return prompts


def read_labels(path: str | Path) -> list[int]:
    """Class labels from a text file: integers separated by spaces, commas or newlines."""
    path = Path(path)
    if not path.is_file():
        raise QDriftError(f"class labels file {path} does not exist")
    tokens = [t for t in re.split(r"[\s,]+", path.read_text()) if t]
    try:
        labels = [int(t) for t in tokens]
    except ValueError:
        raise QDriftError(f"{path}: class labels must be integers") from None
    if not labels:
        raise QDriftError(f"{path} holds no class label")
    return labels


def quantized_twin(pipe: Any, recipe: str, call: dict[str, Any]) -> Any:
    """``pipe`` with its denoiser through ``recipe``; static recipes see the denoiser calls of one FP run."""
    from qdrift_stats.quantize import RECIPES, quantize
    from qdrift_stats.record.pipelines import pipeline_denoiser

    if recipe not in RECIPES:
        raise QDriftError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    name, denoiser = pipeline_denoiser(pipe)
    calibration = None
    if RECIPES[recipe].needs_calibration:
        calibration = []
        handle = denoiser.register_forward_pre_hook(lambda m, a, k: calibration.append((a, dict(k))), with_kwargs=True)
        try:
            with torch.no_grad():
                pipe(**call, generator=torch.Generator().manual_seed(RECIPE_CALIBRATION_SEED))
        finally:
            handle.remove()
    twin = type(pipe)(**{**pipe.components, name: quantize(denoiser, recipe, calibration)})
    twin.set_progress_bar_config(disable=True)
    return twin


def folder_pipelines(
    pipeline: str | Path,
    *,
    steps: int,
    recipe: str | None = None,
    q_pipeline: str | Path | None = None,
    prompts: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
    guidance_scale: float | None = None,
    pipeline_kwargs: dict[str, Any] | None = None,
    pipeline_class_spec: str | None = None,
    torch_threads: int | None = None,
) -> tuple[Any, Any]:
    """``(fp_pipe, q_pipe)``: the folder's pipeline and its quantized twin (``recipe``, its static scales from
    one FP run of seed ``RECIPE_CALIBRATION_SEED``) or the pipeline in ``q_pipeline``. Deterministic, so
    every dask worker of ``qdrift calibrate --workers`` builds the same pair.

    ``torch_threads``: set this process's torch intra-op threads first. A dask worker process starts with
    one; CPU kernels round differently with another thread count, and a quantized denoiser turns those
    last-bit differences into different rounding decisions, so the workers take the client's count.
    """
    if torch_threads is not None:
        torch.set_num_threads(int(torch_threads))
    fp = load_pipeline(pipeline, pipeline_class_spec)
    if q_pipeline is not None:
        q = load_pipeline(q_pipeline, pipeline_class_spec)
        if type(q) is not type(fp):
            raise QDriftError(f"--q-pipeline is a {type(q).__name__}, the pipeline a {type(fp).__name__}")
        return fp, q
    call: dict[str, Any] = {**(pipeline_kwargs or {}), "num_inference_steps": min(steps, 4)}
    call.update({"prompt": list(prompts)} if prompts is not None else {"class_labels": list(labels or [])})
    if guidance_scale is not None:
        call["guidance_scale"] = guidance_scale
    return fp, quantized_twin(fp, recipe, call)


def calibrate_folder(
    pipeline: str | Path,
    out: str | Path,
    *,
    seeds: Sequence[int],
    steps: int,
    recipe: str | None = None,
    q_pipeline: str | Path | None = None,
    prompts_file: str | Path | None = None,
    labels_file: str | Path | None = None,
    guidance_scale: float | None = None,
    pipeline_kwargs: dict[str, Any] | None = None,
    pipeline_class_spec: str | None = None,
    trajectories: bool = False,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: Callable[[Iterable], Iterator] | None = None,
    workers: int | None = None,
    on_commit: Callable[[int, int], None] | None = None,
) -> Path:
    """Load, quantize (or load the quantized twin) and calibrate; returns the store (as ``calibrate_pipeline``).

    ``workers``: compute the runs on a local dask cluster of that many worker processes, each loading the
    folder once (:func:`~qdrift_stats.record.distributed.calibrate_pipeline_distributed`, the same store);
    ``on_commit(seed, runs in store)`` is then called as each run is written, in seed order.
    """
    from qdrift_stats.record.pipelines import calibrate_pipeline

    if (recipe is None) == (q_pipeline is None):
        raise QDriftError("give --recipe or --q-pipeline (one of them)")
    if (prompts_file is None) == (labels_file is None):
        raise QDriftError("give --prompts or --class-labels (one of them)")
    if not isinstance(steps, int) or steps < 1:
        raise QDriftError(f"--steps must be a positive integer, got {steps!r}")
    if workers is not None and workers < 1:
        raise QDriftError(f"--workers must be at least 1, got {workers}")
    prompts = read_prompts(prompts_file) if prompts_file is not None else None
    labels = read_labels(labels_file) if labels_file is not None else None
    if recipe is not None:
        from qdrift_stats.quantize import RECIPES

        if recipe not in RECIPES:
            raise QDriftError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    factory = functools.partial(
        folder_pipelines,
        str(pipeline),
        steps=steps,
        recipe=recipe,
        q_pipeline=None if q_pipeline is None else str(q_pipeline),
        prompts=prompts,
        labels=labels,
        guidance_scale=guidance_scale,
        pipeline_kwargs=pipeline_kwargs,
        pipeline_class_spec=pipeline_class_spec,
    )
    options = dict(
        out=out,
        seeds=list(seeds),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        prompts=prompts,
        class_labels=labels,
        pipeline_kwargs=pipeline_kwargs,
        model_id=str(Path(pipeline)),
        recipe=recipe or (str(Path(q_pipeline)) if q_pipeline is not None else None),
        trajectories=trajectories,
        dtype=dtype,
        overwrite=overwrite,
    )
    if workers is not None:
        from qdrift_stats.record.distributed import calibrate_pipeline_distributed

        load_pipeline(pipeline, pipeline_class_spec)  # a bad folder is refused here, before a cluster starts
        factory = functools.partial(factory, torch_threads=torch.get_num_threads())  # the serial run's kernels
        return calibrate_pipeline_distributed(factory, n_workers=workers, on_commit=on_commit, **options)
    fp, q = factory()
    return calibrate_pipeline(fp, q, progress=progress, **options)


__all__ = [
    "calibrate_folder",
    "folder_pipelines",
    "load_pipeline",
    "pipeline_class",
    "quantized_twin",
    "read_labels",
    "read_prompts",
]
