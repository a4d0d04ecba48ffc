"""Estimator files: one ``.safetensors`` file with the statistic and JSON metadata. Never pickle.

Tensors (float64):

- ``variance``: ``(steps,)`` or ``(steps, channels)``, the statistic ``v_i`` (state units squared);
- ``timesteps``, ``a_next``, ``b_next``: ``(steps,)``, the step grid it was fitted on;
- optional ``k``, ``mu``: the per-step output decomposition ``m_q - m_fp = k m_fp + mu + r``;
- optional ``ci_low``, ``ci_high``: confidence bounds of ``variance``;
- optional ``residual_fraction``: ``(steps,)`` in ``(0, 1]``, the mean square of the FP noise estimate at each
  step's input (the share of the marginal's spread the residual ``x - a x0_hat`` holds), and optional
  ``residual_error``: ``(steps,)`` ``>= 0``, the mean square model error in that noise estimate; the pull then
  accounts for the local spread (:func:`qdrift_stats.correct.coefficients.correction_coefficients`); absent: 1 and 0;
- optional ``independent_variance``: the variance's shape, the per-step statistic ``v_i`` beside the
  persistence-aware ``variance`` ``w_i``, with ``residual_fraction``: the shrink pull then solves the condition
  at the landing level (:func:`qdrift_stats.correct.coefficients.landing_coefficients`; format version 3);
- optional ``curve_log_b``, ``curve_log_u``, ``curve_log_kappa``: ``(points,)``, a smooth
  estimator's model over ``log b`` (see :mod:`qdrift_stats.estimators.smooth`).

Metadata: the safetensors header entry ``"qdrift"`` holds a JSON object::

    {"format": "qdrift-estimator", "format_version": 1,
     "scheduler": {"name": ..., "class": ..., "config": {...}}, "steps": N,
     "estimator": {"name": ..., "params": {...}, "smooth": false},
     "correction": {"form": "drift"|"shrink", "strength": 1.0},
     "num_runs": R, "provenance": {"pair": ..., "seeds": [...], "package_version": ...,
                                   "model": ... (optional), "recipe": ... (optional), ...}}

Loading checks the format; :meth:`EstimatorFile.check_scheduler` checks the scheduler's name,
class and config, :meth:`EstimatorFile.variance_on` the step grid (both refuse, or interpolate when
the estimator is smooth, and say so), :meth:`EstimatorFile.check_provenance` the model and recipe
identifiers a user gives. The format and its versioning are documented in ``docs/estimator-format.md``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qdrift_stats.correct.coefficients import (
    FILE_FORMS,
    PUBLISHED,
    correction_coefficients,
    landing_coefficients,
    published_coefficients,
    stochastic_split,
)
from qdrift_stats.errors import QDriftError
from qdrift_stats.schedulers.base import StepGrid, adapter_for, scheduler_name, step_grid

if TYPE_CHECKING:
    from qdrift_stats.estimators.base import FittedEstimator

FORMAT = "qdrift-estimator"
FORMAT_VERSION = 1
#: The version of a file that carries an affine output map (``map_*`` tensors): a reader of version 1
#: would ignore the map and apply the statistic fitted to the error the map leaves, so it must refuse.
FORMAT_VERSION_MAP = 2
#: The version of a file that carries ``independent_variance`` (the landing-level pull): a reader of version 2
#: would ignore it and apply a different pull, so it must refuse.
FORMAT_VERSION_LANDING = 3
#: The version of a file whose output map regresses on the sampler state (``map_state_*`` tensors): a reader of
#: version 3 would apply the map without its state part, so it must refuse. Such a file may carry everything else.
FORMAT_VERSION_STATE_MAP = 4
READ_VERSIONS = (FORMAT_VERSION, FORMAT_VERSION_MAP, FORMAT_VERSION_LANDING, FORMAT_VERSION_STATE_MAP)
#: The affine output map (:mod:`qdrift_stats.estimators.output_map`): ``(steps, *sample_shape)`` each, and
#: ``map_weight`` ``(steps, C, C, k, k)`` (local) or ``(steps, D, D)`` (full).
MAP_TENSORS = ("map_center", "map_offset", "map_weight")
#: A state-aware map's state part: ``map_state_center`` ``(steps, *sample_shape)`` (state units), ``map_state_weight``
#: of ``map_weight``'s shape (local: the kernels of ``L_i``; full: ``M_i = L_i (I + K_i)^{-1}``).
MAP_STATE_TENSORS = ("map_state_center", "map_state_weight")
METADATA_KEY = "qdrift"
_REQUIRED_TENSORS = ("variance", "timesteps", "a_next", "b_next")
_OPTIONAL_TENSORS = (
    "k",
    "mu",
    "ci_low",
    "ci_high",
    "output_variance",
    "residual_fraction",
    "residual_error",
    "independent_variance",
)
# A smooth estimator's model over log b (not per step): (points,) each, see variance_on.
CURVE_TENSORS = ("curve_log_b", "curve_log_u", "curve_log_kappa")

log = logging.getLogger(__name__)


@dataclass
class EstimatorFile:
    """A loaded (or ready-to-save) estimator: tensors as float64 numpy arrays plus metadata."""

    tensors: dict[str, np.ndarray]
    metadata: dict[str, Any]
    path: Path | None = None
    notes: list[str] = field(default_factory=list)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_fitted(
        cls,
        fitted: FittedEstimator,
        correction: str | None = None,
        strength: float = 1.0,
        provenance: dict[str, Any] | None = None,
    ) -> EstimatorFile:
        """The file of a :class:`~qdrift_stats.estimators.base.FittedEstimator` (not yet saved; see :meth:`save`).

        Tensors: the per-step estimate and grid, ``k``/``mu`` when decomposed, and what the fit's
        ``export_tensors()`` adds (a smooth estimator's curves); metadata as in the module docstring,
        with the fit's ``export_metadata()`` in the ``estimator`` entry.

        Args:
            fitted: the fitted estimator.
            correction: ``"shrink"`` or ``"drift"``, the form the file asks for; ``"published"`` for the
                published baseline's own rule (only with the ``published`` estimator). ``None``: the
                fit's ``default_correction`` (``shrink`` unless the estimator says otherwise).
            strength: the strength ``lambda`` multiplying the statistic.
            provenance: further provenance entries (e.g. ``{"store": path}``).
        """
        from qdrift_stats import __version__
        from qdrift_stats.inputs import check_number

        if correction is None:
            correction = getattr(fitted, "default_correction", "shrink")
        if correction not in FILE_FORMS:
            raise QDriftError(f"unknown correction form {correction!r}; choose drift or shrink")
        if (correction == PUBLISHED) != ("output_variance" in fitted.export_tensors()):
            raise QDriftError("the 'published' correction form goes with the 'published' estimator, and only with it")
        strength = check_number(strength, "--strength", low=0.0)
        attrs = fitted.store_attrs
        tensors = {
            "variance": fitted.variance,
            "timesteps": fitted.timesteps,
            "a_next": fitted.a_next,
            "b_next": fitted.b_next,
            "ci_low": fitted.ci_low,
            "ci_high": fitted.ci_high,
        }
        if fitted.k is not None:
            tensors["k"] = fitted.k
        if fitted.mu is not None:
            tensors["mu"] = fitted.mu
        tensors.update(fitted.export_tensors())  # a smooth estimator's curves (see variance_on)
        scheduler_config = attrs.get("scheduler_config", "{}")
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "scheduler": {
                "name": attrs.get("scheduler"),
                "class": attrs.get("scheduler_class"),
                "config": json.loads(scheduler_config) if isinstance(scheduler_config, str) else scheduler_config,
            },
            "steps": int(fitted.num_steps),
            "prediction_type": attrs.get("prediction_type"),
            "estimator": {
                "name": fitted.name,
                "params": fitted.params,
                "smooth": bool(fitted.smooth),
                **fitted.export_metadata(),
            },
            "correction": {"form": correction, "strength": float(strength)},
            "num_runs": int(fitted.num_runs),
            "provenance": {
                "pair": attrs.get("pair"),
                "seeds": [int(s) for s in fitted.seeds],
                "batch_size": attrs.get("batch_size"),
                "store_package_version": attrs.get("package_version"),
                "package_version": __version__,
                **{key: attrs[attr] for key, attr in (("model", "model_id"), ("recipe", "recipe")) if attrs.get(attr)},
                **(provenance or {}),
            },
        }
        metadata.update(_pipeline_metadata(attrs))
        if "map_center" in tensors:
            metadata["format_version"] = FORMAT_VERSION_MAP
        if "independent_variance" in tensors:
            metadata["format_version"] = FORMAT_VERSION_LANDING
        if "map_state_center" in tensors:
            metadata["format_version"] = FORMAT_VERSION_STATE_MAP
        return cls({k: np.asarray(v, dtype=np.float64) for k, v in tensors.items()}, metadata)

    @classmethod
    def zeros_like_grid(cls, scheduler, correction: str = "shrink") -> EstimatorFile:
        """A zero estimator for a configured scheduler: the corrected sampler equals the plain one."""
        from qdrift_stats import __version__
        from qdrift_stats.schedulers.base import scheduler_identity

        grid = step_grid(scheduler)
        ident = scheduler_identity(scheduler)
        tensors = {
            "variance": np.zeros(grid.num_steps),
            "timesteps": grid.timesteps,
            "a_next": grid.a_next,
            "b_next": grid.b_next,
        }
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "scheduler": ident,
            "steps": grid.num_steps,
            "prediction_type": grid.prediction_type,
            "estimator": {"name": "zero", "params": {}, "smooth": False},
            "correction": {"form": correction, "strength": 1.0},
            "num_runs": 0,
            "provenance": {"package_version": __version__},
        }
        return cls(tensors, metadata)

    # ---- files --------------------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False, inputs: tuple[str | Path, ...] = ()) -> Path:
        """Write the file; refuse to replace an existing one unless ``overwrite`` (and only an estimator file).

        The tensors and metadata are validated as a reader would (:meth:`validate`), so no file is
        written that :meth:`load` refuses. The file is written to a temporary sibling and renamed
        into place (:mod:`qdrift_stats.outputs`); ``inputs`` are paths the output must not replace.
        """
        from qdrift_stats.outputs import atomic_output, check_output

        path = check_output(path, "estimator", overwrite=overwrite, inputs=inputs)
        self.validate(self.tensors, self.metadata, str(path))
        # One copy per tensor: safetensors refuses tensors that share memory (a 1-run fit's NaN bounds).
        tensors = {
            k: torch.from_numpy(np.array(v, dtype=np.float64, order="C", copy=True)) for k, v in self.tensors.items()
        }
        with atomic_output(path, "estimator") as tmp:
            save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(self.metadata, sort_keys=True)})
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> EstimatorFile:
        """Read and validate an estimator file (safetensors only; nothing is unpickled)."""
        from qdrift_stats.inputs import MAX_JSON_BYTES, loads_bounded

        path = Path(path)
        if not path.is_file():
            raise QDriftError(f"estimator file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k).double().numpy() for k in f.keys()}
        except Exception as exc:
            raise QDriftError(f"{path} is not a readable safetensors file ({type(exc).__name__})") from None
        text = header.get(METADATA_KEY)
        if not isinstance(text, str):
            raise QDriftError(f"{path} has no valid '{METADATA_KEY}' metadata: not a qdrift estimator file")
        try:
            metadata = loads_bounded(text, what=f"{path}: the '{METADATA_KEY}' metadata", max_bytes=MAX_JSON_BYTES)
        except QDriftError as exc:
            if "not valid JSON" in str(exc):
                raise QDriftError(
                    f"{path} has no valid '{METADATA_KEY}' metadata: not a qdrift estimator file"
                ) from None
            raise
        if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
            raise QDriftError(
                f"{path} is not a qdrift estimator file (format "
                f"{metadata.get('format') if isinstance(metadata, dict) else None!r})"
            )
        if metadata.get("format_version") not in READ_VERSIONS or isinstance(metadata.get("format_version"), bool):
            raise QDriftError(
                f"{path} has estimator format version {metadata.get('format_version')!r}; this "
                f"qdrift-stats reads versions {', '.join(map(str, READ_VERSIONS))}"
            )
        cls.validate(tensors, metadata, str(path))
        return cls(tensors, metadata, path)

    @staticmethod
    def validate(tensors: dict[str, np.ndarray], metadata: dict[str, Any], source: str = "estimator") -> None:
        """Check every tensor and the metadata an estimator file needs; raise a one-line :class:`QDriftError`.

        Tensors: the required ones present; ``timesteps``, ``a_next``, ``b_next`` one-dimensional
        and finite, ``b_next >= 0``; ``variance`` ``(steps,)`` or ``(steps, channels)``, finite and
        non-negative; ``k`` and ``mu`` finite, ``(steps,)`` or of the variance's shape, ``1 + k > 0``;
        ``ci_low``/``ci_high`` of the variance's shape (NaN allowed: undefined with one run);
        a smooth model's curves finite and of one length. Metadata: the scheduler, correction and
        estimator objects; a known correction form; a finite strength >= 0; ``steps`` (when given)
        equal to the tensors' step count.
        """
        from qdrift_stats.inputs import check_number

        tensors = {k: np.asarray(v) for k, v in tensors.items()}
        missing = [k for k in _REQUIRED_TENSORS if k not in tensors]
        if missing:
            raise QDriftError(f"{source} lacks the tensors {', '.join(missing)}")
        steps = len(tensors["timesteps"]) if tensors["timesteps"].ndim else 0
        for k, v in tensors.items():
            if k in _REQUIRED_TENSORS + _OPTIONAL_TENSORS and (v.ndim == 0 or v.shape[0] != steps):
                raise QDriftError(f"{source}: tensor {k!r} has shape {tuple(v.shape)}, expected {steps} steps first")
            if (k in _REQUIRED_TENSORS + _OPTIONAL_TENSORS and v.ndim > 2) or (
                k in ("timesteps", "a_next", "b_next") and v.ndim != 1
            ):
                raise QDriftError(
                    f"{source}: tensor {k!r} has shape {tuple(v.shape)}, expected (steps,) or (steps, channels)"
                )
        if steps == 0:
            raise QDriftError(f"{source} has no steps")
        for k in ("timesteps", "a_next", "b_next"):
            if not np.all(np.isfinite(tensors[k])):
                raise QDriftError(f"{source}: tensor {k!r} must be finite")
        if np.any(tensors["b_next"] < 0):
            raise QDriftError(f"{source}: tensor 'b_next' must be non-negative")
        variance = tensors["variance"]
        if not np.all(np.isfinite(variance)) or np.any(variance < 0):
            raise QDriftError(f"{source}: variance must be finite and non-negative")
        for k in ("ci_low", "ci_high"):
            if k in tensors and tensors[k].shape != variance.shape:
                raise QDriftError(
                    f"{source}: tensor {k!r} has shape {tuple(tensors[k].shape)}, the variance {tuple(variance.shape)}"
                )
        for k in ("k", "mu"):
            if k not in tensors:
                continue
            v = tensors[k]
            if v.shape != (steps,) and v.shape != variance.shape and not (variance.ndim == 1 and v.ndim == 2):
                raise QDriftError(
                    f"{source}: tensor {k!r} has shape {tuple(v.shape)}; expected ({steps},) or "
                    f"the variance's {tuple(variance.shape)}"
                )
            if not np.all(np.isfinite(v)) or np.any(np.abs(v) > 1e30):
                raise QDriftError(f"{source}: tensor {k!r} must be finite (and below 1e30 in size)")
        if "k" in tensors and np.any(1.0 + tensors["k"] <= 1e-6):
            raise QDriftError(
                f"{source}: tensor 'k' must satisfy 1 + k > 0 at every step (the output is divided by it)"
            )
        if "k" in tensors and "mu" in tensors and tensors["k"].shape != tensors["mu"].shape:
            raise QDriftError(
                f"{source}: tensors 'k' {tuple(tensors['k'].shape)} and 'mu' "
                f"{tuple(tensors['mu'].shape)} differ in shape"
            )
        curves = [tensors[k] for k in CURVE_TENSORS if k in tensors]
        if curves and (
            len({c.shape for c in curves}) != 1
            or curves[0].ndim != 1
            or not all(np.all(np.isfinite(c)) for c in curves)
        ):
            raise QDriftError(f"{source}: the smooth model's curves must be finite and of one length")
        for key in ("scheduler", "correction", "estimator"):
            if not isinstance(metadata.get(key), dict):
                raise QDriftError(f"{source}: metadata lacks the '{key}' object")
        if metadata["correction"].get("form") not in FILE_FORMS:
            raise QDriftError(f"{source}: unknown correction form {metadata['correction'].get('form')!r}")
        if metadata["correction"].get("form") == PUBLISHED and "output_variance" not in tensors:
            raise QDriftError(f"{source}: the 'published' form needs the 'output_variance' tensor")
        if "residual_fraction" in tensors and (
            tensors["residual_fraction"].ndim != 1
            or not np.all(np.isfinite(tensors["residual_fraction"]))
            or np.any(tensors["residual_fraction"] <= 0)
            or np.any(tensors["residual_fraction"] > 1)
        ):
            raise QDriftError(f"{source}: residual_fraction must be one number per step in (0, 1]")
        if "residual_error" in tensors and (
            "residual_fraction" not in tensors
            or tensors["residual_error"].ndim != 1
            or not np.all(np.isfinite(tensors["residual_error"]))
            or np.any(tensors["residual_error"] < 0)
        ):
            raise QDriftError(
                f"{source}: residual_error must be one finite number >= 0 per step, with residual_fraction"
            )
        if "independent_variance" in tensors and metadata.get("format_version") not in (
            FORMAT_VERSION_LANDING,
            FORMAT_VERSION_STATE_MAP,
        ):
            raise QDriftError(
                f"{source}: independent_variance needs estimator format version {FORMAT_VERSION_LANDING} or later"
            )
        if "independent_variance" in tensors and (
            "residual_fraction" not in tensors
            or tensors["independent_variance"].shape != tensors["variance"].shape
            or not np.all(np.isfinite(tensors["independent_variance"]))
            or np.any(tensors["independent_variance"] < 0)
        ):
            raise QDriftError(
                f"{source}: independent_variance must be finite, >= 0 and of the variance's shape, with "
                "residual_fraction"
            )
        if "output_variance" in tensors and (
            not np.all(np.isfinite(tensors["output_variance"])) or np.any(tensors["output_variance"] < 0)
        ):
            raise QDriftError(f"{source}: output_variance must be finite and non-negative")
        check_number(metadata["correction"].get("strength", 1.0), f"{source}: correction strength", low=0.0)
        if not isinstance(metadata["scheduler"].get("config", {}) or {}, dict):
            raise QDriftError(f"{source}: metadata scheduler config must be a JSON object")
        _validate_output_map(tensors, metadata, steps, source)
        declared = metadata.get("steps")
        if declared is not None and (isinstance(declared, bool) or declared != steps):
            raise QDriftError(f"{source}: metadata says {declared!r} steps, the tensors hold {steps}")
        if not isinstance(metadata.get("provenance", {}) or {}, dict):
            raise QDriftError(f"{source}: metadata provenance must be a JSON object")

    # ---- use ----------------------------------------------------------------------------
    @property
    def variance(self) -> np.ndarray:
        return self.tensors["variance"]

    @property
    def steps(self) -> int:
        return len(self.tensors["timesteps"])

    @property
    def scheduler_name(self) -> str:
        return str(self.metadata["scheduler"].get("name"))

    @property
    def smooth(self) -> bool:
        return bool(self.metadata["estimator"].get("smooth", False))

    def _describe(self) -> str:
        return f"{self.scheduler_name} with {self.steps} steps"

    @property
    def channel_axis(self) -> int:
        """The state axis of the channels for per-channel values: 1, or -1 for packed token latents."""
        dims = self.metadata.get("sample_dims")
        if isinstance(dims, list) and "channel" in dims:
            index = dims.index("channel")
            return -1 if index == len(dims) - 1 and index > 0 else 1 + index
        return 1

    def _grid_offset(self, grid: StepGrid) -> int | None:
        """``k`` when the file's grid is the last ``steps`` steps of ``grid`` from step ``k``
        (img2img), else ``None``."""
        k = grid.num_steps - self.steps
        if k <= 0:
            return None
        same = np.allclose(grid.timesteps[k:], self.tensors["timesteps"], rtol=0, atol=1e-6) and np.allclose(
            grid.b_next[k:], self.tensors["b_next"], rtol=1e-6, atol=1e-9
        )
        return k if same else None

    def _grid_difference(self, grid: StepGrid, call: dict[str, Any] | None) -> str:
        """What differs between the file's grid and a sampler's, in words (step count, shift, size, sigmas)."""
        recorded = self.metadata.get("grid") or {}
        reasons = []
        if grid.num_steps != self.steps:
            reasons.append("the step count")
        old_mu = (recorded.get("set_timesteps") or {}).get("mu")
        new_mu = (call or {}).get("mu")
        if old_mu is not None and new_mu is not None and not np.isclose(float(old_mu), float(new_mu)):
            shape = recorded.get("sample_shape")
            size = f"; calibrated on latents {tuple(shape)}" if shape else ""
            reasons.append(f"the sigma shift (mu {float(old_mu):.4g} vs {float(new_mu):.4g}: another image size{size})")
        elif grid.num_steps == self.steps:
            custom = (recorded.get("set_timesteps") or {}).get("sigmas") is not None or (call or {}).get("sigmas")
            reasons.append(
                "the pipeline's custom sigmas" if custom is not None else "the timesteps (shift, spacing or strength)"
            )
        levels = f"noise levels b_next {_levels(self.tensors['b_next'])} vs {_levels(grid.b_next)}"
        return f"what differs: {', '.join(reasons)}; {levels}"

    def variance_on(self, grid: StepGrid, name: str | None = None, call: dict[str, Any] | None = None) -> np.ndarray:
        """The statistic on a sampler's step grid; refuses a grid it was not fitted for.

        Same scheduler and timesteps: the stored values. Same scheduler, another grid, smooth
        estimator: with the smooth model's output-space curves (``curve_log_b``, ``curve_log_u``,
        see :mod:`qdrift_stats.estimators.smooth`) the curve evaluated at the new levels and mapped
        with the new grid's solver gains; without them ``log v`` interpolated linearly over
        ``log b_next``. Either way it is noted in ``self.notes``.
        """
        source = str(self.path) if self.path else "estimator"
        name = name or grid.name
        if name != self.scheduler_name:
            raise QDriftError(f"{source} was fitted for scheduler {self.scheduler_name}, not {name}")
        if self._same_grid(grid):
            return self.variance
        offset = self._grid_offset(grid)
        if offset is not None:  # img2img: the file covers the steps the pipeline runs from step `offset`
            note = (
                f"{source}: fitted on the last {self.steps} of {grid.num_steps} steps "
                f"(img2img); no correction before step {offset}"
            )
            if note not in self.notes:
                self.notes.append(note)
            return np.concatenate([np.zeros((offset,) + self.variance.shape[1:]), self.variance])
        if not self.smooth:
            raise QDriftError(
                f"{source} was fitted for {self._describe()}, this sampler runs {name} with {grid.num_steps} steps: "
                f"{self._grid_difference(grid, call)}; re-record for this grid or export a smooth estimator"
            )
        if CURVE_TENSORS[0] in self.tensors and CURVE_TENSORS[1] in self.tensors:
            from qdrift_stats.estimators.smooth import variance_from_curves

            variance = variance_from_curves(self.tensors, self.metadata["scheduler"], grid)
            how = "its output-space curve and the new grid's solver gains"
        else:
            variance = interpolate_log_b(self.tensors["b_next"], self.variance, grid.b_next)
            how = "linear interpolation of log v"
        note = (
            f"{source}: interpolated from {self.steps} to {grid.num_steps} steps over log b ({how}); "
            f"{self._grid_difference(grid, call)}"
        )
        self.notes.append(note)
        log.warning(note)
        return variance

    def coefficients(
        self,
        grid: StepGrid,
        correction: str | None = None,
        strength: float | None = None,
        call: dict[str, Any] | None = None,
    ) -> np.ndarray:
        """Per-step pull coefficients on a grid (see :func:`qdrift_stats.correct.coefficients.correction_coefficients`).

        ``call``: the sampler's ``set_timesteps`` keyword arguments (``mu``, ``sigmas``), for the
        refusal to say what differs.
        """
        form = correction or self.metadata["correction"]["form"]
        lam = self.metadata["correction"].get("strength", 1.0) if strength is None else strength
        if form == PUBLISHED:
            return self.published_on(grid, float(lam))[0]
        variance = self.variance_on(grid, call=call)
        rho, error = self.residual_terms_on(grid)
        independent = self.independent_variance_on(grid)
        if form == "shrink" and independent is not None:
            return landing_coefficients(
                variance, independent, grid.a, grid.b, grid.a_next, grid.b_next, rho, float(lam)
            )
        return correction_coefficients(variance, grid.b_next, form, float(lam), rho, error)

    def independent_variance_on(self, grid: StepGrid) -> np.ndarray | None:
        """The per-step ``v_i`` (``independent_variance``) on a sampler's grid, or ``None`` without it.

        Same grid: the stored values; img2img (the file covers the last steps): 0 on the steps before (they
        have no statistic either). Call after :meth:`variance_on`.
        """
        if "independent_variance" not in self.tensors:
            return None
        v = self.tensors["independent_variance"]
        if self._same_grid(grid):
            return v
        offset = self._grid_offset(grid)
        if offset is not None:
            return np.concatenate([np.zeros((offset,) + v.shape[1:]), v])
        return None

    def residual_terms_on(self, grid: StepGrid) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``(residual_fraction, residual_error)`` per step on a sampler's grid; ``(None, None)`` without them.

        Same grid: the stored values; img2img (the file covers the last steps): fraction 1 and error 0 on
        the steps before. Other grids are reached only by smooth estimators (:meth:`variance_on` refuses
        the rest), which carry no residual terms. Call after :meth:`variance_on`.
        """
        if "residual_fraction" not in self.tensors:
            return None, None
        rho = self.tensors["residual_fraction"]
        error = self.tensors.get("residual_error", np.zeros_like(rho))
        if self._same_grid(grid):
            return rho, error
        offset = self._grid_offset(grid)
        if offset is not None:
            return np.concatenate([np.ones(offset), rho]), np.concatenate([np.zeros(offset), error])
        return None, None

    @property
    def form(self) -> str:
        """The correction form the file asks for."""
        return str(self.metadata["correction"]["form"])

    def published_on(self, grid: StepGrid, strength: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """``(c, ratio)`` of the published correction on a grid
        (:func:`~qdrift_stats.correct.coefficients.published_coefficients`).

        The output variance is keyed by timestep and linearly interpolated onto the grid's timesteps
        (constant beyond the ends), as the published code does; DPM-Solver++'s gains are read off a
        scheduler rebuilt from the file's identity on the grid's step count.
        """
        if "output_variance" not in self.tensors:
            source = str(self.path) if self.path else "estimator"
            raise QDriftError(f"{source} has no output variance: the 'published' form needs the 'published' estimator")
        V = self.tensors["output_variance"]
        if not self._same_grid(grid):
            V = interpolate_over_timesteps(self.tensors["timesteps"], V, grid.timesteps)
        gain = gain_previous = None
        if grid.name in ("dpmpp-2m", "flow-dpmpp-2m"):
            from qdrift_stats.estimators.smooth import scheduler_from_identity, solver_gains

            gain, gain_previous = solver_gains(scheduler_from_identity(self.metadata["scheduler"], grid.num_steps))
        return published_coefficients(
            grid.name, grid.a, grid.b, grid.a_next, grid.b_next, V, gain, gain_previous, strength
        )

    def corrector(
        self,
        scheduler,
        correction: str | None = None,
        strength: float | None = None,
        device=None,
        dtype=None,
        call: dict[str, Any] | None = None,
    ):
        """A :class:`~qdrift_stats.correct.corrector.Corrector` for a scheduler after ``set_timesteps``."""
        from qdrift_stats.correct.corrector import Corrector

        grid = step_grid(scheduler)
        self.check_scheduler(scheduler)
        device = torch.device(device) if device is not None else scheduler.timesteps.device
        dtype = dtype or torch.float32
        k, mu = self.decomposition_on(grid)
        if (correction or self.form) == PUBLISHED:
            from qdrift_stats.correct.corrector import IncrementCorrector

            lam = self.metadata["correction"].get("strength", 1.0) if strength is None else strength
            c, ratio = self.published_on(grid, float(lam))
            return IncrementCorrector(grid, c, ratio, device, dtype, k=k, mu=mu, channel_axis=self.channel_axis)
        adapter = adapter_for(scheduler)
        noise_factor = None
        if not adapter.stochastic:
            coefficients = self.coefficients(grid, correction, strength, call)  # refuses another grid, saying why
        else:  # stochastic sampler: lower the injected noise first, pull only what it cannot absorb
            form = correction or self.metadata["correction"]["form"]
            lam = self.metadata["correction"].get("strength", 1.0) if strength is None else strength
            remaining, noise_factor = stochastic_split(self.variance_on(grid, call=call), adapter.noise_std(grid), lam)
            coefficients = correction_coefficients(remaining, grid.b_next, form, 1.0, *self.residual_terms_on(grid))
        return Corrector(
            grid,
            coefficients,
            device,
            dtype,
            k=k,
            mu=mu,
            channel_axis=self.channel_axis,
            noise_factor=noise_factor,
            output_map=self.output_map_on(grid),  # after the grid check above, which says what differs
        )

    # ---- provenance -----------------------------------------------------------------------
    def _same_grid(self, grid: StepGrid) -> bool:
        return (
            grid.num_steps == self.steps
            and np.allclose(grid.timesteps, self.tensors["timesteps"], rtol=0, atol=1e-6)
            and np.allclose(grid.b_next, self.tensors["b_next"], rtol=1e-6, atol=1e-9)
        )

    def check_scheduler(self, scheduler) -> None:
        """Refuse a scheduler of another class or config than the file was calibrated with.

        Keys that change the solver or the meaning of the model output (:data:`SOLVER_CONFIG_KEYS`)
        must always agree. Any other difference (keys present on both sides; ``_``-prefixed metadata
        ignored) changes only the step grid: a smooth estimator is then interpolated (a warning and a
        line in ``notes``), any other is refused. Raises :class:`QDriftError` with one line.
        """
        source = str(self.path) if self.path else "estimator"
        current_name = scheduler_name(scheduler)
        if current_name != self.scheduler_name:
            raise QDriftError(f"{source} was fitted for scheduler {self.scheduler_name}, not {current_name}")
        recorded = self.metadata["scheduler"]
        recorded_class = recorded.get("class")
        if recorded_class and recorded_class != type(scheduler).__name__:
            raise QDriftError(
                f"{source} was calibrated with {recorded_class}, not {type(scheduler).__name__}; "
                "re-record with this scheduler"
            )
        differing = config_differences(recorded.get("config") or {}, dict(scheduler.config))
        if not differing:
            return
        key, (have, want) = next(iter(differing.items()))
        structural = [k for k in differing if k in SOLVER_CONFIG_KEYS]
        if structural or not self.smooth:
            key = structural[0] if structural else key
            have, want = differing[key]
            hint = (
                "re-record with this scheduler"
                if structural
                else "re-record with this scheduler or export a smooth estimator"
            )
            raise QDriftError(
                f"{source} was calibrated with {recorded_class or self.scheduler_name} "
                f"{key}={have!r}, this scheduler has {key}={want!r}; {hint}"
            )
        note = (
            f"{source}: scheduler config differs in {', '.join(sorted(differing))}; the smooth "
            "estimator is interpolated to this grid"
        )
        if note not in self.notes:
            self.notes.append(note)
            log.warning(note)

    def check_provenance(self, model: str | None = None, recipe: str | None = None) -> None:
        """Refuse a model or PTQ recipe identifier other than the one the file records.

        ``None`` skips a check; an identifier the file does not record is noted (and logged), not refused.
        """
        source = str(self.path) if self.path else "estimator"
        provenance = self.metadata.get("provenance") or {}
        for label, given in (("model", model), ("recipe", recipe)):
            if given is None:
                continue
            recorded = provenance.get(label)
            if recorded is None:
                note = f"{source} records no {label} identifier; cannot check {given!r}"
                self.notes.append(note)
                log.warning(note)
            elif str(recorded) != str(given):
                raise QDriftError(
                    f"{source} was calibrated for {label} {recorded!r}, not {given!r}; re-calibrate for this {label}"
                )

    def use_warnings(self, pair: str | None = None, model: str | None = None) -> list[str]:
        """Warnings before sampling with this estimator: another recorded pair, or correcting the FP model.

        Args:
            pair: the pair name the sampler uses (``--pair``); compared with the recorded one.
            model: ``"fp"`` or ``"q"``: which model is corrected.
        """
        source = str(self.path) if self.path else "estimator"
        out = []
        recorded = (self.metadata.get("provenance") or {}).get("pair")
        if pair is not None and recorded and not same_pair_name(str(recorded), str(pair)):
            out.append(
                f"{source} was recorded with pair {recorded!r}, not {pair!r}: its statistic "
                "describes that pair's quantization error"
            )
        if model == "fp":
            out.append(
                f"correcting the FP model with {source}: the correction is meant for the quantized model (--model q)"
            )
        return out

    def output_map_on(self, grid: StepGrid):
        """The affine output map (:class:`~qdrift_stats.correct.corrector.AffineOutputMap`, on the host) on a
        sampler's grid, or ``None`` where the file has none. On the fitted grid as stored; img2img (the file covers
        the last steps): inactive before them; any other grid is refused (a map describes the model at the
        calibrated timesteps only)."""
        from qdrift_stats.correct.corrector import AffineOutputMap

        if "map_center" not in self.tensors:
            return None
        structure = self.metadata["estimator"]["output_map"]["structure"]
        center, offset, weight = (self.tensors.get(k) for k in MAP_TENSORS)
        state_center, state_weight = (self.tensors.get(k) for k in MAP_STATE_TENSORS)
        if self._same_grid(grid):
            return AffineOutputMap(
                structure, center, offset, weight, state_center=state_center, state_weight=state_weight
            )
        offset_steps = self._grid_offset(grid)
        source = str(self.path) if self.path else "estimator"
        if offset_steps is None:
            raise QDriftError(f"{source} carries an output map fitted on its own grid only; re-record for this grid")

        def pad(v):
            return None if v is None else np.concatenate([np.zeros((offset_steps,) + v.shape[1:]), v])

        active = [False] * offset_steps + [True] * self.steps
        return AffineOutputMap(
            structure,
            pad(center),
            pad(offset),
            pad(weight),
            active,
            state_center=pad(state_center),
            state_weight=pad(state_weight),
        )

    def decomposition_on(self, grid: StepGrid) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The output decomposition ``(k, mu)`` on a sampler's grid (``None`` where the file has none).

        On the fitted grid: the stored values; on another grid (smooth estimators only, after
        :meth:`variance_on` has accepted it): linear interpolation over the timestep, constant beyond
        the ends (``k`` and ``mu`` describe the model at its input timestep, not the step size).
        """
        k, mu = self.tensors.get("k"), self.tensors.get("mu")
        if (k is None and mu is None) or self._same_grid(grid):
            return k, mu
        offset = self._grid_offset(grid)
        if offset is not None:  # img2img: nothing before the calibrated steps
            return tuple(None if v is None else np.concatenate([np.zeros((offset,) + v.shape[1:]), v]) for v in (k, mu))
        return tuple(
            None if v is None else interpolate_over_timesteps(self.tensors["timesteps"], v, grid.timesteps)
            for v in (k, mu)
        )


def _validate_output_map(tensors: dict[str, np.ndarray], metadata: dict[str, Any], steps: int, source: str) -> None:
    """Check the affine output map's tensors against its ``estimator.output_map`` metadata (one-line errors)."""
    present = [k for k in MAP_TENSORS + MAP_STATE_TENSORS if k in tensors]
    entry = metadata.get("estimator", {}).get("output_map")
    if not present and entry is None:
        return
    version = metadata.get("format_version", FORMAT_VERSION_MAP)
    if version not in (FORMAT_VERSION_MAP, FORMAT_VERSION_LANDING, FORMAT_VERSION_STATE_MAP):
        raise QDriftError(f"{source}: an output map needs estimator format version {FORMAT_VERSION_MAP} or later")
    if not isinstance(entry, dict) or entry.get("structure") not in ("mean", "local", "full"):
        raise QDriftError(f"{source}: the output map needs estimator metadata 'output_map' with a known structure")
    if "map_center" not in tensors or "map_offset" not in tensors:
        raise QDriftError(f"{source}: the output map needs the tensors map_center and map_offset")
    center, offset = tensors["map_center"], tensors["map_offset"]
    if center.ndim < 2 or center.shape != offset.shape or center.shape[0] != steps:
        raise QDriftError(
            f"{source}: map_center {tuple(center.shape)} and map_offset {tuple(offset.shape)} must both be "
            f"({steps}, *sample_shape)"
        )
    structure, weight = entry["structure"], tensors.get("map_weight")
    shape = center.shape[1:]
    dim = int(np.prod(shape))
    expected = {
        "mean": None,
        "local": None if weight is None else (steps, shape[0], shape[0], weight.shape[-1], weight.shape[-1]),
        "full": (steps, dim, dim),
    }[structure]
    if structure == "local" and (
        len(shape) != 3 or weight is None or weight.ndim != 5 or weight.shape[-1] % 2 != 1 or weight.shape != expected
    ):
        raise QDriftError(
            f"{source}: a local output map needs map_weight (steps, C, C, k, k) with odd k, C = {shape[0]}"
        )
    if (weight is None) != (expected is None) or (weight is not None and weight.shape != expected):
        raise QDriftError(
            f"{source}: map_weight has shape {None if weight is None else tuple(weight.shape)}, "
            f"the {structure} map needs {expected}"
        )
    states = [k for k in MAP_STATE_TENSORS if k in tensors]
    if states or entry.get("state"):
        if len(states) != 2 or entry.get("state") is not True or version != FORMAT_VERSION_STATE_MAP:
            raise QDriftError(
                f"{source}: a state-aware output map needs map_state_center and map_state_weight, metadata "
                f"output_map.state true and estimator format version {FORMAT_VERSION_STATE_MAP}"
            )
        if weight is None or tensors["map_state_center"].shape != center.shape:
            raise QDriftError(
                f"{source}: a state-aware output map needs a slope and map_state_center of {center.shape}"
            )
        if tensors["map_state_weight"].shape != weight.shape:
            raise QDriftError(
                f"{source}: map_state_weight has shape {tuple(tensors['map_state_weight'].shape)}, "
                f"map_weight {tuple(weight.shape)}: they must agree"
            )
    for k in present:
        if not np.all(np.isfinite(tensors[k])) or np.any(np.abs(tensors[k]) > 1e30):
            raise QDriftError(f"{source}: tensor {k!r} must be finite (and below 1e30 in size)")


def same_pair_name(a: str, b: str) -> bool:
    """Whether two ``--pair`` names load the same factory (``./my_pairs.py:f`` and ``my_pairs:f`` do).

    A file path is compared by its file name without ``.py`` with the last part of a module name.
    """

    def key(name: str) -> tuple[str, str, bool]:
        module, _, factory = name.rpartition(":")
        is_file = module.endswith(".py") or "/" in module or os.sep in module
        return (Path(module).stem if is_file else module), factory, is_file

    (ma, fa, file_a), (mb, fb, file_b) = key(a), key(b)
    if fa != fb:
        return False
    if file_a or file_b:
        return ma.rpartition(".")[2] == mb.rpartition(".")[2]
    return ma == mb


#: Scheduler config keys that change the solver or the meaning of the model output: an estimator
#: calibrated under other values is refused even when it is smooth.
SOLVER_CONFIG_KEYS: tuple[str, ...] = (
    "prediction_type",
    "algorithm_type",
    "solver_order",
    "solver_type",
    "use_flow_sigmas",
    "thresholding",
    "clip_sample",
    "lower_order_final",
    "euler_at_final",
    "variance_type",
)


def _builtin(value: Any) -> Any:
    """``json.dumps`` fallback: numpy scalars and arrays as Python numbers and lists."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-able: {type(value).__name__}")


def _comparable(value: Any) -> Any:
    """A config value as it reads back from JSON (tuples become lists, numpy values Python ones)."""
    return json.loads(json.dumps(value, default=_builtin))


def config_differences(recorded: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (recorded, current)}`` for config keys present in both whose values differ (``_`` keys ignored)."""
    differing = {}
    for key in sorted(set(recorded) & set(current)):
        if key.startswith("_"):
            continue
        have, want = _comparable(recorded[key]), _comparable(current[key])
        if have != want:
            differing[key] = (have, want)
    return differing


def interpolate_over_timesteps(t_from: np.ndarray, values: np.ndarray, t_to: np.ndarray) -> np.ndarray:
    """Per-step ``values`` (``(steps[, channels])``) moved to other timesteps: linear, constant beyond the ends."""
    order = np.argsort(t_from)
    flat = np.asarray(values, dtype=np.float64)[order].reshape(len(t_from), -1)
    cols = [
        np.interp(np.asarray(t_to, dtype=np.float64), np.asarray(t_from, dtype=np.float64)[order], flat[:, c])
        for c in range(flat.shape[1])
    ]
    return np.stack(cols, axis=-1).reshape((len(t_to),) + np.shape(values)[1:])


def _levels(b: np.ndarray) -> str:
    values = [f"{v:.3g}" for v in np.asarray(b, dtype=np.float64)]
    return "[" + ", ".join(values if len(values) <= 5 else values[:3] + ["..."] + values[-1:]) + "]"


def _pipeline_metadata(attrs: dict[str, Any]) -> dict[str, Any]:
    """What a pipeline calibration store adds to an estimator file: the latent layout (``sample_dims``),
    the grid the pipeline ran (``grid``: its ``set_timesteps`` call, begin index, latent shape) and
    the quantized denoiser's ``fingerprint`` (:mod:`qdrift_stats.record.fingerprint`)."""
    extra: dict[str, Any] = {}
    for key, target in (("sample_dims", "sample_dims"), ("q_fingerprint", "fingerprint")):
        value = attrs.get(key)
        if isinstance(value, str) and value:
            try:
                extra[target] = json.loads(value)
            except json.JSONDecodeError:
                raise QDriftError(f"the store's {key} attribute is not valid JSON; re-record the store") from None
    if attrs.get("set_timesteps"):
        extra["grid"] = {
            "set_timesteps": json.loads(attrs["set_timesteps"]),
            "begin_index": int(attrs.get("begin_index", 0)),
            "grid_steps": int(attrs.get("grid_steps", attrs.get("steps", 0))),
            "sample_shape": list(attrs.get("sample_shape") or []),
        }
    return extra


def interpolate_log_b(b_from: np.ndarray, values: np.ndarray, b_to: np.ndarray) -> np.ndarray:
    """Interpolate positive per-step ``values`` (``(steps[, channels])``) from one ``b`` grid to another.

    Linear in ``(log b, log v)``, constant beyond the ends; 0 where the target ``b`` is 0.
    """
    keep = b_from > 0
    xb = np.log(b_from[keep])
    order = np.argsort(xb)
    logv = np.log(np.maximum(values[keep], 1e-300))[order]
    out_shape = (len(b_to),) + values.shape[1:]
    out = np.zeros(out_shape)
    target = b_to > 0
    xt = np.log(b_to[target])
    flat = logv.reshape(len(logv), -1)
    cols = [np.exp(np.interp(xt, xb[order], flat[:, c])) for c in range(flat.shape[1])]
    out[target] = np.stack(cols, axis=-1).reshape((target.sum(),) + values.shape[1:])
    return out
