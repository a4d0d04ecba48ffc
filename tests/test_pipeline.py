"""Q-Drift inside real diffusers pipelines, built from tiny configs (no download).

A ``DiTPipeline`` (class-conditional transformer, guidance with the conditional half first and a
learned-sigma channel split) and a ``StableDiffusionPipeline`` (text-conditional U-Net with a tiny
CLIP text encoder and a hand-written character vocabulary, guidance with the unconditional half
first), each saved with ``save_pretrained`` and reloaded with ``from_pretrained``; the quantized twin
is the same pipeline with its denoiser through ``qdrift_stats.quantize``. The chain: calibrate
(2 runs) -> fit -> export -> reload -> sample with ``QDriftScheduler``.
"""

import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils.torch_utils import randn_tensor

from qdrift_stats.correct.diffusers import QDriftScheduler
from qdrift_stats.correct.estimator_file import EstimatorFile
from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators import EmpiricalEstimator
from qdrift_stats.quantize import quantize
from qdrift_stats.record.pipelines import calibrate_pipeline
from qdrift_stats.record.store import open_store

STEPS = 5
LABELS = [1, 2, 3]
PROMPTS = ["a red cat", "a blue car"]
GUIDANCE = 4.0


# ---- tiny components ------------------------------------------------------------------------------


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    )


def tiny_dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    # num_embeds_ada_norm=1000: DiTPipeline's null class is 1000 (ImageNet); out_channels=8: learned sigma
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_num_groups=1,
    )


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8,),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=16,
        norm_num_groups=4,
        attention_head_dim=4,
    )


def tiny_clip(folder: Path):
    """A CLIP tokenizer over single characters (no merges) and a one-layer CLIP text encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in letters + [c + "</w>" for c in letters]:
        vocab[token] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    return tokenizer, encoder


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_scheduler(pipe, scheduler):
    """The same pipeline (shared modules, no dtype cast, unlike ``from_pipe``) with another scheduler."""
    return quiet(type(pipe)(**{**pipe.components, "scheduler": scheduler}))


def denoiser_calls(pipe, **call):
    """The denoiser calls ``(args, kwargs)`` of one pipeline run: calibration data for static PTQ recipes."""
    calls = []
    denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    handle = denoiser.register_forward_pre_hook(lambda m, a, k: calls.append((a, dict(k))), with_kwargs=True)
    try:
        pipe(**call, generator=torch.Generator().manual_seed(123))
    finally:
        handle.remove()
    return calls


@pytest.fixture(autouse=True)
def _quiet_diffusers():
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    logger.setLevel(level)


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    """``(folder, fp_pipe, q_pipe)``: a saved-and-reloaded tiny DiT pipeline and its w4a8 twin."""
    folder = tmp_path_factory.mktemp("dit")
    DiTPipeline(transformer=tiny_dit(), vae=tiny_vae(), scheduler=DDIMScheduler(clip_sample=False)).save_pretrained(
        folder
    )
    fp = quiet(DiTPipeline.from_pretrained(folder))
    calibration = denoiser_calls(
        fp, class_labels=LABELS, guidance_scale=GUIDANCE, num_inference_steps=2, output_type="pt"
    )
    q = quiet(DiTPipeline.from_pipe(fp, transformer=quantize(fp.transformer, "w4a8", calibration)))
    return folder, fp, q


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """``(folder, fp_pipe, q_pipe)``: a saved-and-reloaded tiny Stable Diffusion pipeline and its w4a4 twin."""
    pytest.importorskip("transformers")  # CLIP text encoder and tokenizer
    folder = tmp_path_factory.mktemp("sd")
    tokenizer, encoder = tiny_clip(folder / "clip")
    StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=encoder,
        tokenizer=tokenizer,
        unet=tiny_unet(),
        scheduler=EulerDiscreteScheduler(steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder / "pipe")
    fp = quiet(StableDiffusionPipeline.from_pretrained(folder / "pipe"))
    q = quiet(StableDiffusionPipeline.from_pipe(fp, unet=quantize(fp.unet, "w4a4")))
    return folder / "pipe", fp, q


@pytest.fixture(scope="module")
def dit_store(dit, tmp_path_factory):
    """A 2-run store; also ``fp_before`` / ``fp_after``: the FP pipeline's images around the calibration."""
    _, fp, q = dit
    out = tmp_path_factory.mktemp("dit_store") / "calib.zarr"
    before = dit_images(fp)
    scheduler = fp.scheduler
    calibrate_pipeline(
        fp,
        q,
        out=out,
        class_labels=LABELS,
        seeds=[0, 1],
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        recipe="w4a8",
    )
    assert fp.scheduler is scheduler and not fp.transformer._forward_pre_hooks and not q.transformer._forward_pre_hooks
    return {"path": out, "fp_before": before, "fp_after": dit_images(fp)}


@pytest.fixture(scope="module")
def dit_estimator(dit_store, tmp_path_factory):
    path = tmp_path_factory.mktemp("dit_est") / "est.safetensors"
    EmpiricalEstimator().fit(dit_store["path"]).export(path, correction="shrink")
    return path


def dit_images(pipe, seed=0, steps=STEPS):
    return pipe(
        class_labels=LABELS,
        guidance_scale=GUIDANCE,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images


def sd_latents(pipe, seed=0, steps=STEPS):
    return pipe(
        PROMPTS,
        guidance_scale=GUIDANCE,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
    ).images


def configured_copy(scheduler, steps=STEPS):
    copy = type(scheduler).from_config(scheduler.config)
    copy.set_timesteps(steps)
    return copy


# ---- calibration ----------------------------------------------------------------------------------


def test_dit_calibration_writes_the_record_store_with_the_guided_outputs_the_scheduler_sees(dit, dit_store):
    _, fp, q = dit
    ds = open_store(dit_store["path"]).load()
    assert dict(ds.sizes) == {"run": 2, "step": STEPS, "sample": 3, "channel": 4, "height": 8, "width": 8}
    attrs = ds.attrs
    assert attrs["scheduler"] == "ddim" and attrs["scheduler_class"] == "DDIMScheduler" and attrs["steps"] == STEPS
    assert attrs["pipeline"] == "DiTPipeline" and attrs["recipe"] == "w4a8" and attrs["runs_complete"] == 2
    assert (
        "DiTPipeline" in attrs["pair"]
        and "w4a8" in attrs["pair"]
        and json.loads(attrs["conditions"]) == {"class_labels": LABELS}
    )
    assert list(ds["seed"].values) == [0, 1]

    # Step 0 of run 0 by hand: DiT's guidance (conditional half first, eps channels of a learned-sigma output).
    latents = randn_tensor((3, 4, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    scheduler = configured_copy(fp.scheduler)
    t = scheduler.timesteps[0]
    labels = torch.tensor(LABELS + [1000] * 3)

    def guided(model):
        with torch.no_grad():
            out = model(torch.cat([latents, latents]), timestep=t[None].expand(6), class_labels=labels).sample[:, :4]
        cond, uncond = out.split(3)
        return uncond + GUIDANCE * (cond - uncond)

    m_fp, m_q = guided(fp.transformer), guided(q.transformer)
    torch.testing.assert_close(torch.from_numpy(ds["out_fp"].values[0, 0]), m_fp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(ds["delta_out"].values[0, 0]), m_q - m_fp, rtol=1e-4, atol=1e-5)
    # DDIM is a one-step solver: Delta_i = (b_next - a_next b / a) * (m_q - m_fp) in lock-step
    gain = (ds["b_next"] - ds["a_next"] * ds["b"] / ds["a"]).values[None, :, None, None, None, None]
    np.testing.assert_allclose(ds["delta_x"].values, gain * ds["delta_out"].values, rtol=1e-3, atol=1e-4)


def test_calibration_does_not_change_what_the_fp_pipeline_outputs(dit_store):
    assert torch.equal(dit_store["fp_after"], dit_store["fp_before"])


@pytest.fixture(scope="module")
def sd_store(sd, tmp_path_factory):
    _, fp, q = sd
    return calibrate_pipeline(
        fp,
        q,
        out=tmp_path_factory.mktemp("sd_store") / "sd.zarr",
        prompts=PROMPTS,
        seeds=[0, 1],
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        recipe="w4a4",
        trajectories=True,
    )


def test_stable_diffusion_calibration_follows_the_fp_trajectory_in_lock_step(sd, sd_store):
    _, fp, q = sd
    ds = open_store(sd_store).load()
    assert dict(ds.sizes) == {"run": 2, "step": STEPS, "sample": 2, "channel": 4, "height": 8, "width": 8}
    assert ds.attrs["scheduler"] == "euler" and json.loads(ds.attrs["conditions"]) == {"prompt": PROMPTS}
    # Euler (eps, unscaled state) is a one-step solver: Delta_i = (b_next - b) * (m_q - m_fp)
    gain = (ds["b_next"] - ds["b"]).values[None, :, None, None, None, None]
    np.testing.assert_allclose(ds["delta_x"].values, gain * ds["delta_out"].values, rtol=1e-3, atol=1e-4)
    # the FP trajectory is the plain FP pipeline's; the free Q trajectory is the plain Q pipeline's
    np.testing.assert_allclose(ds["traj_fp"].values[0, -1], sd_latents(fp, seed=0).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ds["traj_q"].values[1, -1], sd_latents(q, seed=1).numpy(), rtol=1e-6, atol=1e-6)
    assert np.abs(ds["delta_out"].values).max() > 0


def test_an_existing_store_is_resumed_with_the_missing_seeds_only(dit, dit_store, tmp_path):
    _, fp, q = dit
    out = tmp_path / "resume.zarr"
    shutil.copytree(dit_store["path"], out)
    calls = {"n": 0}
    handle = fp.transformer.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    try:
        calibrate_pipeline(
            fp,
            q,
            out=out,
            class_labels=LABELS,
            seeds=[0, 1, 2],
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            recipe="w4a8",
        )
    finally:
        handle.remove()
    assert calls["n"] == STEPS  # one new run: seed 2
    assert list(open_store(out)["seed"].values) == [0, 1, 2]
    with pytest.raises(QDriftError, match="recorded with pair="):
        calibrate_pipeline(
            fp, q, out=out, class_labels=[7], seeds=[3], num_inference_steps=STEPS, guidance_scale=GUIDANCE
        )


def test_calibration_misuse_gets_one_line_errors(dit, tmp_path):
    _, fp, q = dit
    common = dict(out=tmp_path / "x.zarr", seeds=[0], num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    with pytest.raises(QDriftError, match="share the same denoiser"):
        calibrate_pipeline(fp, fp, class_labels=LABELS, **common)
    with pytest.raises(QDriftError, match="not both"):
        calibrate_pipeline(fp, q, class_labels=LABELS, prompts=["a"], **common)
    with pytest.raises(QDriftError, match="generator"):
        calibrate_pipeline(fp, q, class_labels=LABELS, pipeline_kwargs={"generator": None}, **common)
    assert not (tmp_path / "x.zarr").exists()


def test_a_pipeline_store_has_the_gain_and_is_fitted_and_cross_validated_by_the_cli_defaults(dit, tmp_path):
    """The store identity is written by the same writer as ``qdrift record``'s: ``gain`` included."""
    from click.testing import CliRunner

    from qdrift_stats.cli import cli

    _, fp, q = dit
    store = tmp_path / "calib.zarr"
    calibrate_pipeline(
        fp, q, out=store, class_labels=LABELS, seeds=[0, 1, 2], num_inference_steps=STEPS, guidance_scale=GUIDANCE
    )
    ds = open_store(store)
    # DDIM eps: the first-order gain is (a_next - b_next a / b) * (-b / a), from the recorded coordinates
    a, b, a_next, b_next = (ds[n].values for n in ("a", "b", "a_next", "b_next"))
    np.testing.assert_allclose(ds["gain"].values, (a_next - b_next * a / b) * (-b / a), rtol=1e-12)
    runner = CliRunner()
    fitted = runner.invoke(cli, ["fit", str(store), "--out", str(tmp_path / "est.safetensors")])
    assert fitted.exit_code == 0, fitted.output
    assert EstimatorFile.load(tmp_path / "est.safetensors").metadata["estimator"]["name"]
    validated = runner.invoke(
        cli, ["cv", str(store), "--out", str(tmp_path / "cv.zarr"), "--no-strength", "--splits", "3"]
    )
    assert validated.exit_code == 0, validated.output


def test_a_second_concurrent_calibration_of_one_store_is_refused(dit, tmp_path):
    """The pipeline path takes the store's writer lock: while one calibration writes, another is refused."""
    import threading

    _, fp, q = dit
    store = tmp_path / "busy.zarr"
    common = dict(out=store, class_labels=LABELS, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    inside, refused = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def held(todo):  # the first calibration holds the lock while the second one tries
        inside.set()
        assert refused.wait(60)
        yield from todo

    def first():
        try:
            calibrate_pipeline(fp, q, seeds=[0], progress=held, **common)
            outcome["first"] = "done"
        except BaseException as exc:  # reported below
            outcome["first"] = repr(exc)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert inside.wait(60)
        with pytest.raises(QDriftError, match="another process is writing") as err:
            calibrate_pipeline(fp, q, seeds=[1], **common)
        assert "\n" not in str(err.value)
    finally:
        refused.set()
        thread.join(120)
    assert outcome["first"] == "done"
    assert list(open_store(store)["seed"].values) == [0]


# ---- the chain: fit, export, reload, sample with the wrapper --------------------------------------


def test_dit_chain_corrects_the_quantized_pipeline_and_a_zero_estimator_changes_nothing(dit, dit_estimator, tmp_path):
    folder, fp, q = dit
    est = EstimatorFile.load(dit_estimator)
    assert est.metadata["provenance"]["recipe"] == "w4a8" and est.metadata["provenance"]["model"] == str(folder)
    assert est.metadata["scheduler"]["class"] == "DDIMScheduler" and est.steps == STEPS

    corrected_pipe = with_scheduler(q, QDriftScheduler(q.scheduler, dit_estimator, model=str(folder), recipe="w4a8"))
    corrected, plain = dit_images(corrected_pipe), dit_images(q)
    assert torch.isfinite(corrected).all() and not torch.equal(corrected, plain)

    for pipe in (fp, q):
        zero = EstimatorFile.zeros_like_grid(configured_copy(pipe.scheduler))
        assert torch.equal(dit_images(with_scheduler(pipe, QDriftScheduler(pipe.scheduler, zero))), dit_images(pipe))


def test_an_estimator_for_another_grid_or_recipe_is_refused_with_one_line(dit, dit_estimator):
    _, _, q = dit
    pipe = with_scheduler(q, QDriftScheduler(q.scheduler, dit_estimator))
    with pytest.raises(
        QDriftError, match=f"fitted for ddim with {STEPS} steps, this sampler runs ddim with {STEPS + 3} steps"
    ) as err:
        dit_images(pipe, steps=STEPS + 3)
    assert "\n" not in str(err.value)
    with pytest.raises(QDriftError, match="calibrated for recipe 'w4a8', not 'w4a4'"):
        QDriftScheduler(q.scheduler, dit_estimator, recipe="w4a4")
    with pytest.raises(QDriftError, match="fitted for scheduler ddim, not euler"):
        QDriftScheduler(EulerDiscreteScheduler.from_config(q.scheduler.config), dit_estimator)


def test_a_wrapped_pipeline_round_trips_through_save_pretrained(dit, dit_estimator, tmp_path):
    _, fp, _ = dit  # the FP pipeline: a quanto-quantized denoiser is not a diffusers checkpoint
    pipe = with_scheduler(fp, QDriftScheduler(fp.scheduler, dit_estimator, strength=0.5))
    expected = dit_images(pipe)
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["scheduler"] == ["qdrift_stats.correct.diffusers", "QDriftScheduler"]
    # diffusers >= 0.42 loads a library a folder names only through the component's module file and
    # trust_remote_code (the file is one import of the installed qdrift_stats; see tests/test_safety.py)
    reloaded = quiet(DiTPipeline.from_pretrained(tmp_path / "saved", trust_remote_code=True))
    assert isinstance(reloaded.scheduler, QDriftScheduler) and reloaded.scheduler.strength == 0.5
    assert torch.equal(dit_images(reloaded), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_pipelines_run_corrected_on_cpu(dit, dit_estimator, dtype):
    folder, _, _ = dit
    pipe = quiet(DiTPipeline.from_pretrained(folder, torch_dtype=dtype))
    plain = dit_images(pipe)
    zero = EstimatorFile.zeros_like_grid(configured_copy(pipe.scheduler))
    assert torch.equal(dit_images(with_scheduler(pipe, QDriftScheduler(pipe.scheduler, zero))), plain)
    corrected = dit_images(with_scheduler(pipe, QDriftScheduler(pipe.scheduler, dit_estimator)))
    assert corrected.dtype == dtype and torch.isfinite(corrected).all() and not torch.equal(corrected, plain)


def test_stable_diffusion_chain_with_euler(sd, sd_store, tmp_path):
    folder, fp, q = sd
    EmpiricalEstimator().fit(sd_store).export(tmp_path / "sd.safetensors", correction="shrink")
    est = EstimatorFile.load(tmp_path / "sd.safetensors")
    assert (
        est.metadata["scheduler"]["class"] == "EulerDiscreteScheduler"
        and est.metadata["provenance"]["recipe"] == "w4a4"
    )
    corrected = sd_latents(with_scheduler(q, QDriftScheduler(q.scheduler, est, model=str(folder), recipe="w4a4")))
    plain = sd_latents(q)
    assert torch.isfinite(corrected).all() and not torch.equal(corrected, plain)
    zero = EstimatorFile.zeros_like_grid(configured_copy(q.scheduler))
    assert torch.equal(sd_latents(with_scheduler(q, QDriftScheduler(q.scheduler, zero))), plain)
