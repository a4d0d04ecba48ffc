"""Q-Drift inside diffusers pipelines: a scheduler wrapper that corrects every step.

One line turns the correction on in any pipeline whose scheduler is supported
(:data:`qdrift_stats.schedulers.base.SCHEDULER_NAMES`)::

    pipe.scheduler = QDriftScheduler(pipe.scheduler, "estimator.safetensors")
    images = pipe(...).images

:class:`QDriftScheduler` keeps the diffusers scheduler interface: ``config``, ``timesteps``,
``init_noise_sigma``, ``order``, ``scale_model_input`` and every other attribute are the wrapped
scheduler's (:class:`SchedulerProxy`); ``set_timesteps`` and ``step`` report the wrapped scheduler's
signatures to :func:`inspect.signature` (pipelines read them to decide whether to pass ``eta``,
``generator``, custom ``timesteps`` / ``sigmas``); ``save_pretrained`` / ``from_pretrained`` write and
read the wrapped scheduler's config plus the estimator file next to it, so a saved pipeline reloads
with the correction on.

What ``step(model_output, timestep, sample)`` does at step ``i`` (the state before the step and the
model output are both arguments of ``step``, so no extra model call is needed):

1. optional output correction ``m <- (m - mu_i) / (1 + k_i)`` (estimator files with a decomposition);
2. the wrapped scheduler's own step, ``x_{i+1} = S(sample, m)``;
3. the Q-Drift pull ``x_{i+1} <- x_{i+1} - c_i (x_{i+1} - a_{i+1} x0_hat_i)`` with ``x0_hat_i`` from
   ``(sample, m)`` (:class:`qdrift_stats.correct.corrector.Corrector`).

GPU readiness: the per-step coefficients are computed on the host once per ``set_timesteps`` and
moved to the sample's device and dtype once (on the first step that sees that device and dtype);
inside ``step`` nothing reads a tensor value on the host (no ``.item()``, no ``bool(tensor)``) and
nothing is copied between devices. Steps with a zero coefficient are skipped on the host, so a zero
estimator (or strength 0) returns the wrapped scheduler's output object untouched, bit for bit.

The step index is a counter reset by ``set_timesteps`` and moved by ``set_begin_index`` (img2img
pipelines), checked against the wrapped scheduler's own ``step_index`` where it has one. It counts
entries of ``timesteps`` (model calls): a two-call solver (Heun) is corrected once per step, when the
corrector call lands, with the step's effective output from the state the predictor call started at
(:func:`~qdrift_stats.schedulers.base.first_order_output`); its predictor half-step is left as is.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import SchedulerMixin  # also the name diffusers looks up in this module to load it

from qdrift_stats.correct.coefficients import CORRECTION_FORMS
from qdrift_stats.correct.corrector import Corrector
from qdrift_stats.correct.estimator_file import EstimatorFile
from qdrift_stats.errors import QDriftError
from qdrift_stats.schedulers.base import call_steps, first_order_output, scheduler_name
from qdrift_stats.schedulers.noise import capture_step_noise

ESTIMATOR_FILE_NAME = "qdrift_estimator.safetensors"
WRAPPER_CONFIG_NAME = "qdrift_scheduler.json"
WRAPPER_FORMAT = "qdrift-scheduler"
WRAPPER_FORMAT_VERSION = 1

log = logging.getLogger(__name__)


class _WrappedSignature:
    """Method descriptor: the proxy's method, reporting the wrapped scheduler's signature.

    ``inspect.signature(proxy.step)`` gives ``inspect.signature(proxy.scheduler.step)``, so pipelines
    that inspect the scheduler (``"eta" in signature(scheduler.step).parameters``) behave exactly as
    with the plain scheduler. The signature is read once per proxy and cached.
    """

    def __init__(self, func: Callable[..., Any]):
        self.func = func
        self.name = func.__name__
        self.__doc__ = func.__doc__

    def __get__(self, instance: Any, owner: type | None = None) -> Callable[..., Any]:
        if instance is None:
            return self.func
        bound = functools.partial(self.func, instance)
        bound.__signature__ = instance._wrapped_signature(self.name)  # type: ignore[attr-defined]
        return bound


def mirrors_wrapped_signature(func: Callable[..., Any]) -> _WrappedSignature:
    """Decorator for :class:`SchedulerProxy` methods that stand in for the wrapped scheduler's."""
    return _WrappedSignature(func)


class SchedulerProxy(SchedulerMixin):
    """A diffusers scheduler that forwards everything to the scheduler it wraps.

    Reading an attribute the proxy does not define reads the wrapped scheduler's; setting one sets
    the wrapped scheduler's (pipelines such as Stable Diffusion patch ``scheduler._internal_dict``).
    Subclasses list their own attributes in ``_proxy_attributes`` and override ``set_timesteps`` /
    ``step`` (decorated with :func:`mirrors_wrapped_signature`). It is a ``SchedulerMixin`` so that
    ``DiffusionPipeline.save_pretrained`` / ``from_pretrained`` treat it as a scheduler.
    """

    _proxy_attributes: frozenset[str] = frozenset({"scheduler", "_signatures"})

    def __init__(self, scheduler: Any):
        if not callable(getattr(scheduler, "step", None)) or not callable(getattr(scheduler, "set_timesteps", None)):
            raise QDriftError(f"expected a diffusers scheduler, got {type(scheduler).__name__}")
        object.__setattr__(self, "scheduler", scheduler)
        object.__setattr__(self, "_signatures", {})

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails. Never forward dunders or the proxy's own slots (copy
        # and pickle probe for them before __dict__ is filled).
        if name.startswith("__") or name in type(self)._proxy_attributes:
            raise AttributeError(name)
        return getattr(self.scheduler, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in type(self)._proxy_attributes:
            object.__setattr__(self, name, value)
        else:
            setattr(self.scheduler, name, value)

    def __len__(self) -> int:
        return len(self.scheduler)

    def _wrapped_signature(self, name: str) -> inspect.Signature:
        signature = self._signatures.get(name)
        if signature is None:
            signature = self._signatures[name] = inspect.signature(getattr(self.scheduler, name))
        return signature

    @property
    def config(self):
        """The wrapped scheduler's config (a diffusers ``FrozenDict``)."""
        return self.scheduler.config

    @property
    def compatibles(self) -> list:
        return self.scheduler.compatibles

    @mirrors_wrapped_signature
    def set_timesteps(self, *args: Any, **kwargs: Any) -> Any:
        return self.scheduler.set_timesteps(*args, **kwargs)

    @mirrors_wrapped_signature
    def step(self, *args: Any, **kwargs: Any) -> Any:
        return self.scheduler.step(*args, **kwargs)


def prev_sample_of(step_output: Any) -> torch.Tensor:
    """The new state in a scheduler step's return value (``.prev_sample`` or element 0 of a tuple)."""
    return step_output[0] if isinstance(step_output, tuple) else step_output.prev_sample


def with_prev_sample(step_output: Any, prev_sample: torch.Tensor) -> Any:
    """The step's return value, same type, with the new state replaced by ``prev_sample``."""
    if isinstance(step_output, tuple):
        return (prev_sample,) + tuple(step_output[1:])
    step_output.prev_sample = prev_sample  # diffusers BaseOutput keeps the attribute and the item in sync
    return step_output


class QDriftScheduler(SchedulerProxy):
    """A diffusers scheduler with the Q-Drift correction applied after every step.

    Args:
        scheduler: a supported diffusers scheduler (DDIM, Euler, DPM-Solver++ 2M, flow-matching Euler,
            flow DPM-Solver++), configured as the estimator was calibrated.
        estimator: an :class:`~qdrift_stats.correct.estimator_file.EstimatorFile` or the path of one.
        correction, strength: override the file's correction form (``"drift"``/``"shrink"``) and
            strength ``lambda``.
        model, recipe: optional identifiers of the model and PTQ recipe in use; refused (one-line
            :class:`QDriftError`) when the file records different ones.

    Raises:
        QDriftError: the scheduler's class or config differs from the file's (unless the estimator is
            smooth and the difference is in the step grid only: then it is interpolated, with a
            warning and a line in :attr:`notes`); later, in ``set_timesteps``, when the step grid
            differs and the estimator is not smooth.
    """

    _proxy_attributes = SchedulerProxy._proxy_attributes | frozenset(
        {
            "estimator",
            "correction",
            "strength",
            "model",
            "recipe",
            "corrector",
            "_correctors",
            "_step_counter",
            "_timesteps_call",
            "_synced",
            "_call_steps",
            "_step_start",
        }
    )

    def __init__(
        self,
        scheduler: Any,
        estimator: EstimatorFile | str | Path,
        *,
        correction: str | None = None,
        strength: float | None = None,
        model: str | None = None,
        recipe: str | None = None,
        pipeline: Any = None,
    ):
        if isinstance(scheduler, QDriftScheduler):
            raise QDriftError(
                "the scheduler is already a QDriftScheduler; wrap the plain diffusers scheduler (wrapper.scheduler)"
            )
        super().__init__(scheduler)
        if correction is not None and correction not in CORRECTION_FORMS:
            raise QDriftError(f"unknown correction form {correction!r}; choose drift or shrink")
        if strength is not None and not (
            isinstance(strength, (int, float)) and math.isfinite(strength) and strength >= 0
        ):
            raise QDriftError(f"strength must be a finite non-negative number, got {strength!r}")
        if estimator is None or not isinstance(estimator, (EstimatorFile, str, Path)):
            raise QDriftError(
                f"QDriftScheduler needs an estimator file or EstimatorFile, got {type(estimator).__name__}; "
                "export one with 'qdrift fit STORE --out EST.safetensors'"
            )
        scheduler_name(scheduler)  # an unsupported scheduler class is refused before the file is read
        self.estimator = estimator if isinstance(estimator, EstimatorFile) else EstimatorFile.load(estimator)
        self.correction = correction
        self.strength = None if strength is None else float(strength)
        self.model = model
        self.recipe = recipe
        scheduler_name(scheduler)  # refuses an unsupported scheduler class now, not at the first step
        self.estimator.check_scheduler(scheduler)
        self.estimator.check_provenance(model=model, recipe=recipe)
        self.corrector: Corrector | None = None
        self._correctors: dict[tuple[torch.device, torch.dtype], Corrector] = {}
        self._step_counter = 0
        self._timesteps_call: dict[str, Any] = {}
        self._synced = True
        self._call_steps: list[int] = []
        self._step_start = None
        if pipeline is not None:
            check_pipeline(pipeline, self.estimator)

    def __repr__(self) -> str:
        form = self.correction or self.estimator.metadata["correction"]["form"]
        source = self.estimator.path.name if self.estimator.path else self.estimator.metadata["estimator"].get("name")
        return f"QDriftScheduler({type(self.scheduler).__name__}, estimator={source!r}, correction={form!r})"

    @property
    def notes(self) -> list[str]:
        """What the estimator file said while being applied (e.g. that it was interpolated)."""
        return self.estimator.notes

    # ---- diffusers interface --------------------------------------------------------------
    @mirrors_wrapped_signature
    def set_timesteps(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped ``set_timesteps``, then the correction for the new step grid.

        Refuses (QDriftError) a grid the estimator was not fitted for, or interpolates a smooth one.
        """
        result = self.scheduler.set_timesteps(*args, **kwargs)
        self._timesteps_call = {k: v for k, v in kwargs.items() if k in ("mu", "sigmas", "timesteps")}
        self._prepare_corrector()
        return result

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at step ``begin_index`` (img2img pipelines skip the first steps of the grid)."""
        inner = getattr(self.scheduler, "set_begin_index", None)
        if inner is not None:
            inner(begin_index)
        self._step_counter = int(begin_index)
        self._synced = True

    @mirrors_wrapped_signature
    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The wrapped step followed by the Q-Drift correction; returns the wrapped step's output type.

        Shapes: ``model_output`` and ``sample`` ``(batch, channels, ...)``, any device and dtype; the
        correction runs on the new state's device and dtype.
        """
        corrector = self.corrector
        if corrector is None:  # wrapped after set_timesteps (a hand-written loop): prepare once, now
            if not getattr(self.scheduler, "num_inference_steps", None):
                raise QDriftError("QDriftScheduler.step called before set_timesteps")
            self._prepare_corrector()
            corrector = self.corrector
        if not self._synced:
            self._sync_to(timestep, corrector)
        k = self._step_counter  # the entry of the wrapped scheduler's timesteps (one per model call)
        steps = self._call_steps
        if k >= len(steps):
            raise QDriftError(f"step {k} is past the {len(steps)} steps set by set_timesteps")
        i = int(steps[k])  # the step of the grid this call belongs to (Heun: two calls per step)
        if k == 0 or steps[k - 1] != i:
            self._step_start = sample
        landing = k + 1 == len(steps) or steps[k + 1] != i
        if corrector.output_active[i]:
            model_output = self._corrector_on(model_output).correct_output(i, model_output, sample)
        noise = None
        if landing and corrector.noise_active[i]:  # a stochastic step whose injected noise the correction lowers
            with capture_step_noise(self.scheduler) as drawn:
                output = self.scheduler.step(model_output, timestep, sample, *args, **kwargs)
            noise = drawn.noise
        else:
            output = self.scheduler.step(model_output, timestep, sample, *args, **kwargs)
        self._step_counter = k + 1
        inner_index = getattr(self.scheduler, "_step_index", None)
        if isinstance(inner_index, int) and inner_index != k + 1:
            raise QDriftError(
                f"step index out of sync: QDriftScheduler is at step {k}, the wrapped scheduler at {inner_index - 1}; "
                "call set_begin_index on the wrapper, not on the wrapped scheduler"
            )
        if not landing or not corrector.active[i]:  # Heun's predictor half-step is never corrected
            return output
        prev_sample = prev_sample_of(output)
        x_start = self._step_start
        if x_start is not sample:  # a two-call step: its effective output from the step's start
            model_output = first_order_output(corrector.grid, i, x_start, prev_sample)
        corrected = self._corrector_on(prev_sample)(i, x_start, model_output, prev_sample, noise)
        return with_prev_sample(output, corrected)

    # ---- the corrector ----------------------------------------------------------------------
    def _sync_to(self, timestep: Any, corrector: Corrector) -> None:
        """First step after ``set_timesteps`` on a scheduler without a step index (DDIM): an img2img
        pipeline that skips the first steps without ``set_begin_index`` starts at a later timestep;
        find its step (one host read of the timestep per run)."""
        self._synced = True
        if hasattr(self.scheduler, "_step_index"):
            return
        t = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        timesteps = corrector.grid.timesteps
        i = self._step_counter
        if i < len(timesteps) and abs(timesteps[i] - t) <= 1e-6 * max(1.0, abs(t)):
            return
        matches = [j for j, s in enumerate(timesteps) if abs(s - t) <= 1e-6 * max(1.0, abs(t))]
        if len(matches) != 1:
            raise QDriftError(f"timestep {t:g} is not one step of the grid set by set_timesteps")
        self._step_counter = self._call_steps.index(matches[0])  # the step's first call

    def _prepare_corrector(self) -> None:
        """Build the host-side correction for the scheduler's current grid and reset the step counter."""
        timesteps = getattr(self.scheduler, "timesteps", None)
        device = timesteps.device if isinstance(timesteps, torch.Tensor) else torch.device("cpu")
        corrector = self.estimator.corrector(
            self.scheduler,
            correction=self.correction,
            strength=self.strength,
            device=device,
            dtype=torch.float32,
            call=self._timesteps_call,
        )
        self.corrector = corrector
        self._correctors = {(corrector.coefficients.device, torch.float32): corrector}
        self._call_steps = [int(i) for i in call_steps(self.scheduler)]
        self._step_start = None
        self._step_counter = 0
        self._synced = False

    def _corrector_on(self, like: torch.Tensor) -> Corrector:
        """The corrector with its tensors on ``like``'s device and dtype (moved once, then cached)."""
        key = (like.device, like.dtype)
        corrector = self._correctors.get(key)
        if corrector is None:
            corrector = self._correctors[key] = self.corrector.to(like.device, like.dtype)
        return corrector

    # ---- files ------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Write the wrapped scheduler's ``scheduler_config.json``, the estimator file and the wrapper's options.

        The folder also loads as the plain scheduler with the wrapped class's ``from_pretrained``.
        """
        if push_to_hub:
            raise QDriftError(
                "QDriftScheduler.save_pretrained does not push to a hub; save locally and upload the folder"
            )
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.scheduler.save_pretrained(str(folder))
        EstimatorFile(dict(self.estimator.tensors), dict(self.estimator.metadata)).save(
            folder / ESTIMATOR_FILE_NAME, overwrite=True
        )
        options = {
            "format": WRAPPER_FORMAT,
            "format_version": WRAPPER_FORMAT_VERSION,
            "estimator_file": ESTIMATOR_FILE_NAME,
            "wrapped_class": type(self.scheduler).__name__,
            "correction": self.correction,
            "strength": self.strength,
            "model": self.model,
            "recipe": self.recipe,
        }
        (folder / WRAPPER_CONFIG_NAME).write_text(json.dumps(options, indent=2, sort_keys=True) + "\n")
        if diffusers_needs_module_file():
            # model_index.json names this module as the scheduler's library. diffusers >= 0.42 imports
            # no library a saved folder names unless it is already imported, but loads a component's
            # own module file when the user passes trust_remote_code=True: this one-line file (only an
            # import of the installed package) lets a fresh interpreter reload the pipeline that way.
            (folder / f"{type(self).__module__}.py").write_text(
                f"# Written by qdrift-stats: the saved scheduler is {type(self).__name__} from the installed package.\n"
                f"from {type(self).__module__} import {type(self).__name__}  # noqa: F401\n"
            )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        subfolder: str | None = None,
        *,
        model: str | None = None,
        recipe: str | None = None,
        **kwargs: Any,
    ) -> QDriftScheduler:
        """Load a folder written by :meth:`save_pretrained` (local folders only; hub options are ignored).

        ``model`` / ``recipe`` override the identifiers saved with the wrapper.
        """
        import diffusers

        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
        options_file = folder / WRAPPER_CONFIG_NAME
        if not options_file.is_file():
            raise QDriftError(f"{folder} holds no {WRAPPER_CONFIG_NAME}: not a saved QDriftScheduler")
        from qdrift_stats.inputs import loads_bounded

        try:
            text = options_file.read_text()
        except (OSError, UnicodeDecodeError):
            raise QDriftError(f"{options_file} is not readable text") from None
        options = loads_bounded(text, what=str(options_file), max_bytes=2**20)
        if not isinstance(options, dict):
            raise QDriftError(f"{options_file} is not a JSON object")
        if options.get("format") != WRAPPER_FORMAT or options.get("format_version") != WRAPPER_FORMAT_VERSION:
            raise QDriftError(
                f"{options_file} has format {options.get('format')!r} version {options.get('format_version')!r}; "
                f"this qdrift-stats reads {WRAPPER_FORMAT!r} version {WRAPPER_FORMAT_VERSION}"
            )
        _check_options(options, options_file)
        class_name = str(options.get("wrapped_class"))
        scheduler_class = getattr(diffusers, class_name, None)
        if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
            raise QDriftError(f"{options_file} names the scheduler class {class_name!r}, which diffusers does not have")
        scheduler = scheduler_class.from_pretrained(str(folder))
        estimator = EstimatorFile.load(folder / str(options.get("estimator_file", ESTIMATOR_FILE_NAME)))
        return cls(
            scheduler,
            estimator,
            correction=options.get("correction"),
            strength=options.get("strength"),
            model=model if model is not None else options.get("model"),
            recipe=recipe if recipe is not None else options.get("recipe"),
        )


def check_pipeline(pipe: Any, estimator: EstimatorFile | str | Path) -> float | None:
    """Check that ``pipe``'s denoiser is the quantized model ``estimator`` was calibrated on.

    The estimator file carries a fingerprint of the calibrated quantized denoiser (its output on a
    fixed seeded probe input, :mod:`qdrift_stats.record.fingerprint`). The pipeline's ``transformer``
    or ``unet`` is run once on the probe; a denoiser that does not reproduce the quantized output
    (e.g. a quantized pipeline that reloaded from ``save_pretrained`` as the plain model) is refused
    with a one-line :class:`QDriftError`. Returns the distance ratio (small: the same model), or
    ``None`` when the file records no fingerprint (noted in the file's ``notes`` and logged).
    """
    from qdrift_stats.record.fingerprint import check_denoiser

    if estimator is None or not isinstance(estimator, (EstimatorFile, str, Path)):
        raise QDriftError(f"check_pipeline needs an estimator file or EstimatorFile, got {type(estimator).__name__}")
    est = estimator if isinstance(estimator, EstimatorFile) else EstimatorFile.load(estimator)
    source = str(est.path) if est.path else "the estimator"
    recorded = est.metadata.get("fingerprint")
    denoiser = next(
        (m for m in (getattr(pipe, n, None) for n in ("transformer", "unet")) if isinstance(m, torch.nn.Module)), None
    )
    if denoiser is None:
        raise QDriftError(f"{type(pipe).__name__} has no 'transformer' or 'unet' module to check")
    if not recorded:
        note = f"{source} records no denoiser fingerprint; cannot check the pipeline's denoiser"
        if note not in est.notes:
            est.notes.append(note)
            log.warning(note)
        return None
    return check_denoiser(denoiser, recorded, source)


def diffusers_needs_module_file() -> bool:
    """Whether this diffusers refuses to import a library named by a saved folder (0.42 and later)."""
    try:
        from diffusers.pipelines import pipeline_loading_utils
    except ImportError:  # pragma: no cover
        return False
    return hasattr(pipeline_loading_utils, "_get_library_or_raise")


def _check_options(options: dict[str, Any], source: Path) -> None:
    """One-line errors for malformed wrapper options (types, ranges, an estimator file outside the folder)."""
    from qdrift_stats.inputs import check_number

    name = options.get("estimator_file", ESTIMATOR_FILE_NAME)
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise QDriftError(f"{source}: estimator_file must be a file name inside the folder, got {name!r}")
    if not isinstance(options.get("wrapped_class"), str) or not options["wrapped_class"].isidentifier():
        raise QDriftError(
            f"{source}: wrapped_class must be a diffusers class name, got {options.get('wrapped_class')!r}"
        )
    correction = options.get("correction")
    if correction is not None and correction not in CORRECTION_FORMS:
        raise QDriftError(
            f"{source}: correction must be one of {', '.join(CORRECTION_FORMS)} or null, got {correction!r}"
        )
    if options.get("strength") is not None:
        check_number(options["strength"], f"{source}: strength", low=0.0)
    for key in ("model", "recipe"):
        if options.get(key) is not None and not isinstance(options[key], str):
            raise QDriftError(f"{source}: {key} must be a string or null, got {type(options[key]).__name__}")


__all__ = [
    "check_pipeline",
    "ESTIMATOR_FILE_NAME",
    "QDriftScheduler",
    "SchedulerMixin",
    "SchedulerProxy",
    "WRAPPER_CONFIG_NAME",
    "mirrors_wrapped_signature",
    "prev_sample_of",
    "with_prev_sample",
]
