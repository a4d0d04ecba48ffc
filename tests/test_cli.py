"""The command line, run in-process through ``main`` (the console script's entry point)."""

import subprocess
import sys

import numpy as np
import zarr

from qdrift_stats.cli import main

from .conftest import VP_PAIR


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def record_args(out, scheduler="euler", steps=6, pair=VP_PAIR):
    return [
        "record",
        "--pair",
        pair,
        "--scheduler",
        scheduler,
        "--steps",
        str(steps),
        "--runs",
        "2",
        "--batch",
        "8",
        "--seed",
        "0",
        "--out",
        str(out),
    ]


def test_record_fit_sample_chain(tmp_path, capsys):
    store, est, out = tmp_path / "c.zarr", tmp_path / "e.safetensors", tmp_path / "s.npy"
    code, text, _ = run(capsys, *record_args(store))
    assert code == 0 and "recorded 2 runs" in text
    code, text, _ = run(capsys, "fit", str(store), "--out", str(est), "--correction", "shrink")
    assert code == 0 and "wrote" in text and "persistent" in text
    code, text, _ = run(
        capsys,
        "sample",
        "--pair",
        VP_PAIR,
        "--scheduler",
        "euler",
        "--steps",
        "6",
        "--num-samples",
        "10",
        "--batch",
        "4",
        "--seed",
        "3",
        "--model",
        "q",
        "--estimator",
        str(est),
        "--out",
        str(out),
    )
    assert code == 0
    samples = np.load(out)
    assert samples.shape == (10, 8) and samples.dtype == np.float32 and np.all(np.isfinite(samples))


def one_line_error(code, err, match):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qdrift: error:") and match in lines[0], err
    assert "Traceback" not in err


def test_unknown_scheduler(tmp_path, capsys):
    one_line_error(*run(capsys, *record_args(tmp_path / "x.zarr", scheduler="kdpm2"))[::2], "unknown scheduler 'kdpm2'")


def test_pair_without_fp(tmp_path, capsys):
    one_line_error(
        *run(capsys, *record_args(tmp_path / "x.zarr", pair="qdrift_stats.testbed:default_mixture"))[::2],
        "no callable 'fp",
    )


def test_pair_that_cannot_be_imported(tmp_path, capsys):
    one_line_error(
        *run(capsys, *record_args(tmp_path / "x.zarr", pair="no_such_module:f"))[::2], "cannot import pair module"
    )


def test_store_of_another_schema(tmp_path, capsys):
    bogus = tmp_path / "other.zarr"
    zarr.open_group(bogus, mode="w").attrs["qdrift_schema_version"] = 99
    one_line_error(
        *run(capsys, "fit", str(bogus), "--out", str(tmp_path / "e.safetensors"))[::2], "not a qdrift calibration store"
    )
    g = zarr.open_group(bogus, mode="r+")
    g.attrs["qdrift_schema"] = "qdrift-calibration"
    one_line_error(*run(capsys, "fit", str(bogus), "--out", str(tmp_path / "e.safetensors"))[::2], "schema version 99")


def test_missing_store(tmp_path, capsys):
    one_line_error(
        *run(capsys, "fit", str(tmp_path / "none.zarr"), "--out", str(tmp_path / "e.safetensors"))[::2],
        "does not exist",
    )


def test_estimator_for_another_step_grid(tmp_path, capsys):
    store, est = tmp_path / "c.zarr", tmp_path / "e.safetensors"
    assert run(capsys, *record_args(store))[0] == 0
    assert run(capsys, "fit", str(store), "--out", str(est), "-q")[0] == 0
    code, _, err = run(
        capsys,
        "sample",
        "--pair",
        VP_PAIR,
        "--scheduler",
        "euler",
        "--steps",
        "7",
        "--num-samples",
        "4",
        "--batch",
        "4",
        "--seed",
        "0",
        "--model",
        "q",
        "--estimator",
        str(est),
        "--out",
        str(tmp_path / "s.npy"),
    )
    one_line_error(code, err, "fitted for euler with 6 steps")
    assert not (tmp_path / "s.npy").exists()


def test_non_finite_value_in_a_recording(tmp_path, capsys):
    code, _, err = run(capsys, *record_args(tmp_path / "nan.zarr", pair="tests.nan_pair:nan_pair"))
    one_line_error(code, err, "non-finite")


def test_wrong_flag_value_is_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "record", "--pair", VP_PAIR, "--scheduler", "euler", "--steps", "many")
    one_line_error(code, err, "'many' is not a valid integer")


def test_output_is_not_overwritten_without_being_asked(tmp_path, capsys):
    out = tmp_path / "s.npy"
    np.save(out, np.zeros(3))
    code, _, err = run(
        capsys,
        "sample",
        "--pair",
        VP_PAIR,
        "--scheduler",
        "euler",
        "--steps",
        "3",
        "--num-samples",
        "2",
        "--batch",
        "2",
        "--seed",
        "0",
        "--model",
        "fp",
        "--out",
        str(out),
    )
    one_line_error(code, err, "exists")
    assert np.array_equal(np.load(out), np.zeros(3))


def test_console_script_exits_2_on_bad_input(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qdrift_stats.cli",
            "record",
            "--pair",
            VP_PAIR,
            "--scheduler",
            "bogus",
            "--steps",
            "3",
            "--runs",
            "1",
            "--batch",
            "1",
            "--seed",
            "0",
            "--out",
            str(tmp_path / "x.zarr"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "unknown scheduler" in proc.stderr


def test_json_output_for_scripting(tmp_path, capsys):
    import json

    store, est, out = tmp_path / "c.zarr", tmp_path / "e.safetensors", tmp_path / "s.npy"
    code, text, _ = run(capsys, *record_args(store), "--json")
    assert code == 0 and json.loads(text)["seeds"] == [0, 1]
    code, text, _ = run(capsys, "fit", str(store), "--out", str(est), "--json")
    fitted = json.loads(text)
    assert code == 0 and fitted["steps"] == 6 and len(fitted["variance"]) == 6 and fitted["num_runs"] == 2
    code, text, _ = run(
        capsys,
        "sample",
        "--pair",
        VP_PAIR,
        "--scheduler",
        "euler",
        "--steps",
        "6",
        "--num-samples",
        "3",
        "--batch",
        "3",
        "--seed",
        "0",
        "--model",
        "q",
        "--estimator",
        str(est),
        "--out",
        str(out),
        "--json",
    )
    assert code == 0 and json.loads(text)["shape"] == [3, 8] and np.load(out).shape == (3, 8)


def test_help_shows_an_example_for_each_verb(capsys):
    for verb in ("record", "fit", "sample", "demo", "diagnose", "cv", "plot"):
        code, out, _ = run(capsys, verb, "--help")
        assert code == 0 and "Example:" in out and f"qdrift {verb}" in out
