"""Shared fixtures: small testbed pairs and recorded stores."""

from __future__ import annotations

import pytest

from qdrift_stats import testbed
from qdrift_stats.record.lockstep import record

VP_PAIR = "qdrift_stats.testbed:mixture_vp_noise"
FLOW_PAIR = "qdrift_stats.testbed:mixture_flow_noise"
PAIR_FOR = {"euler": VP_PAIR, "ddim": VP_PAIR, "dpmpp-2m": VP_PAIR, "flow-euler": FLOW_PAIR, "flow-dpmpp-2m": FLOW_PAIR}
PAIR_FOR.update(
    {name: VP_PAIR for name in ("euler-ancestral", "ddpm", "lcm", "unipc", "deis", "dpmpp-2m-sde", "heun", "pndm")}
)


def pair_for(scheduler: str):
    return testbed.mixture_vp_noise() if PAIR_FOR[scheduler] == VP_PAIR else testbed.mixture_flow_noise()


@pytest.fixture
def vp_pair():
    return testbed.mixture_vp_noise()


@pytest.fixture
def small_store(tmp_path, vp_pair):
    """A 3-run, 8-step Euler store of the VP noise pair."""
    path = tmp_path / "calib.zarr"
    record(vp_pair, path, pair_name=VP_PAIR, scheduler_name="euler", steps=8, runs=3, batch_size=16, seed=0)
    return path


def testbed_store(tmp_path, family: str, scheduler: str, steps: int, runs: int, batch_size: int):
    """``(pair, path)``: a store recorded from the testbed pair ``family`` (seed 0) under ``tmp_path``."""
    pair = getattr(testbed, family)()
    path = record(
        pair,
        tmp_path / f"{family}.zarr",
        pair_name=f"qdrift_stats.testbed:{family}",
        scheduler_name=scheduler,
        steps=steps,
        runs=runs,
        batch_size=batch_size,
        seed=0,
    )
    return pair, path
