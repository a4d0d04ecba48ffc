"""Named quantized pairs of the digits zoo, and the shipped models' recorded FP distance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")
pytest.importorskip("optimum.quanto")
pytest.importorskip("torchao")

from qdrift_stats import zoo  # noqa: E402
from qdrift_stats.errors import QDriftError  # noqa: E402
from qdrift_stats.pair import load_pair  # noqa: E402
from qdrift_stats.quantize import RECIPES  # noqa: E402
from qdrift_stats.zoo.named import (  # noqa: E402
    NAMED_PAIRS,
    ZOO_RECIPES,
    build_quantized_digits_model,
    named_pair,
    pair_name,
)

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "zoo_fp_reference.json"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs(pair, batch: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *pair.sample_shape), generator=gen)
    return x, pair.conditions(batch, gen)


def test_every_model_and_recipe_has_a_named_factory():
    assert set(ZOO_RECIPES) == set(RECIPES)
    assert len(NAMED_PAIRS) == 2 * len(RECIPES)
    for name, (kind, recipe) in NAMED_PAIRS.items():
        assert name == pair_name(kind, recipe) and name.isidentifier()
        assert callable(getattr(zoo, name)), name
        assert getattr(zoo, name).__name__ == name


@pytest.mark.parametrize(
    "spec, timestep",
    [
        ("qdrift_stats.zoo:digits_unet_w4a4", 500),
        ("qdrift_stats.zoo:digits_dit_w8a8", 500.0),
    ],
)
def test_named_pair_follows_the_protocol_and_q_differs_from_fp(spec, timestep):
    pair = load_pair(spec)  # runs the protocol check
    assert pair.name == spec.split(":")[1]
    assert pair.sample_shape == (1, 8, 8)
    assert "num_train_timesteps" in pair.scheduler_config
    x, cond = _inputs(pair)
    t = torch.tensor(timestep)
    out_fp, out_q = pair.fp(x, t, **cond), pair.q(x, t, **cond)
    assert out_fp.shape == out_q.shape == x.shape
    assert torch.isfinite(out_q).all()
    rel = float((out_q - out_fp).norm() / out_fp.norm())
    assert 1e-3 < rel < 0.5  # quantized, and still the same network


def test_quantized_model_is_cached_per_process_and_fp_is_untouched():
    a, b = named_pair("digits_dit_w4a4"), zoo.digits_dit_w4a4()
    assert a.q_model is b.q_model  # quantized once
    assert a.fp_model is not b.fp_model  # the FP model is loaded afresh
    fresh = zoo.load_digits_dit()
    for (name, p), (_, p_fresh) in zip(a.fp_model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, p_fresh), name


@pytest.mark.parametrize("kind, recipe", [("unet", "w4a4"), ("dit", "w8a8")])
def test_quantization_is_deterministic(kind, recipe):
    pair = zoo.digits_pair(kind)
    x, cond = _inputs(pair, seed=1)
    t = torch.tensor(300.0)
    outs = [pair.guided(build_quantized_digits_model(kind, recipe), x, t, **cond) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])


def test_unknown_named_pair_is_a_user_error():
    with pytest.raises(QDriftError, match="unknown digits pair"):
        named_pair("digits_unet_w2a2")


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_shipped_models_reproduce_their_fp_distance(kind):
    """A fresh load of the shipped weights reproduces the FP distance recorded by the replication study.

    A regression pin, not an independently derived value: ``data/zoo_fp_reference.json`` holds the
    distance that ``python studies/replication_table.py fp-reference`` measured when the weights were
    shipped, with an interval of +-1.96 sd of the same distance over 8 other seeds. The test catches a
    change in the weights, the sampler or the metric that moves the FP samples by more than seed noise;
    it says nothing about whether the distance itself is right (the metrics have their own tests).
    """
    from qdrift_stats.correct.sample import sample
    from qdrift_stats.metrics import frechet_distance

    recorded = json.loads(REFERENCE.read_text())["models"][kind]
    s = recorded["setting"]
    pair = zoo.digits_pair(kind, guidance_scale=s["guidance_scale"])
    images = sample(pair, s["scheduler"], s["steps"], s["num_samples"], s["batch_size"], s["seed"], model="fp")
    fd = frechet_distance(zoo.load_digits_tensors("test")[0], images)
    assert recorded["ci_low"] <= fd <= recorded["ci_high"], (fd, recorded)
