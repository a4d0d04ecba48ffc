"""A fingerprint of a quantized denoiser: its output on a fixed, seeded probe input.

A quantized pipeline saved with ``save_pretrained`` may reload as the plain model class (fake-quant
activation hooks, quanto / torchao wrappers that the folder does not describe): its output then no
longer is the calibrated model's, and an estimator fitted on the calibrated model silently
over-corrects. :func:`calibrate_pipeline <qdrift_stats.record.pipelines.calibrate_pipeline>` records,
once per store, the output of the full-precision and of the quantized denoiser on a probe input
built from the structure of the pipeline's first denoiser call; estimator files fitted from the
store carry it, and :func:`check_denoiser` (used by ``check_pipeline`` and ``QDriftScheduler(...,
pipeline=pipe)``) recomputes it and refuses a denoiser that does not reproduce the quantized output.

The probe: every argument of the first denoiser call is kept as JSON: small tensors (at most
:data:`VERBATIM_ELEMENTS` elements: timesteps, class labels, guidance) and integer tensors by
value, larger floating-point tensors (latents, text embeddings, position ids) by shape only; those
are drawn from ``torch.Generator().manual_seed(PROBE_SEED)`` in argument order, in float32 on the
CPU (positional arguments first, then keyword arguments in sorted order), then moved to the
denoiser's device and dtype. Only :data:`SUBSAMPLE` output values, at fixed
evenly spaced positions, are kept.

The test: with ``o`` the checked output, ``q`` and ``f`` the recorded quantized and full-precision
outputs (at the kept positions), the denoiser passes when ``|o - q| <= TOLERANCE * |q - f|``: it is
much closer to the calibrated quantized model than the quantized model is to the full-precision
one. Numerical noise between devices or kernels is small next to a quantization error; a reload
that lost the quantization lands at ``|o - q| ~ |q - f|`` and is refused.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from qdrift_stats.errors import QDriftError

FINGERPRINT_FORMAT = "qdrift-denoiser-fingerprint"
PROBE_SEED = 20260317
VERBATIM_ELEMENTS = 64
MAX_INT_ELEMENTS = 4096
SUBSAMPLE = 256
TOLERANCE = 0.25


class _NotProbeable(Exception):
    pass


def _spec_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        entry: dict[str, Any] = {"shape": list(value.shape), "dtype": dtype}
        floating = value.is_floating_point()
        if value.numel() <= VERBATIM_ELEMENTS or (not floating and value.numel() <= MAX_INT_ELEMENTS):
            entry["values"] = value.detach().float().cpu().reshape(-1).tolist()
        elif not floating:
            raise _NotProbeable(f"integer tensor of {value.numel()} elements")
        return {"tensor": entry}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    if isinstance(value, dict):
        return {"dict": {str(k): _spec_of(v) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {"list": [_spec_of(v) for v in value], "tuple": isinstance(value, tuple)}
    raise _NotProbeable(type(value).__name__)


def probe_spec(args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The JSON description of a denoiser call from which :func:`probe_input` rebuilds a probe (``None``:
    the call holds something that cannot be described, e.g. an attention processor object)."""
    kwargs = {k: v for k, v in kwargs.items() if k != "return_dict"}
    try:
        return {"args": [_spec_of(a) for a in args], "kwargs": {k: _spec_of(v) for k, v in kwargs.items()}}
    except _NotProbeable:
        return None


def _build(entry: dict[str, Any], generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> Any:
    if "tensor" in entry:
        spec = entry["tensor"]
        torch_dtype = getattr(torch, str(spec["dtype"]), None)
        if not isinstance(torch_dtype, torch.dtype):
            raise QDriftError(f"the fingerprint probe names an unknown dtype {spec['dtype']!r}")
        shape = tuple(int(s) for s in spec["shape"])
        if "values" in spec:
            tensor = torch.tensor(spec["values"], dtype=torch.float64).reshape(shape)
        else:
            tensor = torch.randn(shape, generator=generator, dtype=torch.float32)
        if torch_dtype.is_floating_point:
            return tensor.to(device=device, dtype=dtype)
        return tensor.to(device=device, dtype=torch_dtype)
    if "value" in entry:
        return entry["value"]
    if "dict" in entry:
        return {k: _build(entry["dict"][k], generator, device, dtype) for k in sorted(entry["dict"])}
    if "list" in entry:
        items = [_build(v, generator, device, dtype) for v in entry["list"]]
        return tuple(items) if entry.get("tuple") else items
    raise QDriftError("the fingerprint probe has an entry of an unknown kind")


def _where(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for param in module.parameters():
        if param.is_floating_point():
            return param.device, param.dtype
    return torch.device("cpu"), torch.float32


def probe_input(spec: dict[str, Any], module: nn.Module) -> tuple[tuple, dict]:
    """The probe call ``(args, kwargs)`` for ``module`` (its device and floating dtype)."""
    device, dtype = _where(module)
    generator = torch.Generator().manual_seed(PROBE_SEED)
    args = tuple(_build(a, generator, device, dtype) for a in spec["args"])
    # keyword arguments in sorted order: the spec travels as JSON with sorted keys
    kwargs = {k: _build(spec["kwargs"][k], generator, device, dtype) for k in sorted(spec["kwargs"])}
    return args, kwargs


def _raw(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise QDriftError(f"the denoiser returned {type(out).__name__}; cannot fingerprint it")


def probe_output(module: nn.Module, spec: dict[str, Any]) -> np.ndarray:
    """``(SUBSAMPLE,)`` float64 values of ``module``'s output on the probe, at fixed evenly spaced positions."""
    args, kwargs = probe_input(spec, module)
    with torch.no_grad():
        out = _raw(module(*args, **kwargs)).detach().double().cpu().reshape(-1)
    index = np.unique(np.linspace(0, out.numel() - 1, min(SUBSAMPLE, out.numel())).round().astype(np.int64))
    return out[torch.from_numpy(index)].numpy()


def fingerprint(fp_module: nn.Module, q_module: nn.Module, spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """The fingerprint of a pair of denoisers on the probe described by ``spec`` (``None`` without a spec)."""
    if spec is None:
        return None
    q = probe_output(q_module, spec)
    f = probe_output(fp_module, spec)
    if not (np.all(np.isfinite(q)) and np.all(np.isfinite(f))):
        return None
    return {
        "format": FINGERPRINT_FORMAT,
        "probe_seed": PROBE_SEED,
        "probe": spec,
        "q": q.tolist(),
        "fp": f.tolist(),
        "tolerance": TOLERANCE,
    }


def check_denoiser(module: nn.Module, recorded: dict[str, Any], source: str = "estimator") -> float:
    """Refuse (one-line :class:`QDriftError`) a denoiser that does not reproduce the fingerprinted quantized output.

    Returns ``|o - q| / |q - f|`` (see the module docstring).
    """
    if not isinstance(recorded, dict) or recorded.get("format") != FINGERPRINT_FORMAT:
        raise QDriftError(f"{source} has no valid denoiser fingerprint")
    q = np.asarray(recorded["q"], dtype=np.float64)
    f = np.asarray(recorded["fp"], dtype=np.float64)
    try:
        o = probe_output(module, recorded["probe"])
    except QDriftError:
        raise
    except Exception as exc:  # the denoiser cannot take the probe: another architecture
        raise QDriftError(
            f"the pipeline's denoiser cannot take {source}'s fingerprint probe "
            f"({type(exc).__name__}): not the calibrated model"
        ) from None
    if o.shape != q.shape:
        raise QDriftError(f"the pipeline's denoiser output differs in size from the one {source} was calibrated on")
    gap = float(np.linalg.norm(q - f))
    distance = float(np.linalg.norm(o - q))
    scale = max(float(np.linalg.norm(q)), 1e-12)
    tolerance = float(recorded.get("tolerance", TOLERANCE))
    if gap <= 1e-6 * scale:  # the calibrated Q model computed the FP output: nothing to tell apart
        ratio = distance / scale
        if ratio > 1e-3:
            raise QDriftError(
                f"the pipeline's denoiser does not compute what {source} was calibrated on "
                f"(relative output change {ratio:.2g})"
            )
        return ratio
    ratio = distance / gap
    if not math.isfinite(ratio) or ratio > tolerance:
        to_fp = float(np.linalg.norm(o - f)) / gap
        looks = (
            "it computes the full-precision model's output: was the quantization lost when the "
            "pipeline was saved and reloaded?"
            if to_fp < tolerance
            else "another model or quantization"
        )
        raise QDriftError(
            f"the pipeline's denoiser is not the quantized model {source} was calibrated on "
            f"(probe output {ratio:.2f} x the quantization gap away from it; {looks})"
        )
    return ratio


__all__ = ["FINGERPRINT_FORMAT", "check_denoiser", "fingerprint", "probe_output", "probe_spec"]
