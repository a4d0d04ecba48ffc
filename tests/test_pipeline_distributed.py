"""Distributed pipeline calibration (dask.distributed, in-process LocalCluster) writes the serial store bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from qdrift_stats.record.pipelines import calibrate_pipeline
from qdrift_stats.record.store import open_store
from tests import tiny_pipelines as tiny
from tests.test_pipeline_families import _quiet_diffusers  # noqa: F401  (autouse fixture)

pytest.importorskip("distributed")


def test_distributed_pipeline_calibration_equals_the_serial_one(tmp_path):
    from qdrift_stats.record.distributed import calibrate_pipeline_distributed

    call = tiny.flux_call()
    guidance = call.pop("guidance_scale")
    common = dict(seeds=[3, 1, 2], num_inference_steps=2, guidance_scale=guidance, pipeline_kwargs=call, recipe="w4a4")
    fp, q = tiny.flux_pair()
    serial = calibrate_pipeline(fp, q, out=tmp_path / "serial.zarr", **common)
    committed = []
    distributed = calibrate_pipeline_distributed(
        "tests.tiny_pipelines:flux_pair",
        tmp_path / "dist.zarr",
        n_workers=2,
        processes=False,
        on_commit=lambda seed, done: committed.append((seed, done)),
        **common,
    )
    assert committed == [(3, 1), (1, 2), (2, 3)]  # appended in the order of the seeds asked for
    a, b = open_store(serial).load(), open_store(distributed).load()
    assert list(b["seed"].values) == [3, 1, 2]
    assert a.attrs == b.attrs
    for name in list(a.data_vars) + list(a.coords):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    # resuming adds only the missing seeds, on the cluster too
    calibrate_pipeline_distributed(
        "tests.tiny_pipelines:flux_pair",
        tmp_path / "dist.zarr",
        n_workers=1,
        processes=False,
        **{**common, "seeds": [3, 1, 2, 5]},
    )
    assert list(open_store(distributed)["seed"].values) == [3, 1, 2, 5]


def test_qdrift_calibrate_workers_writes_the_serial_store(tmp_path, monkeypatch, capsys):
    """``qdrift calibrate --workers 2`` (a LocalCluster of worker processes, each loading the shipped digits
    pipeline folder and building its w4a4 twin once) writes the store the serial command writes, bit for bit."""
    from pathlib import Path

    from qdrift_stats.cli import main

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "labels.txt").write_text("3 7\n")
    args = ["calibrate", str(root / "data" / "digits_pipeline"), "--recipe", "w4a4", "--class-labels", "labels.txt"]
    args += ["--runs", "3", "--seed", "0", "--steps", "2", "--guidance", "2.0"]
    assert main([*args, "--out", "serial.zarr", "--quiet"]) == 0
    assert main([*args, "--out", "dist.zarr", "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert [line.split(" written")[0] for line in err.splitlines() if "written" in line] == [
        f"calibrate: run {k + 1}/3 (seed {k})" for k in range(3)
    ]
    a, b = open_store(tmp_path / "serial.zarr").load(), open_store(tmp_path / "dist.zarr").load()
    for name in list(a.data_vars) + list(a.coords):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    assert a.attrs == b.attrs
    assert main([*args, "--out", "bad.zarr", "--workers", "0"]) == 2  # one line, no cluster
