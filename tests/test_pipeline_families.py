"""Every pipeline family through the whole chain, on tiny random-weight components built here.

Per family: ``calibrate_pipeline`` (2 seeds, 3 steps, the pipeline's own ``set_timesteps`` call
replayed) -> ``qdrift fit`` with its defaults -> the exported estimator attached with
``QDriftScheduler(..., pipeline=q)`` (fingerprint checked) -> a corrected run that is finite and
differs from the plain one -> the same file with a zero statistic bit-exact to the plain run -> the
wrapper saved and reloaded gives the corrected run again.
"""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pytest
import torch

from qdrift_stats.cli import main
from qdrift_stats.correct.diffusers import QDriftScheduler, check_pipeline
from qdrift_stats.correct.estimator_file import EstimatorFile
from qdrift_stats.errors import QDriftError
from qdrift_stats.record.pipelines import calibrate_pipeline
from qdrift_stats.record.store import open_store
from tests import tiny_pipelines as tiny

STEPS = 3


@pytest.fixture(autouse=True)
def _quiet_diffusers():
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    logger.setLevel(level)


def with_scheduler(pipe, scheduler):
    return tiny.quiet(type(pipe)(**{**pipe.components, "scheduler": scheduler}))


def latents(pipe, call, seed=5, steps=STEPS):
    output_type = "pt" if type(pipe).__name__ == "DiTPipeline" else "latent"  # DiT always decodes
    out = pipe(
        **call, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type=output_type
    )
    return out.images


def zero_of(est: EstimatorFile) -> EstimatorFile:
    """The same file with no correction: no output terms (``k``, ``mu``, the affine output map), zero variance."""
    tensors = {k: v for k, v in est.tensors.items() if k not in ("k", "mu") and not k.startswith("map_")}
    tensors["variance"] = np.zeros_like(est.variance)
    metadata = json.loads(json.dumps(est.metadata))
    metadata["estimator"].pop("output_map", None)
    metadata["format_version"] = 1
    return EstimatorFile(tensors, metadata)


def chain(fp, q, call, tmp_path, steps=STEPS, guidance_key="guidance_scale"):
    """The whole chain; returns ``(store dataset, estimator file, plain, corrected)``."""
    kwargs = dict(call)
    guidance = kwargs.pop(guidance_key, None)
    labels = kwargs.pop("class_labels", None)
    store = calibrate_pipeline(
        fp,
        q,
        out=tmp_path / "calib.zarr",
        seeds=[0, 1],
        num_inference_steps=steps,
        guidance_scale=guidance,
        class_labels=labels,
        pipeline_kwargs=kwargs,
        recipe="w4a4",
    )
    path = tmp_path / "est.safetensors"
    assert main(["fit", str(store), "--out", str(path), "--quiet"]) == 0
    est = EstimatorFile.load(path)
    assert est.metadata["fingerprint"]["format"] == "qdrift-denoiser-fingerprint"

    plain = latents(q, call, steps=steps)
    wrapper = QDriftScheduler(q.scheduler, path, pipeline=q)
    corrected = latents(with_scheduler(q, wrapper), call, steps=steps)
    assert torch.isfinite(corrected).all() and not torch.equal(corrected, plain)
    zero = QDriftScheduler(q.scheduler, zero_of(est))
    assert torch.equal(latents(with_scheduler(q, zero), call, steps=steps), plain)

    wrapper.save_pretrained(tmp_path / "scheduler")
    reloaded = QDriftScheduler.from_pretrained(tmp_path / "scheduler")
    assert torch.equal(latents(with_scheduler(q, reloaded), call, steps=steps), corrected)
    return open_store(store).load(), est, plain, corrected


# ---- Flux ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dynamic", [True, False], ids=["dev-dynamic-shift", "schnell-static-shift"])
def test_flux_chain_replays_the_pipelines_sigmas_and_mu(dynamic, tmp_path):
    fp = tiny.flux(dynamic)
    q = tiny.twin(fp)
    ds, est, _, _ = chain(fp, q, tiny.flux_call(), tmp_path)
    # the grid is FluxPipeline's: sigmas linspace(1, 1/n, n), shifted by exp(mu) when dynamic
    sigmas = np.linspace(1.0, 1.0 / STEPS, STEPS)
    mu = json.loads(ds.attrs["set_timesteps"])["mu"]
    # mu of a 32x32 image: 4 packed tokens, linear in the sequence length between (256, 0.5) and (4096, 1.15)
    assert mu == pytest.approx(0.5 + (4 - 256) * (1.15 - 0.5) / (4096 - 256))
    expected = np.exp(mu) / (np.exp(mu) + (1 / sigmas - 1)) if dynamic else sigmas
    np.testing.assert_allclose(ds["b"].values, expected, rtol=1e-6)
    np.testing.assert_allclose(ds["b_next"].values, np.append(expected[1:], 0.0), rtol=1e-6)
    np.testing.assert_allclose(ds["gain"].values, ds["b_next"].values - ds["b"].values, rtol=1e-5)  # flow Euler
    # packed latents: 4 tokens of 16 channels, named so
    assert ds["delta_x"].dims == ("run", "step", "sample", "token", "channel")
    assert dict(ds.sizes)["token"] == 4 and dict(ds.sizes)["channel"] == 16
    assert est.channel_axis == -1


def test_flux_at_another_image_size_is_refused_naming_the_shift_or_interpolated_when_smooth(tmp_path):
    fp = tiny.flux(True)
    q = tiny.twin(fp)
    call = tiny.flux_call(size=32)
    kwargs = dict(call)
    guidance = kwargs.pop("guidance_scale")
    store = calibrate_pipeline(
        fp,
        q,
        out=tmp_path / "c.zarr",
        seeds=[0, 1],
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        pipeline_kwargs=kwargs,
    )
    assert main(["fit", str(store), "--out", str(tmp_path / "e.safetensors"), "--quiet"]) == 0
    bigger = tiny.flux_call(size=64)  # 16 tokens: another mu, another sigma grid with the same step count
    mu_16 = 0.5 + (16 - 256) * (1.15 - 0.5) / (4096 - 256)
    with pytest.raises(
        QDriftError, match=rf"what differs: the sigma shift \(mu 0\.4573 vs {mu_16:.4f}: another image size"
    ) as err:
        latents(with_scheduler(q, QDriftScheduler(q.scheduler, tmp_path / "e.safetensors")), bigger)
    assert "\n" not in str(err.value)
    assert (
        main(["fit", str(store), "--out", str(tmp_path / "s.safetensors"), "--estimator", "smooth-glm", "--quiet"]) == 0
    )
    wrapper = QDriftScheduler(q.scheduler, tmp_path / "s.safetensors")
    corrected = latents(with_scheduler(q, wrapper), bigger)
    assert torch.isfinite(corrected).all() and not torch.equal(corrected, latents(q, bigger))
    assert any("interpolated" in n and "the sigma shift" in n for n in wrapper.notes)


# ---- the other families ------------------------------------------------------------------------------

FAMILIES = {
    # name: (builder, call, scheduler name recorded, sample dims)
    "sd3": (lambda: tiny.sd3(False), tiny.sd3_call, "flow-euler", ("channel", "height", "width")),
    "sd3.5-dynamic-shift": (lambda: tiny.sd3(True), tiny.sd3_call, "flow-euler", ("channel", "height", "width")),
    "pixart-sigma": (tiny.pixart_sigma, tiny.pixart_call, "dpmpp-2m", ("channel", "height", "width")),
    "sana-flow-dpmpp": (lambda: tiny.sana(True), tiny.sana_call, "flow-dpmpp-2m", ("channel", "height", "width")),
    "sana-flow-euler": (lambda: tiny.sana(False), tiny.sana_call, "flow-euler", ("channel", "height", "width")),
    "sdxl": (tiny.sdxl, tiny.sdxl_call, "euler", ("channel", "height", "width")),
    "sd": (tiny.sd, tiny.sd_call, "ddim", ("channel", "height", "width")),
    "dit": (tiny.dit, tiny.dit_call, "ddim", ("channel", "height", "width")),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pipeline_family_chain(family, tmp_path):
    build, call, name, dims = FAMILIES[family]
    fp = build()
    q = tiny.twin(fp)
    ds, est, _, _ = chain(fp, q, call(), tmp_path)
    assert ds.attrs["scheduler"] == name and ds.attrs["pipeline"] == type(fp).__name__
    assert ds["delta_x"].dims[3:] == dims and ds.sizes["step"] == STEPS
    # the recorded grid is the one the pipeline's own set_timesteps call gives, replayed on a copy
    replay = type(fp.scheduler).from_config(fp.scheduler.config)
    kwargs = json.loads(ds.attrs["set_timesteps"])
    args = kwargs.pop("args")
    replay.set_timesteps(*args, **{k: np.asarray(v) if isinstance(v, list) else v for k, v in kwargs.items()})
    np.testing.assert_allclose(ds["timestep"].values, replay.timesteps.double().numpy(), rtol=0, atol=1e-4)
    if family == "sd3.5-dynamic-shift":  # mu of 16 latent tokens (32 px / 8), as the pipeline computes it
        assert kwargs["mu"] == pytest.approx(0.5 + (16 - 256) * (1.15 - 0.5) / (4096 - 256))
    assert est.steps == STEPS and est.metadata["scheduler"]["class"] == type(fp.scheduler).__name__


@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
def test_img2img_records_and_corrects_the_steps_the_strength_leaves(scheduler, tmp_path):
    fp = tiny.sd(scheduler, img2img=True)
    q = tiny.twin(fp)
    call = {**tiny.sd_call(img2img=True), "strength": 0.5}
    ds, est, _, _ = chain(fp, q, call, tmp_path, steps=4)
    # strength 0.5 of 4 steps: the pipeline skips 2 and runs the last 2 of the 4-step grid
    full = type(fp.scheduler).from_config(fp.scheduler.config)
    full.set_timesteps(4)
    assert ds.attrs["begin_index"] == 2 and ds.attrs["grid_steps"] == 4 and ds.sizes["step"] == 2
    np.testing.assert_allclose(ds["timestep"].values, full.timesteps[2:].double().numpy())
    assert est.steps == 2


def test_inpaint_records_and_corrects_the_steps_the_strength_leaves_in_the_masked_region_only(tmp_path):
    """StableDiffusionInpaintPipeline, strength 0.5 of 4 steps: the last 2 steps are recorded and corrected; the
    pipeline pastes the known region back after every step, so the correction shows in the masked region only."""
    fp = tiny.sd_inpaint("euler")
    q = tiny.twin(fp)
    ds, est, plain, corrected = chain(fp, q, tiny.sd_inpaint_call(strength=0.5), tmp_path, steps=4)
    full = type(fp.scheduler).from_config(fp.scheduler.config)
    full.set_timesteps(4)
    assert ds.attrs["begin_index"] == 2 and ds.attrs["grid_steps"] == 4 and ds.sizes["step"] == 2 and est.steps == 2
    assert ds.attrs["pipeline"] == "StableDiffusionInpaintPipeline"
    np.testing.assert_allclose(ds["timestep"].values, full.timesteps[2:].double().numpy())
    repainted = torch.arange(4) < 2  # latent columns the mask repaints
    assert torch.equal(corrected[..., ~repainted], plain[..., ~repainted])  # the image's own latents, both
    assert not torch.equal(corrected[..., repainted], plain[..., repainted])


# ---- fingerprint -----------------------------------------------------------------------------------


def test_a_denoiser_that_lost_its_quantization_is_refused_by_its_fingerprint(tmp_path):
    fp = tiny.flux(False)
    q = tiny.twin(fp)
    call = tiny.flux_call()
    kwargs = dict(call)
    guidance = kwargs.pop("guidance_scale")
    store = calibrate_pipeline(
        fp,
        q,
        out=tmp_path / "c.zarr",
        seeds=[0],
        num_inference_steps=2,
        guidance_scale=guidance,
        pipeline_kwargs=kwargs,
    )
    assert main(["fit", str(store), "--out", str(tmp_path / "e.safetensors"), "--quiet"]) == 0
    assert check_pipeline(q, tmp_path / "e.safetensors") < 1e-6  # the calibrated quantized model itself
    # what a save_pretrained / from_pretrained round trip of a fake-quantized model gives: the FP class
    with pytest.raises(QDriftError, match="full-precision model's output.*saved and reloaded") as err:
        QDriftScheduler(fp.scheduler, tmp_path / "e.safetensors", pipeline=fp)
    assert "\n" not in str(err.value)
    other = tiny.twin(fp, "w3a4")
    with pytest.raises(QDriftError, match="not the quantized model"):
        check_pipeline(other, tmp_path / "e.safetensors")


def test_misuse_of_the_wrapper_is_one_line(tmp_path):
    fp = tiny.flux(False)
    with pytest.raises(QDriftError, match="needs an estimator file") as err:
        QDriftScheduler(fp.scheduler, None)
    assert "\n" not in str(err.value)
    with pytest.raises(QDriftError, match="needs an estimator file"):
        QDriftScheduler(fp.scheduler, 3)
    with pytest.raises(QDriftError, match="does not exist"):
        QDriftScheduler(fp.scheduler, tmp_path / "missing.safetensors")
