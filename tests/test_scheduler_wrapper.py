"""QDriftScheduler: the diffusers scheduler interface with the Q-Drift correction inside ``step``."""

import inspect
import json
import logging

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from torch.utils._python_dispatch import TorchDispatchMode

from qdrift_stats.correct.corrector import Corrector
from qdrift_stats.correct.diffusers import (
    ESTIMATOR_FILE_NAME,
    WRAPPER_CONFIG_NAME,
    QDriftScheduler,
    diffusers_needs_module_file,
)
from qdrift_stats.correct.estimator_file import EstimatorFile
from qdrift_stats.errors import QDriftError
from qdrift_stats.loop import initial_noise, prepared_scheduler, run_sampler, step_generator
from qdrift_stats.schedulers.base import SCHEDULER_NAMES, make_scheduler, step_grid, step_kwargs

from .conftest import pair_for

STEPS = 10


def estimator_for(pair, name, steps=STEPS, variance=1e-3, **tensors):
    est = EstimatorFile.zeros_like_grid(prepared_scheduler(pair, name, steps))
    est.tensors["variance"] = (
        np.full(steps, variance) if np.isscalar(variance) else np.asarray(variance, dtype=np.float64)
    )
    est.tensors.update({k: np.asarray(v, dtype=np.float64) for k, v in tensors.items()})
    return est


def pipeline_loop(pair, scheduler, steps, seed=0, batch=16, return_dict=True):
    """The loop a diffusers pipeline runs, against any scheduler object (plain or wrapped)."""
    scheduler.set_timesteps(steps)
    x, cond = initial_noise(pair, scheduler, batch, seed)
    kwargs = step_kwargs(scheduler.scheduler if isinstance(scheduler, QDriftScheduler) else scheduler)
    if "generator" in inspect.signature(scheduler.step).parameters:  # stochastic samplers: seeded step noise
        kwargs["generator"] = step_generator(seed)
    outputs = []
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        result = scheduler.step(pair.q(model_input, t, **cond), t, x, return_dict=return_dict, **kwargs)
        outputs.append(result)
        x = result.prev_sample if return_dict else result[0]
    return x, outputs


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_zero_estimator_leaves_every_scheduler_bit_for_bit_unchanged(name):
    pair = pair_for(name)
    plain, plain_out = pipeline_loop(pair, make_scheduler(name, pair.scheduler_config), STEPS)
    wrapped_scheduler = QDriftScheduler(
        make_scheduler(name, pair.scheduler_config), estimator_for(pair, name, variance=0.0)
    )
    wrapped, wrapped_out = pipeline_loop(pair, wrapped_scheduler, STEPS)
    assert torch.equal(plain, wrapped)
    assert [type(o) for o in plain_out] == [type(o) for o in wrapped_out]
    as_tuple, tuple_out = pipeline_loop(pair, wrapped_scheduler, STEPS, return_dict=False)
    assert torch.equal(plain, as_tuple) and all(isinstance(o, tuple) for o in tuple_out)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_wrapper_applies_the_same_correction_as_the_sampling_loop(name):
    pair = pair_for(name)
    est = estimator_for(pair, name, variance=np.linspace(1e-3, 1e-4, STEPS))
    reference_scheduler = prepared_scheduler(pair, name, STEPS)
    x, cond = initial_noise(pair, reference_scheduler, 16, 0)
    corrector = est.corrector(reference_scheduler, device=x.device, dtype=x.dtype)
    with torch.no_grad():
        expected = run_sampler(pair.q, reference_scheduler, x, cond, corrector, generator=step_generator(0))
        uncorrected = run_sampler(pair.q, prepared_scheduler(pair, name, STEPS), x, cond, generator=step_generator(0))
        got, _ = pipeline_loop(pair, QDriftScheduler(make_scheduler(name, pair.scheduler_config), est), STEPS)
    assert torch.equal(got, expected)
    assert not torch.equal(got, uncorrected)


def test_output_decomposition_is_applied_before_the_step():
    pair = pair_for("euler")
    k, mu = np.full(STEPS, -0.05), np.full(STEPS, 0.01)
    est = estimator_for(pair, "euler", variance=1e-3, k=k, mu=mu)
    reference_scheduler = prepared_scheduler(pair, "euler", STEPS)
    x, cond = initial_noise(pair, reference_scheduler, 16, 0)
    grid = step_grid(reference_scheduler)
    corrector = Corrector(grid, est.coefficients(grid), x.device, x.dtype, k=k, mu=mu)
    with torch.no_grad():
        expected = run_sampler(pair.q, reference_scheduler, x, cond, corrector)
        plain_decomposition = run_sampler(
            pair.q,
            prepared_scheduler(pair, "euler", STEPS),
            x,
            cond,
            Corrector(grid, est.coefficients(grid), x.device, x.dtype),
        )
        got, _ = pipeline_loop(pair, QDriftScheduler(make_scheduler("euler", pair.scheduler_config), est), STEPS)
    assert torch.equal(got, expected) and not torch.equal(got, plain_decomposition)


def test_diffusers_interface_passes_through():
    pair = pair_for("euler")
    inner = make_scheduler("euler", pair.scheduler_config)
    wrapped = QDriftScheduler(inner, estimator_for(pair, "euler"))
    assert wrapped.config is inner.config and wrapped.order == inner.order and len(wrapped) == len(inner)
    # pipelines inspect these signatures to decide which keyword arguments to pass
    assert inspect.signature(wrapped.step) == inspect.signature(inner.step)
    assert inspect.signature(wrapped.set_timesteps) == inspect.signature(inner.set_timesteps)
    assert "sigmas" in inspect.signature(wrapped.set_timesteps).parameters
    wrapped.set_timesteps(STEPS)
    assert torch.equal(wrapped.timesteps, inner.timesteps) and wrapped.init_noise_sigma == inner.init_noise_sigma
    x = torch.ones(2, 8)
    assert torch.equal(
        wrapped.scale_model_input(x, wrapped.timesteps[0]), inner.scale_model_input(x, inner.timesteps[0])
    )
    wrapped.some_pipeline_flag = 3  # pipelines set attributes on their scheduler: they land on the wrapped one
    assert inner.some_pipeline_flag == 3
    flow = QDriftScheduler(
        make_scheduler("flow-euler", pair_for("flow-euler").scheduler_config),
        estimator_for(pair_for("flow-euler"), "flow-euler"),
    )
    assert not hasattr(flow, "scale_model_input")  # as the plain flow-matching scheduler


def test_set_begin_index_starts_the_correction_at_that_step():
    pair, begin = pair_for("euler"), 4
    est = estimator_for(pair, "euler", variance=np.linspace(1e-3, 1e-4, STEPS))
    wrapped = QDriftScheduler(make_scheduler("euler", pair.scheduler_config), est)
    plain = make_scheduler("euler", pair.scheduler_config)
    corrector = None
    results = []
    for scheduler in (wrapped, plain):
        scheduler.set_timesteps(STEPS)
        scheduler.set_begin_index(begin)
        if scheduler is plain:
            corrector = est.corrector(plain, dtype=torch.float32)
        x, cond = initial_noise(pair, scheduler, 8, 1)
        for i, t in enumerate(scheduler.timesteps[begin:], start=begin):
            out = pair.q(scheduler.scale_model_input(x, t), t, **cond)
            x_next = scheduler.step(out, t, x).prev_sample
            x = corrector(i, x, out, x_next) if corrector is not None else x_next
        results.append(x)
    assert torch.equal(results[0], results[1])


def test_misuse_gets_one_line_errors():
    pair = pair_for("euler")
    est = estimator_for(pair, "euler")
    wrapped = QDriftScheduler(make_scheduler("euler", pair.scheduler_config), est)
    with pytest.raises(QDriftError, match="before set_timesteps"):
        wrapped.step(torch.zeros(1, 8), 0, torch.zeros(1, 8))
    with pytest.raises(QDriftError, match="already a QDriftScheduler"):
        QDriftScheduler(wrapped, est)
    with pytest.raises(QDriftError, match="unknown correction form"):
        QDriftScheduler(make_scheduler("euler", pair.scheduler_config), est, correction="sharpen")
    from diffusers import KDPM2DiscreteScheduler

    with pytest.raises(QDriftError, match="unsupported scheduler class KDPM2DiscreteScheduler"):
        QDriftScheduler(KDPM2DiscreteScheduler(), est)


def test_estimator_for_another_grid_scheduler_or_config_is_refused_in_one_line():
    pair = pair_for("euler")
    est = estimator_for(pair, "euler")
    wrapped = QDriftScheduler(make_scheduler("euler", pair.scheduler_config), est)
    with pytest.raises(
        QDriftError, match=r"fitted for euler with 10 steps, this sampler runs euler with 12 steps"
    ) as err:
        wrapped.set_timesteps(12)
    assert "\n" not in str(err.value)
    with pytest.raises(QDriftError, match="fitted for scheduler euler, not ddim"):
        QDriftScheduler(make_scheduler("ddim", pair.scheduler_config), est)

    class PatchedEuler(EulerDiscreteScheduler):
        pass

    with pytest.raises(QDriftError, match="calibrated with EulerDiscreteScheduler, not PatchedEuler"):
        QDriftScheduler(PatchedEuler.from_config(make_scheduler("euler", pair.scheduler_config).config), est)
    other = make_scheduler("euler", {**pair.scheduler_config, "timestep_spacing": "trailing"})
    with pytest.raises(
        QDriftError, match="timestep_spacing='linspace', this scheduler has timestep_spacing='trailing'"
    ):
        QDriftScheduler(other, est)
    smooth = estimator_for(pair, "euler")
    smooth.metadata["estimator"]["smooth"] = True
    v_prediction = make_scheduler("euler", {**pair.scheduler_config, "prediction_type": "v_prediction"})
    with pytest.raises(
        QDriftError, match="prediction_type='epsilon', this scheduler has prediction_type='v_prediction'"
    ):
        QDriftScheduler(v_prediction, smooth)  # never interpolated: the model output means something else


def test_smooth_estimator_is_interpolated_to_another_grid_and_says_so(caplog):
    pair = pair_for("euler")
    est = estimator_for(pair, "euler", variance=np.linspace(1e-3, 1e-4, STEPS), k=np.full(STEPS, 0.02))
    est.metadata["estimator"]["smooth"] = True
    wrapped = QDriftScheduler(make_scheduler("euler", {**pair.scheduler_config, "timestep_spacing": "trailing"}), est)
    with caplog.at_level(logging.WARNING, logger="qdrift_stats.correct.estimator_file"):
        wrapped.set_timesteps(16)
    assert any("interpolated from 10 to 16 steps" in n for n in wrapped.notes)
    assert any("config differs in timestep_spacing" in n for n in wrapped.notes)
    assert "interpolated" in caplog.text
    x, _ = pipeline_loop(pair, wrapped, 16)
    assert torch.isfinite(x).all() and wrapped.corrector.grid.num_steps == 16


def test_model_and_recipe_identifiers_are_checked_when_given():
    pair = pair_for("euler")
    est = estimator_for(pair, "euler")
    est.metadata["provenance"].update(model="digits-unet@abc123", recipe="w4a8")
    QDriftScheduler(make_scheduler("euler", pair.scheduler_config), est, model="digits-unet@abc123", recipe="w4a8")
    with pytest.raises(QDriftError, match="calibrated for recipe 'w4a8', not 'w4a4'"):
        QDriftScheduler(make_scheduler("euler", pair.scheduler_config), est, recipe="w4a4")
    with pytest.raises(QDriftError, match="calibrated for model"):
        QDriftScheduler(make_scheduler("euler", pair.scheduler_config), est, model="other")
    bare = estimator_for(pair, "euler")
    QDriftScheduler(make_scheduler("euler", pair.scheduler_config), bare, recipe="w4a4")
    assert any("records no recipe identifier" in n for n in bare.notes)


def test_save_pretrained_round_trip_keeps_scheduler_estimator_and_options(tmp_path):
    pair = pair_for("dpmpp-2m")
    est = estimator_for(pair, "dpmpp-2m", variance=np.linspace(1e-3, 1e-4, STEPS))
    wrapped = QDriftScheduler(
        make_scheduler("dpmpp-2m", pair.scheduler_config), est, correction="shrink", strength=0.5, recipe="w4a8"
    )
    wrapped.save_pretrained(tmp_path / "scheduler")
    files = sorted(p.name for p in (tmp_path / "scheduler").iterdir())
    expected = ["scheduler_config.json", ESTIMATOR_FILE_NAME, WRAPPER_CONFIG_NAME]
    if diffusers_needs_module_file():  # diffusers >= 0.42: the module file a fresh interpreter loads (test_safety)
        expected.append("qdrift_stats.correct.diffusers.py")
    assert files == sorted(expected)
    options = json.loads((tmp_path / "scheduler" / WRAPPER_CONFIG_NAME).read_text())
    assert options["format"] == "qdrift-scheduler" and options["correction"] == "shrink" and options["strength"] == 0.5
    loaded = QDriftScheduler.from_pretrained(tmp_path / "scheduler")
    public = lambda config: {k: v for k, v in dict(config).items() if not k.startswith("_")}  # noqa: E731
    assert type(loaded.scheduler) is type(wrapped.scheduler) and public(loaded.config) == public(wrapped.config)
    np.testing.assert_array_equal(loaded.estimator.variance, est.variance)
    assert (loaded.correction, loaded.strength, loaded.recipe) == ("shrink", 0.5, "w4a8")
    a, _ = pipeline_loop(pair, wrapped, STEPS)
    b, _ = pipeline_loop(pair, loaded, STEPS)
    assert torch.equal(a, b)
    # the folder still loads as the plain diffusers scheduler
    from diffusers import DPMSolverMultistepScheduler

    DPMSolverMultistepScheduler.from_pretrained(tmp_path / "scheduler")
    with pytest.raises(QDriftError, match="not a saved QDriftScheduler"):
        QDriftScheduler.from_pretrained(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["euler", "ddim", "flow-euler"])
def test_half_precision_states_are_corrected_in_their_own_dtype(name, dtype):
    """Each step of an fp32 trajectory, repeated in half precision: same result to the dtype's precision."""
    pair = pair_for(name)
    est = estimator_for(pair, name, variance=np.linspace(1e-2, 1e-3, STEPS))
    # shrink: a pull coefficient in [0, 1) (drift's can reach 1e3 where b_next is tiny, amplifying rounding)
    full, half, plain_half = (
        QDriftScheduler(make_scheduler(name, pair.scheduler_config), est, correction="shrink"),
        QDriftScheduler(make_scheduler(name, pair.scheduler_config), est, correction="shrink"),
        make_scheduler(name, pair.scheduler_config),
    )
    for scheduler in (full, half, plain_half):
        scheduler.set_timesteps(STEPS)
    x, cond = initial_noise(pair, full, 16, 0)
    eps, corrected_steps = torch.finfo(dtype).eps, 0
    for t in full.timesteps:
        for scheduler in (half, plain_half):
            if hasattr(scheduler, "scale_model_input"):
                scheduler.scale_model_input(x, t)  # keeps diffusers' bookkeeping as in a pipeline
        out = pair.q(full.scale_model_input(x, t) if hasattr(full, "scale_model_input") else x, t, **cond)
        extra = step_kwargs(full.scheduler)
        x_next = full.step(out, t, x, **extra).prev_sample
        got = half.step(out.to(dtype), t, x.to(dtype), **extra).prev_sample
        uncorrected = plain_half.step(out.to(dtype), t, x.to(dtype), **extra).prev_sample
        assert got.dtype == dtype and got.device == x.device
        torch.testing.assert_close(got.float(), x_next, atol=8 * eps * float(x_next.abs().max()), rtol=8 * eps)
        corrected_steps += not torch.equal(got, uncorrected)
        x = x_next
    # a pull much smaller than the dtype's resolution rounds away (bf16 at Euler's large sigmas): some steps
    assert corrected_steps > 0


class HostSyncCounter(TorchDispatchMode):
    """Counts the aten ops that read a tensor value on the host or copy a tensor."""

    WATCHED = {"_local_scalar_dense", "_to_copy", "copy_", "item"}

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.WATCHED:
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["euler", "dpmpp-2m", "flow-euler"])
def test_the_correction_adds_no_host_sync_and_no_copy_to_a_step(name):
    pair = pair_for(name)
    est = estimator_for(
        pair, name, variance=np.linspace(1e-3, 1e-4, STEPS), k=np.full(STEPS, 0.01), mu=np.full(STEPS, 0.001)
    )
    counts = {}
    for label, scheduler in (
        ("plain", make_scheduler(name, pair.scheduler_config)),
        ("wrapped", QDriftScheduler(make_scheduler(name, pair.scheduler_config), est)),
    ):
        scheduler.set_timesteps(STEPS)
        x, cond = initial_noise(pair, scheduler, 8, 0)
        per_step = []
        for t in scheduler.timesteps[:4]:
            out = pair.q(scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x, t, **cond)
            with HostSyncCounter() as counter:
                x = scheduler.step(out, t, x).prev_sample
            per_step.append(counter.counts)
        counts[label] = per_step
    assert counts["wrapped"] == counts["plain"]  # whatever diffusers' own step does, the correction adds nothing


@pytest.mark.slow
def test_the_correction_compiles_without_graph_breaks_and_the_wrapped_step_compiles():
    pair = pair_for("flow-euler")
    est = estimator_for(pair, "flow-euler", variance=np.linspace(1e-3, 1e-4, 4), steps=4)
    wrapped = QDriftScheduler(make_scheduler("flow-euler", pair.scheduler_config), est)
    wrapped.set_timesteps(4)
    corrector = wrapped.corrector
    x, out, x_next = torch.randn(3, 8, 8, 8), torch.randn(3, 8, 8, 8), torch.randn(3, 8, 8, 8)
    compiled_math = torch.compile(lambda x, out, x_next: corrector(1, x, out, x_next), fullgraph=True)
    torch.testing.assert_close(compiled_math(x, out, x_next), corrector(1, x, out, x_next))

    eager = QDriftScheduler(make_scheduler("flow-euler", pair.scheduler_config), est)
    eager.set_timesteps(4)
    compiled_step = torch.compile(wrapped.step)
    wrapped.set_timesteps(4)
    xa, cond = initial_noise(pair, eager, 8, 0)
    xb = xa.clone()
    for t in eager.timesteps:
        xa = eager.step(pair.q(xa, t, **cond), t, xa).prev_sample
        xb = compiled_step(pair.q(xb, t, **cond), t, xb).prev_sample
    torch.testing.assert_close(xb, xa)
