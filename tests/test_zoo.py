"""The digits zoo: shipped models load, pairs follow the protocol, CFG is right, samples are digits."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

from qdrift_stats.errors import QDriftError  # noqa: E402
from qdrift_stats.pair import ModelPair, check_pair, load_pair, pair_conditions  # noqa: E402
from qdrift_stats.zoo import (  # noqa: E402
    NULL_CLASS,
    DiffusersPair,
    calibration_inputs,
    digits_dit_fp,
    digits_unet_fp,
    load_digits_dit,
    load_digits_tensors,
    load_digits_unet,
    sample_pair,
    scheduler_config,
)

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def unet_pair():
    return digits_unet_fp()


@pytest.fixture(scope="module")
def dit_pair():
    return digits_dit_fp()


@pytest.fixture(params=["unet", "dit"])
def pair(request, unet_pair, dit_pair):
    return unet_pair if request.param == "unet" else dit_pair


def test_digits_data_split_and_range():
    x_tr, y_tr = load_digits_tensors("train")
    x_te, y_te = load_digits_tensors("test")
    assert x_tr.shape == (1437, 1, 8, 8) and x_te.shape == (360, 1, 8, 8)
    assert x_tr.min() == -1.0 and x_tr.max() == 1.0
    assert set(y_te.tolist()) == set(range(10))
    with pytest.raises(QDriftError):
        load_digits_tensors("validation")


def test_models_load_from_data_with_safetensors():
    from diffusers import DiTTransformer2DModel, UNet2DModel

    unet, dit = load_digits_unet(), load_digits_dit()
    assert isinstance(unet, UNet2DModel) and isinstance(dit, DiTTransformer2DModel)
    assert unet.config.sample_size == 8 and unet.config.num_class_embeds == NULL_CLASS + 1
    assert dit.config.patch_size == 2 and dit.config.num_embeds_ada_norm == NULL_CLASS
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())
    for folder in ("digits_unet", "digits_dit"):
        weights = DATA / folder / "diffusion_pytorch_model.safetensors"
        assert weights.is_file() and weights.stat().st_size < 10_000_000
        assert not list((DATA / folder).glob("*.bin"))


def test_missing_model_folder_is_a_user_error(tmp_path):
    with pytest.raises(QDriftError, match="no digits unet model"):
        load_digits_unet(tmp_path)


def test_scheduler_configs():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    unet_cfg, dit_cfg = scheduler_config("unet"), scheduler_config("dit")
    assert unet_cfg["prediction_type"] == "epsilon" and unet_cfg["clip_sample"] is False
    assert unet_cfg["num_train_timesteps"] == 1000
    assert dit_cfg["prediction_type"] == "flow_prediction" and dit_cfg["shift"] == 1.0
    assert DDIMScheduler.from_config(unet_cfg).config.clip_sample is False
    assert EulerDiscreteScheduler.from_config(unet_cfg).config.prediction_type == "epsilon"
    assert digits_unet_fp().scheduler_config == unet_cfg  # the copy saved next to the weights agrees


def test_pair_follows_protocol(pair):
    assert check_pair(pair) is pair and isinstance(pair, ModelPair)
    assert pair.sample_shape == (1, 8, 8)
    cond = pair_conditions(pair, 6, torch.Generator().manual_seed(3))
    labels = cond["class_labels"]
    assert labels.dtype == torch.long and labels.shape == (6,)
    assert 0 <= int(labels.min()) and int(labels.max()) < 10
    again = pair.conditions(6, torch.Generator().manual_seed(3))["class_labels"]
    assert torch.equal(labels, again)


def test_fp_output_shape_determinism_and_fp_baseline(pair):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=gen)
    cond = pair.conditions(3, gen)
    t = torch.tensor(500)
    out = pair.fp(x, t, **cond)
    assert out.shape == x.shape and out.dtype == torch.float32 and not out.requires_grad
    assert torch.equal(out, pair.fp(x, t, **cond))
    assert torch.equal(out, pair.q(x, t, **cond))  # the FP pair's q is the FP model
    # a float 0-d timestep and a Python number give the same as the integer tensor
    assert torch.allclose(out, pair.fp(x, torch.tensor(500.0, dtype=torch.float64), **cond))
    assert torch.allclose(out, pair.fp(x, 500, **cond))
    assert not torch.allclose(out, pair.fp(x, torch.tensor(123.4), **cond))


def test_guidance_one_is_the_conditional_output_and_cfg_formula(pair):
    model = pair.fp_model
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 8, 8, generator=gen)
    labels = torch.tensor([0, 3, 7, 9])
    t = torch.tensor(250.0)
    tb = t.expand(4)
    cond = model(x, tb, class_labels=labels).sample
    uncond = model(x, tb, class_labels=torch.full((4,), NULL_CLASS)).sample
    p1 = DiffusersPair(model, scheduler_config=pair.scheduler_config, guidance_scale=1.0)
    assert torch.allclose(p1.fp(x, t, class_labels=labels), cond, atol=1e-6)
    p3 = DiffusersPair(model, scheduler_config=pair.scheduler_config, guidance_scale=3.0)
    assert torch.allclose(p3.fp(x, t, class_labels=labels), uncond + 3.0 * (cond - uncond), atol=1e-4)
    # a per-call override, and no labels at all = unconditional
    assert torch.allclose(p3.fp(x, t, class_labels=labels, guidance_scale=1.0), cond, atol=1e-6)
    assert torch.allclose(p3.fp(x, t), uncond, atol=1e-6)


def test_pair_with_a_distinct_q_model(unet_pair):
    fp_model = unet_pair.fp_model
    q_model = copy.deepcopy(fp_model)
    with torch.no_grad():
        for p in q_model.parameters():
            p.add_(1e-3 * torch.sign(p))
    pair = DiffusersPair(fp_model, q_model, scheduler_config=unet_pair.scheduler_config)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = {"class_labels": torch.tensor([1, 2])}
    fp, q = pair.fp(x, torch.tensor(10), **cond), pair.q(x, torch.tensor(10), **cond)
    assert fp.shape == q.shape and 0 < (fp - q).abs().max() < 1.0
    assert torch.equal(fp, unet_pair.fp(x, torch.tensor(10), **cond))


def test_calibration_inputs_run_through_the_model():
    calls = calibration_inputs("dit", n=3, seed=5, batch_size=4)
    again = calibration_inputs("dit", n=3, seed=5, batch_size=4)
    assert len(calls) == 3
    (x, t), kw = calls[0]
    assert x.shape == (8, 1, 8, 8) and t.shape == (8,) and kw["class_labels"].shape == (8,)
    assert (kw["class_labels"][4:] == NULL_CLASS).all()
    assert all(torch.equal(a[0][0], b[0][0]) for a, b in zip(calls, again))
    model = load_digits_dit()
    with torch.no_grad():
        assert model(*calls[0][0], **calls[0][1]).sample.shape == x.shape
    (xu, tu), _ = calibration_inputs("unet", n=1, seed=0, batch_size=2)[0]
    assert float(tu[0]) == int(tu[0]) and 0 <= float(tu[0]) < 1000
    with pytest.raises(QDriftError):
        calibration_inputs("vae", n=1, seed=0)


def test_load_pair_by_name():
    pair = load_pair("qdrift_stats.zoo:digits_dit_fp")
    assert pair.scheduler_config["prediction_type"] == "flow_prediction"


@pytest.mark.parametrize("kind,scheduler", [("unet", "ddim"), ("dit", "flow-euler")])
def test_fp_samples_are_recognisable_digits(kind, scheduler, unet_pair, dit_pair):
    from qdrift_stats.metrics.images import class_consistency

    pair = unet_pair if kind == "unet" else dit_pair
    samples, labels = sample_pair(pair, scheduler=scheduler, steps=20, num_samples=40, seed=0)
    assert samples.shape == (40, 1, 8, 8) and torch.isfinite(samples).all()
    # measured with 1000 samples at 50 steps: ~0.99 (see docs/zoo.md); 40 samples at 20 steps
    assert class_consistency(samples, labels) >= 0.85
    again, _ = sample_pair(pair, scheduler=scheduler, steps=20, num_samples=40, seed=0)
    assert torch.equal(samples, again)
