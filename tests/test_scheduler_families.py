"""The scheduler adapters beyond Euler / DDIM / DPM-Solver++ 2M: multistep (UniPC, DEIS) and stochastic
(Euler-ancestral, DDPM, LCM, SDE DPM-Solver++ 2M), each through the whole pipeline chain, plus the
noise they inject pinned against diffusers' own steps and the marginal-preserving split pinned
against its formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from qdrift_stats.correct.coefficients import stochastic_split
from qdrift_stats.correct.diffusers import QDriftScheduler
from qdrift_stats.errors import QDriftError
from qdrift_stats.schedulers import adapter_for, scheduler_name, step_grid
from qdrift_stats.schedulers.noise import capture_step_noise
from tests import tiny_pipelines as tiny
from tests.test_pipeline_families import _quiet_diffusers, chain  # noqa: F401  (autouse fixture)

BETAS = tiny.SD_BETAS
SCHEDULERS = {
    "unipc": lambda: UniPCMultistepScheduler(**BETAS),
    "deis": lambda: DEISMultistepScheduler(**BETAS),
    "euler-ancestral": lambda: EulerAncestralDiscreteScheduler(**BETAS),
    "ddpm": lambda: DDPMScheduler(**BETAS, clip_sample=False),
    "lcm": lambda: LCMScheduler(**BETAS, clip_sample=False),
    "dpmpp-2m-sde": lambda: DPMSolverMultistepScheduler(**BETAS, algorithm_type="sde-dpmsolver++"),
    "heun": lambda: HeunDiscreteScheduler(**BETAS),
    "pndm": lambda: PNDMScheduler(**BETAS, skip_prk_steps=True),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_chain_through_a_pipeline(name, tmp_path):
    fp = tiny.sd_with(SCHEDULERS[name]())
    q = tiny.twin(fp)
    ds, est, _, _ = chain(fp, q, tiny.sd_call(), tmp_path)
    assert ds.attrs["scheduler"] == name == est.scheduler_name
    assert scheduler_name(fp.scheduler) == name


def test_sde_dpmsolver_is_named_as_such_and_other_algorithms_are_refused():
    sde = DPMSolverMultistepScheduler(**BETAS, algorithm_type="sde-dpmsolver++")
    assert scheduler_name(sde) == "dpmpp-2m-sde"
    assert scheduler_name(DPMSolverMultistepScheduler(**BETAS)) == "dpmpp-2m"
    with pytest.raises(QDriftError, match="unsupported scheduler class DPMSolverMultistepScheduler"):
        scheduler_name(DPMSolverMultistepScheduler(**BETAS, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"))
    with pytest.raises(QDriftError, match="unsupported scheduler class KDPM2DiscreteScheduler"):
        QDriftScheduler(KDPM2DiscreteScheduler(**BETAS), "unused.safetensors")


# ---- the injected noise, against diffusers' own step ---------------------------------------------------


@pytest.mark.parametrize("name", ["euler-ancestral", "ddpm", "lcm", "dpmpp-2m-sde"])
def test_the_adapters_noise_std_is_what_the_step_injects(name):
    """Two steps from the same state and output with different seeds differ by s_i (z1 - z2) exactly."""
    make = SCHEDULERS[name]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = make()
    reference.set_timesteps(5)
    s = adapter_for(reference).noise_std(step_grid(reference))
    for i in range(5):
        results = []
        for seed in (10, 11):
            sched = make()
            sched.set_timesteps(5)
            for j, t in enumerate(sched.timesteps[: i + 1]):  # the same history, then step i
                with capture_step_noise(sched) as drawn:
                    nxt = sched.step(out, t, x, generator=torch.Generator().manual_seed(seed + 100 * j)).prev_sample
            results.append((nxt, drawn.noise))
        (x1, z1), (x2, z2) = results
        if s[i] == 0:
            torch.testing.assert_close(x1, x2, rtol=0, atol=1e-10)
        else:
            torch.testing.assert_close(
                x1 - x2, s[i] * (z1 - z2).double(), rtol=1e-4, atol=1e-6
            )  # float32 sigmas inside


def test_the_stochastic_split_keeps_the_total_added_variance():
    v = np.array([0.0, 0.01, 0.04, 0.09, 0.2])
    s = np.array([0.0, 0.2, 0.2, 0.2, 0.2])
    remaining, factor = stochastic_split(v, s, strength=1.0)
    kept = s - factor  # the std of the injected noise left
    # noise left + quantization variance - what the pull removes = the FP step's injected variance
    np.testing.assert_allclose((kept**2 + v - remaining)[1:], s[1:] ** 2, rtol=1e-12)
    np.testing.assert_allclose(remaining, [0.0, 0.0, 0.0, 0.05, 0.16], atol=1e-15)
    np.testing.assert_allclose(kept, [0.0, np.sqrt(0.03), 0.0, 0.0, 0.0], atol=1e-7)
    assert factor[0] == 0.0  # deterministic step: nothing to lower
    remaining2, _ = stochastic_split(v, s, strength=2.0)
    np.testing.assert_allclose(remaining2, np.maximum(2 * v - s**2, 0), atol=1e-15)
    zero_r, zero_f = stochastic_split(np.zeros(5), s)
    assert not zero_r.any() and not zero_f.any()
    per_channel_r, per_channel_f = stochastic_split(np.array([[0.01, 0.09]]), np.array([0.2]))
    np.testing.assert_allclose(per_channel_r, [[0.0, 0.05]], atol=1e-15)
    np.testing.assert_allclose(0.2 - per_channel_f, [[np.sqrt(0.03), 0.0]], atol=1e-7)
