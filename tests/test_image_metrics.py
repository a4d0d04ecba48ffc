"""Image metrics: classifier features, Fréchet distance, KID, class consistency, bootstrap, standard FID."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torchmetrics")
pytest.importorskip("sklearn")

from qdrift_stats.errors import QDriftError  # noqa: E402
from qdrift_stats.metrics.classifier import ClassifierFeatures, load_digits_classifier  # noqa: E402
from qdrift_stats.metrics.images import (  # noqa: E402
    INCEPTION_WEIGHTS_ENV,
    bootstrap_ci,
    class_consistency,
    class_consistency_ci,
    class_hits,
    find_inception_weights,
    frechet_distance,
    inception_fid,
    kernel_inception_distance,
    to_inception_input,
)
from qdrift_stats.zoo.data import load_digits_tensors  # noqa: E402

#: Measured test-split accuracy of the shipped classifier: 0.9972 (359 of 360).
MIN_TEST_ACCURACY = 0.98


@pytest.fixture(scope="module")
def digits():
    return load_digits_tensors("test")


def test_classifier_loads_without_pickle_and_is_accurate(monkeypatch, digits):
    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_pickle)
    model = load_digits_classifier()
    x, y = digits
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc >= MIN_TEST_ACCURACY
    assert class_consistency(x, y) == pytest.approx(acc)


def test_classifier_features_are_standardised():
    x, _ = load_digits_tensors("train")
    f = ClassifierFeatures()(x)
    assert f.shape == (len(x), 64)
    assert f.mean(0).abs().max() < 1e-3
    assert f.var(0).mean().item() == pytest.approx(1.0, rel=1e-3)
    # uint8 RGB input is mapped to the same features
    rgb = ((x + 1) * 127.5).round().to(torch.uint8).repeat(1, 3, 1, 1)
    assert torch.allclose(ClassifierFeatures()(rgb[:5]), f[:5], atol=0.05)


def test_missing_classifier_folder_is_a_user_error(tmp_path):
    with pytest.raises(QDriftError, match="no digits classifier"):
        load_digits_classifier(tmp_path)


def test_frechet_distance_identical_shifted_noisy(digits):
    x, _ = digits
    assert abs(frechet_distance(x, x)) < 1e-6
    gen = torch.Generator().manual_seed(0)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    fd_small, fd_large = frechet_distance(x, x - 0.1), frechet_distance(x, x - 0.4)
    assert 0 < fd_small < fd_large
    assert frechet_distance(x, noisy) > 0.05
    x_tr, _ = load_digits_tensors("train")
    assert frechet_distance(x, x_tr) < fd_large  # another sample of real digits is close


def test_frechet_distance_with_a_custom_feature_module():
    class Flatten(nn.Module):
        num_features = 4

        def forward(self, imgs):
            return imgs.reshape(len(imgs), -1)[:, :4]

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(200, 1, 2, 2, generator=gen)
    # Gaussian with identity covariance vs mean shift 1 in every coordinate: FD ~ 4
    assert frechet_distance(a, a + 1.0, features=Flatten()) == pytest.approx(4.0, rel=1e-6)


def test_kid_on_tiny_inputs(digits):
    x, _ = digits
    small, other = x[:12], x[12:24]
    mean, std = kernel_inception_distance(small, other, subset_size=6, subsets=20, seed=1)
    assert (mean, std) == kernel_inception_distance(small, other, subset_size=6, subsets=20, seed=1)
    assert std >= 0
    shifted, _ = kernel_inception_distance(small, other - 0.5, subset_size=6, subsets=20, seed=1)
    assert shifted > mean
    state = torch.random.get_rng_state()
    kernel_inception_distance(small, other, subset_size=6, subsets=3)
    assert torch.equal(state, torch.random.get_rng_state())  # the global generator is left alone
    with pytest.raises(QDriftError, match="subset_size"):
        kernel_inception_distance(small, other, subset_size=50)


def test_class_consistency_counts_matches(digits):
    x, y = digits
    assert class_consistency(x, (y + 1) % 10) < 0.05
    assert class_consistency(x[:4], torch.full((4,), 10)) == 0.0  # the null class never matches
    with pytest.raises(QDriftError, match="4 samples but 3 labels"):
        class_consistency(x[:4], y[:3])


def test_class_hits_are_paired_per_sample(digits):
    x, y = digits[0][:60], digits[1][:60]
    wrong = torch.arange(60) % 3 == 0  # every third label shifted: the (accurate) classifier matches none of them
    labels = torch.where(wrong, (y + 1) % 10, y)
    hits = class_hits(x, labels)
    assert hits.dtype == bool and hits.shape == (60,)
    assert not hits[wrong.numpy()].any()
    assert hits.mean() == pytest.approx(class_consistency(x, labels))
    assert (hits == class_hits(x, labels)).all()  # deterministic, same order as the samples


def test_bootstrap_ci(digits):
    x, y = digits[0][:120], digits[1][:120]
    y = torch.where(torch.arange(120) % 10 == 0, (y + 1) % 10, y)  # 12 wrong labels: accuracy 0.9 or less
    est, lo, hi = bootstrap_ci(lambda s, lab: class_consistency(s, lab), x, labels=y, n_boot=20, seed=2)
    assert est == pytest.approx(class_consistency(x, y))
    assert lo <= est <= hi <= 1.0 and lo < hi
    assert (est, lo, hi) == bootstrap_ci(lambda s, lab: class_consistency(s, lab), x, labels=y, n_boot=20, seed=2)
    ref = digits[0][120:]
    est, lo, hi = bootstrap_ci(lambda s: frechet_distance(ref, s), x[:100] - 0.3, n_boot=5)
    assert 0 < lo <= hi and est > 0
    kid = bootstrap_ci(lambda s: kernel_inception_distance(ref[:40], s, subset_size=20, subsets=5), x[:40], n_boot=3)
    assert len(kid) == 3
    with pytest.raises(QDriftError):
        bootstrap_ci(lambda s: 0.0, x, n_boot=1)


class StandInInception(nn.Module):
    """A tiny stand-in for Inception: uint8 RGB in, 6 features out."""

    num_features = 6

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(3 * 8 * 8, 6)

    def forward(self, imgs):
        assert imgs.dtype == torch.uint8 and imgs.shape[1] == 3
        return self.proj(imgs.float().flatten(1) / 255.0)


def test_inception_fid_code_path_with_a_stand_in(digits):
    x, _ = digits
    assert to_inception_input(x[:3]).dtype == torch.uint8 and to_inception_input(x[:3]).shape == (3, 3, 8, 8)
    net = StandInInception()
    assert abs(inception_fid(x, x, feature_network=net)) < 1e-6
    assert inception_fid(x, x - 0.5, feature_network=net) > inception_fid(x, x - 0.1, feature_network=net) > 0


def test_inception_fid_without_weights_is_a_one_line_user_error(tmp_path, monkeypatch, digits):
    x, _ = digits
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert find_inception_weights() is None
    with pytest.raises(QDriftError, match="Inception-v3 weights") as err:
        inception_fid(x, x)
    assert "\n" not in str(err.value)
    with pytest.raises(QDriftError):
        inception_fid(x, x, weights_path=tmp_path / "missing.pth")
    fake = tmp_path / "w.pth"
    fake.write_bytes(b"")
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(fake))
    assert find_inception_weights() == fake


def test_class_consistency_ci_is_a_wilson_interval_that_does_not_collapse_at_one(digits):
    from statsmodels.stats.proportion import proportion_confint

    x, y = digits
    value, low, high = class_consistency_ci(x, y)
    assert value == pytest.approx(class_consistency(x, y))
    hits = round(value * len(x))
    assert (low, high) == pytest.approx(proportion_confint(hits, len(x), method="wilson"))
    assert low <= value <= high
    if hits == len(x):  # every sample right: the interval still admits a miss
        assert low < 1.0 and high == pytest.approx(1.0)
    wrong = class_consistency_ci(x, (y + 1) % 10)
    assert wrong[1] <= wrong[0] < wrong[2] < low  # 0 hits: the interval starts at 0 and still admits some
