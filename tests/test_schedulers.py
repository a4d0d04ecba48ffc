import numpy as np
import pytest
import torch

from qdrift_stats.errors import QDriftError
from qdrift_stats.schedulers import adapter_for
from qdrift_stats.schedulers.base import SCHEDULER_NAMES, make_scheduler, step_calls, step_grid, x0_from_output
from qdrift_stats.schedulers.noise import capture_step_noise
from qdrift_stats.testbed import FLOW_SCHEDULER_CONFIG, VP_SCHEDULER_CONFIG

from .conftest import PAIR_FOR, VP_PAIR


def config_for(name):
    return VP_SCHEDULER_CONFIG if PAIR_FOR[name] == VP_PAIR else FLOW_SCHEDULER_CONFIG


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("steps", [1, 7, 25])
def test_step_grid_has_one_level_per_step_and_ends_clean(name, steps):
    sched = make_scheduler(name, config_for(name))
    sched.set_timesteps(steps)
    grid = step_grid(sched)
    assert grid.num_steps == steps == len(step_calls(sched))
    # one timestep entry per model call: Heun calls twice per step except on its last (Euler) step, PLMS
    # twice on its first step only
    calls = {"heun": 2 * steps - 1, "pndm": steps + 1 if steps > 1 else 1}.get(name, steps)
    assert len(sched.timesteps) == calls
    for arr in (grid.a, grid.b, grid.a_next, grid.b_next):
        assert arr.shape == (steps,) and np.all(np.isfinite(arr))
    # levels decrease monotonically in noise and the last step lands on the clean sample
    assert np.all(np.diff(np.concatenate([grid.b, grid.b_next[-1:]])) <= 1e-12)
    if name in ("deis", "pndm"):  # diffusers' DEIS and PNDM end on the t = 0 training level, not on the clean sample
        assert 0.0 < grid.b_next[-1] < 0.02
    else:
        assert grid.b_next[-1] == 0.0
    assert np.allclose(grid.b[1:], grid.b_next[:-1]) and np.allclose(grid.a[1:], grid.a_next[:-1])


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_one_step_solver_moves_along_its_own_coordinates(name):
    """With the exact output for a state a x0 + b eps, one scheduler step lands on a' x0 + b' eps."""
    sched = make_scheduler(name, config_for(name))
    sched.set_timesteps(10)
    grid = step_grid(sched)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, generator=g, dtype=torch.float64)
    x = grid.a[0] * x0 + grid.b[0] * eps
    t = sched.timesteps[0]
    if name.startswith("flow"):
        out = eps - x0
    else:
        out = eps
    adapter = adapter_for(sched)
    with capture_step_noise(sched) as drawn:
        x_next = sched.step(out, t, x, return_dict=False)[0]
    if adapter.stochastic:  # ancestral / SDE / LCM: the deterministic part keeps b_next^2 - s^2 of eps, s z is fresh
        s = float(adapter.noise_std(grid)[0])
        b_det = (grid.b_next[0] ** 2 - s**2) ** 0.5
        expected = grid.a_next[0] * x0 + b_det * eps + s * drawn.noise.double()
        tolerance = 1e-4  # diffusers computes sigma_up / the posterior variance from float32 tables
    else:
        expected = grid.a_next[0] * x0 + grid.b_next[0] * eps
        tolerance = 1e-6
    torch.testing.assert_close(x_next, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample", "flow_prediction"])
def test_x0_from_output_inverts_each_prediction_type(prediction):
    g = torch.Generator().manual_seed(1)
    x0, eps = (
        torch.randn(2, 5, 5, generator=g, dtype=torch.float64),
        torch.randn(2, 5, 5, generator=g, dtype=torch.float64),
    )
    if prediction == "flow_prediction":
        a, b = 0.3, 0.7
        out = eps - x0
    else:
        a, b = 1.0, 2.5  # Euler coordinates: the model sees x / sqrt(a^2 + b^2)
        r = (a * a + b * b) ** 0.5
        alpha, sigma = a / r, b / r
        out = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}[prediction]
    x = a * x0 + b * eps
    torch.testing.assert_close(x0_from_output(prediction, a, b, x, out), x0)


def test_unknown_scheduler_is_refused_with_the_choices():
    with pytest.raises(QDriftError, match="unknown scheduler 'kdpm2'.*euler"):
        make_scheduler("kdpm2", VP_SCHEDULER_CONFIG)


@pytest.mark.parametrize("name,config", [("euler", FLOW_SCHEDULER_CONFIG), ("flow-euler", VP_SCHEDULER_CONFIG)])
def test_scheduler_of_the_wrong_kind_for_the_pair_is_refused(name, config):
    with pytest.raises(QDriftError, match="needs a"):
        make_scheduler(name, config)


def test_registry_round_trips_every_name_and_declares_the_flags():
    from qdrift_stats.schedulers import SCHEDULER_NAMES, adapter_for, get_adapter

    assert SCHEDULER_NAMES[:3] == ("euler", "ddim", "dpmpp-2m") and SCHEDULER_NAMES[-2:] == (
        "flow-euler",
        "flow-dpmpp-2m",
    )
    for name in SCHEDULER_NAMES:
        adapter = get_adapter(name)
        scheduler = make_scheduler(name, config_for(name))
        assert adapter_for(scheduler) is adapter and adapter.name == name
        assert adapter.flow == name.startswith("flow")
    assert [n for n in SCHEDULER_NAMES if get_adapter(n).multistep] == [
        "dpmpp-2m",
        "unipc",
        "deis",
        "dpmpp-2m-sde",
        "pndm",
        "flow-dpmpp-2m",
    ]
    assert [n for n in SCHEDULER_NAMES if get_adapter(n).stochastic] == [
        "euler-ancestral",
        "ddpm",
        "lcm",
        "dpmpp-2m-sde",
    ]
    assert get_adapter("ddim").step_kwargs(make_scheduler("ddim", VP_SCHEDULER_CONFIG)) == {"eta": 0.0}


def test_a_new_scheduler_is_one_registered_adapter():
    """A new adapter class, registered, is reachable by name everywhere (here: Euler with trailing spacing)."""
    import numpy as np
    from diffusers import EulerDiscreteScheduler

    from qdrift_stats.schedulers import adapter_for, output_gains, register, unregister
    from qdrift_stats.schedulers.euler import EulerAdapter

    class TrailingEuler(EulerDiscreteScheduler):
        pass

    @register
    class TrailingEulerAdapter(EulerAdapter):
        name = "euler-trailing"
        diffusers_classes = (TrailingEuler,)

        def build(self, config):
            return TrailingEuler.from_config({**config, "timestep_spacing": "trailing"})

    try:
        from qdrift_stats import schedulers

        assert "euler-trailing" in schedulers.SCHEDULER_NAMES  # the registry, read now
        sched = make_scheduler("euler-trailing", VP_SCHEDULER_CONFIG)
        assert adapter_for(sched).name == "euler-trailing"  # the exact class wins over the Euler subclass match
        assert adapter_for(make_scheduler("euler", VP_SCHEDULER_CONFIG)).name == "euler"
        sched.set_timesteps(5)
        grid = step_grid(sched)
        assert grid.name == "euler-trailing"
        sigmas = sched.sigmas.double().numpy()
        np.testing.assert_allclose(
            output_gains("euler-trailing", VP_SCHEDULER_CONFIG, 5), sigmas[1:] - sigmas[:-1], rtol=1e-12
        )
    finally:
        unregister("euler-trailing")
    with pytest.raises(QDriftError, match="unknown scheduler 'euler-trailing'"):
        make_scheduler("euler-trailing", VP_SCHEDULER_CONFIG)
