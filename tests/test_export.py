import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qdrift_stats.correct.estimator_file import EstimatorFile, interpolate_log_b
from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators import EmpiricalEstimator
from qdrift_stats.loop import prepared_scheduler
from qdrift_stats.schedulers.base import step_grid


def test_round_trip_keeps_tensors_and_metadata(tmp_path, small_store):
    fitted = EmpiricalEstimator().fit(small_store)
    path = tmp_path / "est.safetensors"
    fitted.export(path, correction="shrink", strength=0.5, provenance={"recipe": "w4a8"})
    est = EstimatorFile.load(path)
    np.testing.assert_array_equal(est.variance, fitted.variance)
    meta = est.metadata
    assert meta["format"] == "qdrift-estimator" and meta["format_version"] == 1
    assert meta["scheduler"]["name"] == "euler" and meta["steps"] == 8 and meta["num_runs"] == 3
    assert meta["estimator"]["name"] == "empirical" and meta["correction"] == {"form": "shrink", "strength": 0.5}
    assert meta["provenance"]["recipe"] == "w4a8" and meta["provenance"]["seeds"] == [0, 1, 2]


def test_existing_file_is_not_overwritten_without_being_asked(tmp_path, small_store):
    fitted = EmpiricalEstimator().fit(small_store)
    path = tmp_path / "est.safetensors"
    fitted.export(path)
    with pytest.raises(QDriftError, match="--overwrite"):
        fitted.export(path)
    fitted.export(path, overwrite=True)


def test_estimator_for_another_grid_or_scheduler_is_refused(tmp_path, small_store, vp_pair):
    est = EmpiricalEstimator().fit(small_store).export(tmp_path / "e.safetensors")
    est = EstimatorFile.load(tmp_path / "e.safetensors")
    with pytest.raises(QDriftError, match="fitted for euler with 8 steps.*9 steps"):
        est.corrector(prepared_scheduler(vp_pair, "euler", 9))
    with pytest.raises(QDriftError, match="fitted for scheduler euler, not ddim"):
        est.corrector(prepared_scheduler(vp_pair, "ddim", 8))
    est.corrector(prepared_scheduler(vp_pair, "euler", 8))


def test_smooth_estimator_is_interpolated_and_says_so(tmp_path, small_store, vp_pair):
    fitted = EmpiricalEstimator().fit(small_store)
    fitted.smooth = True
    fitted.export(tmp_path / "s.safetensors")
    est = EstimatorFile.load(tmp_path / "s.safetensors")
    grid = step_grid(prepared_scheduler(vp_pair, "euler", 16))
    v = est.variance_on(grid)
    assert v.shape == (16,) and np.all(v[grid.b_next > 0] > 0) and v[-1] == 0
    assert any("interpolated from 8 to 16 steps" in n for n in est.notes)


def test_log_b_interpolation_is_exact_on_a_power_law():
    b_from = np.array([4.0, 2.0, 1.0, 0.5, 0.0])
    values = 0.1 * b_from**3
    b_to = np.array([3.0, 1.5, 0.7, 0.0])
    np.testing.assert_allclose(interpolate_log_b(b_from, values, b_to), 0.1 * b_to**3, rtol=1e-12)


@pytest.mark.parametrize(
    "tensors,metadata,match",
    [
        ({"variance": torch.zeros(3)}, None, "no valid 'qdrift' metadata"),
        ({"variance": torch.zeros(3)}, {"qdrift": json.dumps({"format": "other"})}, "not a qdrift estimator file"),
        (
            {"variance": torch.zeros(3)},
            {"qdrift": json.dumps({"format": "qdrift-estimator", "format_version": 99})},
            "format version 99",
        ),
        (
            {"variance": torch.zeros(3)},
            {"qdrift": json.dumps({"format": "qdrift-estimator", "format_version": 1})},
            "lacks the tensors",
        ),
        ({"variance": torch.zeros(3)}, {"qdrift": "{not json"}, "no valid 'qdrift' metadata"),
    ],
)
def test_malformed_estimator_files_get_one_line_errors(tmp_path, tensors, metadata, match):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(QDriftError, match=match):
        EstimatorFile.load(path)


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    path = tmp_path / "pickle.safetensors"
    path.write_bytes(b"\x80\x04\x95not a safetensors file")
    with pytest.raises(QDriftError, match="not a readable safetensors file"):
        EstimatorFile.load(path)
