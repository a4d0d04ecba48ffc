import inspect

import numpy as np
import pytest
import torch

from qdrift_stats.correct.estimator_file import EstimatorFile
from qdrift_stats.correct.sample import sample
from qdrift_stats.loop import prepared_scheduler
from qdrift_stats.schedulers.base import SCHEDULER_NAMES, make_scheduler

from .conftest import pair_for


def plain_diffusers_sampling(pair, name, steps, batch, seed):
    """The loop a diffusers pipeline runs, written out independently of the library."""
    sched = make_scheduler(name, pair.scheduler_config)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *pair.sample_shape), generator=g)
    if hasattr(sched, "init_noise_sigma"):
        x = x * sched.init_noise_sigma
    extra = {"eta": 0.0} if name == "ddim" else {}
    if "generator" in inspect.signature(sched.step).parameters:  # stochastic: the step noise of the seed
        extra["generator"] = torch.Generator().manual_seed(seed + 0x5EED)
    for t in sched.timesteps:
        model_input = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        x = sched.step(pair.q(model_input, t), t, x, **extra).prev_sample
    return x.numpy()


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_strength_zero_and_zero_statistic_reproduce_plain_diffusers_bit_for_bit(name):
    pair = pair_for(name)
    steps, batch, seed = 12, 32, 3
    expected = plain_diffusers_sampling(pair, name, steps, batch, seed)
    plain = sample(pair, name, steps, batch, batch, seed, model="q")
    zero = EstimatorFile.zeros_like_grid(prepared_scheduler(pair, name, steps))
    positive = EstimatorFile.zeros_like_grid(prepared_scheduler(pair, name, steps))
    positive.tensors["variance"] = np.full(steps, 1e-3)
    with_zero_statistic = sample(pair, name, steps, batch, batch, seed, model="q", estimator=zero)
    with_zero_strength = sample(pair, name, steps, batch, batch, seed, model="q", estimator=positive, strength=0.0)
    corrected = sample(pair, name, steps, batch, batch, seed, model="q", estimator=positive)
    for got in (plain, with_zero_statistic, with_zero_strength):
        assert np.array_equal(got, expected)
    assert not np.array_equal(corrected, expected)


def test_same_seed_same_samples_and_batches_use_consecutive_seeds(vp_pair):
    a = sample(vp_pair, "ddim", 5, 10, 4, seed=7, model="fp")
    b = sample(vp_pair, "ddim", 5, 10, 4, seed=7, model="fp")
    assert a.shape == (10, 8) and a.dtype == np.float32
    assert np.array_equal(a, b)
    second_batch = sample(vp_pair, "ddim", 5, 4, 4, seed=8, model="fp")
    assert np.array_equal(a[4:8], second_batch)


def test_the_correction_makes_no_extra_model_call(vp_pair):
    calls = {"n": 0}
    original = vp_pair.q

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    vp_pair.q = counting
    est = EstimatorFile.zeros_like_grid(prepared_scheduler(vp_pair, "euler", 9))
    est.tensors["variance"] = np.full(9, 0.01)
    sample(vp_pair, "euler", 9, 8, 8, 0, model="q")
    plain_calls = calls["n"]
    sample(vp_pair, "euler", 9, 8, 8, 0, model="q", estimator=est)
    assert plain_calls == 9 and calls["n"] == 2 * plain_calls


def test_per_channel_statistic_and_decomposition_run(vp_pair):
    steps = 6
    est = EstimatorFile.zeros_like_grid(prepared_scheduler(vp_pair, "euler", steps))
    est.tensors["variance"] = np.full((steps, 8), 0.01)
    est.tensors["k"] = np.full(steps, -0.05)
    est.tensors["mu"] = np.zeros(steps)
    out = sample(vp_pair, "euler", steps, 8, 8, 0, model="q", estimator=est)
    assert out.shape == (8, 8) and np.all(np.isfinite(out))
