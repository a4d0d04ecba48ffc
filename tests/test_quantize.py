"""Tests of the PTQ recipes in qdrift_stats.quantize, on a small MLP and a tiny diffusers UNet2DModel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qdrift_stats.errors import QDriftError
from qdrift_stats.quantize import RECIPES, quantize, recipe_options

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("optimum.quanto")
pytest.importorskip("torchao")

from qdrift_stats.quantize.fake import call_model  # noqa: E402
from qdrift_stats.quantize.mixdq import allocate_bits  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny models: threads only add contention on a shared machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 16)).eval()


def make_unet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        num_class_embeds=11,
        layers_per_block=1,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def mlp_calls(n: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(16, 16, generator=g),), {}) for _ in range(n)]


def unet_calls(n: int, seed: int, batch: int = 8) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            (torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 1000, (batch,), generator=g)),
            {"class_labels": torch.randint(0, 11, (batch,), generator=g)},
        )
        for _ in range(n)
    ]


def rel_error(q: nn.Module, fp: nn.Module, calls: list) -> float:
    num = sum(float((call_model(q, a, k) - call_model(fp, a, k)).pow(2).sum()) for a, k in calls)
    den = sum(float(call_model(fp, a, k).pow(2).sum()) for a, k in calls)
    return (num / den) ** 0.5


class Case:
    def __init__(self, name: str):
        self.fp = make_mlp() if name == "mlp" else make_unet()
        calls = mlp_calls if name == "mlp" else unet_calls
        self.calib = calls(3, seed=1)
        self.eval = calls(3, seed=2)
        self.state = {k: v.clone() for k, v in self.fp.state_dict().items()}
        self.ref = [call_model(self.fp, a, k).clone() for a, k in self.eval]
        self._q: dict = {}
        self._err: dict = {}

    def q(self, recipe: str) -> nn.Module:
        if recipe not in self._q:
            self._q[recipe] = quantize(self.fp, recipe, self.calib)
        return self._q[recipe]

    def err(self, recipe: str) -> float:
        if recipe not in self._err:
            self._err[recipe] = rel_error(self.q(recipe), self.fp, self.eval)
        return self._err[recipe]


@pytest.fixture(scope="module")
def cases() -> dict:
    return {"mlp": Case("mlp"), "unet": Case("unet")}


def test_recipe_table():
    assert {"w8a8", "w4a8", "w4a4", "w3a4", "svdquant-w4a4", "mixdq-w4a8"} <= set(RECIPES)
    for name, info in RECIPES.items():
        assert info.name == name
        assert callable(info.fn)
        assert info.description and "\n" not in info.description
        assert 2 <= info.weight_bits <= 8 and 2 <= info.activation_bits <= 8
        assert {"include", "exclude"} <= set(recipe_options(name))


@pytest.mark.parametrize("model", ["mlp", "unet"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_quantizes_a_copy(cases, model, recipe):
    case = cases[model]
    q = case.q(recipe)
    assert q is not case.fp
    # the FP model is untouched: same parameters, same outputs, no storage shared with the twin
    state = case.fp.state_dict()
    assert state.keys() == case.state.keys()
    assert all(torch.equal(state[k], v) for k, v in case.state.items())
    fp_ptrs = {p.data_ptr() for p in case.fp.parameters()}
    assert not fp_ptrs & {t.data_ptr() for t in q.state_dict().values() if type(t) is torch.Tensor}
    for (a, k), ref in zip(case.eval, case.ref):
        out = call_model(q, a, k)
        assert out.shape == ref.shape and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        assert torch.equal(out, call_model(q, a, k))  # deterministic
        assert torch.equal(call_model(case.fp, a, k), ref)
    err = case.err(recipe)
    info = RECIPES[recipe]
    bound = 0.1 if min(info.weight_bits, info.activation_bits) >= 8 else 0.6
    assert 0.0 < err < bound, (recipe, model, err)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_unet_twin_accepts_return_dict_false(cases, recipe):
    case = cases["unet"]
    q = case.q(recipe)
    (sample, t), kw = case.eval[0]
    tup = q(sample, t, return_dict=False, **kw)
    assert isinstance(tup, tuple)
    assert type(tup[0]) is torch.Tensor
    assert torch.equal(tup[0], q(sample, t, **kw).sample)


@pytest.mark.parametrize("model", ["mlp", "unet"])
def test_fewer_bits_give_larger_error(cases, model):
    case = cases[model]
    assert case.err("w3a4") > case.err("w4a4")
    assert case.err("w4a8") > case.err("w8a8")
    assert case.err("w4a4") > case.err("w8a8")
    assert case.err("mixdq-w4a8") > case.err("mixdq-w5a8")


def test_fake_quant_weights_lie_on_the_integer_grid():
    torch.manual_seed(0)
    layer = nn.Linear(64, 8)
    for recipe, bits in (("w4a4", 4), ("w3a4", 3)):
        q = quantize(layer, recipe)
        w = q.weight.detach()
        assert not torch.equal(w, layer.weight.detach())
        for group in w.reshape(8, 2, 32).reshape(16, 32):  # group size 32 along the input
            assert 2 <= group.unique().numel() <= 2**bits


def test_per_token_activation_quantization_is_dynamic():
    # one token with a huge range must not spoil the others: per-token scales
    torch.manual_seed(0)
    layer = nn.Linear(32, 32)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(32))
        layer.bias.zero_()
    q = quantize(layer, "w4a4")
    x = torch.randn(4, 32)
    x_big = x.clone()
    x_big[0] *= 1000.0
    y, y_big = q(x), q(x_big)
    assert torch.allclose(y[1:], y_big[1:])
    assert not torch.allclose(y, x)


@pytest.mark.parametrize("recipe", ["w8a8", "w4a4", "svdquant-w4a4", "mixdq-w4a8"])
def test_exclude_keeps_layers_in_full_precision(cases, recipe):
    case = cases["unet"]
    q = quantize(case.fp, recipe, case.calib, exclude=["conv_in", "conv_out"])
    assert type(q.conv_in) is nn.Conv2d and type(q.conv_out) is nn.Conv2d
    assert torch.equal(q.conv_in.weight, case.fp.conv_in.weight)
    assert type(q.time_embedding.linear_1) is not nn.Linear
    if hasattr(q, "qdrift_bits"):
        assert "conv_in" not in q.qdrift_bits and "time_embedding.linear_1" in q.qdrift_bits


def test_quanto_conv_inputs_add_activation_quantization(cases):
    case = cases["unet"]
    stock = quantize(case.fp, "w8a8", case.calib, conv_inputs=False)
    # quanto alone leaves U-Net conv inputs in float; quantizing them too adds error
    assert 0.0 < rel_error(stock, case.fp, case.eval) < case.err("w8a8")


def _outlier_model(seed: int):
    torch.manual_seed(seed)
    fp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval()
    scale = torch.ones(64)
    scale[torch.randperm(64)[:4]] = 30.0  # a few outlier input channels, as in diffusion transformers
    g = torch.Generator().manual_seed(100 + seed)
    calib = [((torch.randn(32, 64, generator=g) * scale,), {}) for _ in range(3)]
    ev = [((torch.randn(32, 64, generator=g) * scale,), {}) for _ in range(3)]
    return fp, calib, ev


@pytest.mark.parametrize("seed", [0, 1])
def test_svdquant_low_rank_branch_absorbs_outliers(seed):
    fp, calib, ev = _outlier_model(seed)
    plain = rel_error(quantize(fp, "w4a4", calib), fp, ev)
    smooth_only = rel_error(quantize(fp, "svdquant-w4a4", calib, rank=0), fp, ev)
    svd = rel_error(quantize(fp, "svdquant-w4a4", calib), fp, ev)
    assert svd < smooth_only < plain
    assert svd > 0.0


def test_svdquant_layers_carry_the_low_rank_branch(cases):
    q = cases["unet"].q("svdquant-w4a4")
    ranks = [m.rank for m in q.modules() if hasattr(m, "lora_down")]
    assert ranks and all(r >= 1 for r in ranks)
    assert all(r <= 8 for r in ranks)


def _layer_sizes(model: nn.Module) -> dict[str, int]:
    return {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


@pytest.mark.parametrize("budget", [3.5, 4.0, 5.0, 6.5])
def test_mixdq_respects_the_bit_budget(cases, budget):
    case = cases["unet"]
    q = quantize(case.fp, "mixdq-w4a8", case.calib, budget=budget)
    sizes = _layer_sizes(case.fp)
    assert set(q.qdrift_bits) == set(sizes)
    assert set(q.qdrift_bits.values()) <= {8, 4, 3}
    avg = sum(q.qdrift_bits[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert avg <= budget + 1e-9
    assert avg == pytest.approx(q.qdrift_avg_bits)
    assert len(set(q.qdrift_bits.values())) >= 2  # a strict interior budget mixes bit widths
    for name, bits in q.qdrift_bits.items():
        assert q.get_submodule(name).weight_bits == bits


def test_mixdq_budget_extremes_and_errors(cases):
    case = cases["mlp"]
    hi = quantize(case.fp, "mixdq-w4a8", case.calib, budget=8)
    lo = quantize(case.fp, "mixdq-w4a8", case.calib, budget=3)
    assert set(hi.qdrift_bits.values()) == {8}
    assert set(lo.qdrift_bits.values()) == {3}
    assert rel_error(hi, case.fp, case.eval) < rel_error(lo, case.fp, case.eval)
    with pytest.raises(QDriftError, match="budget"):
        quantize(case.fp, "mixdq-w4a8", case.calib, budget=2)


def test_mixdq_allocation_keeps_sensitive_layers_high():
    sens = {"a": {4: 1.0}, "b": {4: 0.01}, "c": {4: 0.5}}
    sizes = {"a": 100, "b": 100, "c": 100}
    bits = allocate_bits(sens, sizes, (8, 4), budget=6.0)
    assert bits["a"] == 8 and bits["b"] == 4
    assert sum(bits[n] * sizes[n] for n in sizes) / 300 <= 6.0


def test_unknown_recipe_and_bad_input(cases):
    fp = cases["mlp"].fp
    with pytest.raises(QDriftError) as info:
        quantize(fp, "w2a2-magic")
    message = str(info.value)
    assert "\n" not in message and all(name in message for name in RECIPES)
    with pytest.raises(QDriftError, match="option"):
        quantize(fp, "w4a4", no_such_option=1)
    for recipe in ("w8a8", "w4a8", "svdquant-w4a4", "mixdq-w4a8"):
        with pytest.raises(QDriftError, match="calibration"):
            quantize(fp, recipe)
    with pytest.raises(QDriftError, match="calibration"):
        quantize(fp, "w4a4", [torch.zeros(3)])
    with pytest.raises(QDriftError):
        quantize("not a model", "w4a4")


def test_call_helper_extracts_the_main_tensor(cases):
    case = cases["unet"]
    (sample, t), kw = case.eval[0]
    out = call_model(case.fp, (sample, t), kw)
    assert torch.equal(out, call_model(case.fp, (sample, t), {**kw, "return_dict": False}))

    class TupleModel(nn.Module):
        def forward(self, x):
            return (x * 2, x)

    x = torch.ones(3)
    assert torch.equal(call_model(TupleModel(), (x,), {}), x * 2)
