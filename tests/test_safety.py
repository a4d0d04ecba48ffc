"""Issue 15: each data-loss, code-from-data and crash case, reproduced, with its clean outcome.

Every case runs the command line in-process (``main``), the way a user meets it, and checks the
exit code (2 for bad input, one ``qdrift: error:`` line, no traceback) and what happened to the
files around it.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
import zarr

from qdrift_stats import testbed
from qdrift_stats.cli import main
from qdrift_stats.correct.estimator_file import EstimatorFile
from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators import ESTIMATORS, get_estimator
from qdrift_stats.outputs import atomic_output, check_output, is_own_output
from qdrift_stats.record.lockstep import record

from .conftest import VP_PAIR

STEPS = 3


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *args, match: str | None = None) -> str:
    """Run; assert exit 2 with exactly one error line and no traceback; return that line."""
    code, _, err = run(capsys, *args)
    lines = [line for line in err.splitlines() if line.startswith("qdrift:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    if match:
        assert match in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if not p.is_dir() or p.is_symlink()
    }


def strays(folder: Path) -> list[str]:
    """Temporary siblings left behind."""
    return [p.name for p in folder.rglob("*") if ".qdrift-tmp-" in p.name or p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    folder = tmp_path_factory.mktemp("safety")
    pair = testbed.mixture_vp_noise()
    two, one = folder / "two.zarr", folder / "one.zarr"
    record(pair, two, pair_name=VP_PAIR, scheduler_name="euler", steps=STEPS, runs=2, batch_size=4, seed=0)
    record(pair, one, pair_name=VP_PAIR, scheduler_name="euler", steps=STEPS, runs=1, batch_size=4, seed=0)
    est = folder / "est.safetensors"
    get_estimator("empirical").fit(two).export(est)
    return {"two": two, "one": one, "est": est}


def copy_store(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def sample_args(out, *extra, steps=STEPS, pair=VP_PAIR):
    return [
        "sample",
        "--pair",
        pair,
        "--scheduler",
        "euler",
        "--steps",
        steps,
        "--num-samples",
        4,
        "--batch",
        2,
        "--seed",
        0,
        "--model",
        "q",
        "--out",
        out,
        "--quiet",
        *extra,
    ]


# ---- data loss -------------------------------------------------------------------------------


def test_record_overwrite_never_deletes_a_foreign_folder(tmp_path, capsys):
    project = tmp_path / "myproject"
    project.mkdir()
    (project / "thesis.tex").write_text("years of work")
    before = snapshot(tmp_path)
    args = ["record", "--pair", VP_PAIR, "--scheduler", "euler", "--steps", 2, "--runs", 1, "--batch", 2]
    refused(capsys, *args, "--seed", 0, "--out", project, "--overwrite", match="not a qdrift calibration store")
    refused(capsys, *args, "--seed", 0, "--out", project, match="not a qdrift calibration store")
    assert (project / "thesis.tex").read_text() == "years of work"
    assert snapshot(tmp_path) == before


def test_record_overwrite_replaces_its_own_store(tmp_path, capsys, stores):
    store = copy_store(stores["two"], tmp_path / "s.zarr")
    args = ["record", "--pair", VP_PAIR, "--scheduler", "euler", "--steps", 2, "--runs", 1, "--batch", 2]
    code, _, err = run(capsys, *args, "--seed", 5, "--out", store, "--overwrite", "--quiet")
    assert code == 0, err
    assert list(zarr.open_group(store, mode="r")["seed"][:]) == [5]


def test_diagnose_and_cv_refuse_to_write_over_their_input(tmp_path, capsys, stores):
    store = copy_store(stores["two"], tmp_path / "s.zarr")
    before = snapshot(tmp_path)
    refused(capsys, "diagnose", store, "--out", store, "--overwrite", match="input")
    refused(capsys, "diagnose", store, "--out", store / "inner.zarr", match="input")
    refused(capsys, "cv", store, "--out", store, "--overwrite", "--no-strength", match="input")
    refused(capsys, "fit", store, "--out", store, "--overwrite", match="input")
    assert snapshot(tmp_path) == before
    # ... and the store still fits
    assert run(capsys, "fit", store, "--out", tmp_path / "e.safetensors", "-q")[0] == 0


def test_fit_overwrite_of_another_store_is_refused_and_leaves_no_stray_tmp(tmp_path, capsys, stores):
    other = copy_store(stores["one"], tmp_path / "other.zarr")
    before = snapshot(tmp_path)
    refused(capsys, "fit", stores["two"], "--out", other, "--overwrite", match="not a qdrift estimator file")
    assert snapshot(tmp_path) == before and not strays(tmp_path)


def test_fit_overwrite_replaces_its_own_file_atomically(tmp_path, capsys, stores):
    est = tmp_path / "e.safetensors"
    assert run(capsys, "fit", stores["two"], "--out", est, "-q")[0] == 0
    refused(capsys, "fit", stores["two"], "--out", est, match="--overwrite")
    assert run(capsys, "fit", stores["two"], "--out", est, "-q", "--overwrite", "--strength", "0.5")[0] == 0
    assert EstimatorFile.load(est).metadata["correction"]["strength"] == 0.5
    assert not strays(tmp_path)


@pytest.mark.parametrize("verb", ["sample", "plot", "fit"])
def test_no_output_follows_a_symlink(tmp_path, capsys, stores, verb):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link = tmp_path / ("out.npy" if verb == "sample" else "out.png" if verb == "plot" else "out.safetensors")
    link.symlink_to(target)
    if verb == "sample":
        args = sample_args(link, "--overwrite")
    elif verb == "plot":
        args = ["plot", "variance", stores["est"], "--out", link, "--overwrite"]
    else:
        args = ["fit", stores["two"], "--out", link, "--overwrite"]
    refused(capsys, *args, match="symbolic link")
    assert target.read_text() == "keep me" and link.is_symlink()


def test_sample_checks_its_output_folder_before_sampling(tmp_path, capsys, monkeypatch):
    import qdrift_stats.correct.sample as sample_module

    def must_not_run(*args, **kwargs):
        raise AssertionError("sampled before the output was checked")

    monkeypatch.setattr(sample_module, "sample", must_not_run)
    refused(capsys, *sample_args(tmp_path / "nodir" / "x.npy"), match="does not exist")
    refused(capsys, *sample_args("."), match="names a folder")


def test_sample_overwrite_replaces_only_an_npy(tmp_path, capsys):
    notes = tmp_path / "notes.npy"
    notes.write_text("not an array")
    refused(capsys, *sample_args(notes, "--overwrite"), match="not a NumPy .npy file")
    assert notes.read_text() == "not an array"
    out = tmp_path / "s.npy"
    assert run(capsys, *sample_args(out))[0] == 0
    assert run(capsys, *sample_args(out, "--overwrite"))[0] == 0
    assert np.load(out).shape == (4, 8) and not strays(tmp_path)


def test_outputs_are_written_0644_not_0600(tmp_path, capsys, stores):
    old = os.umask(0o022)
    try:
        est, npy, png = tmp_path / "e.safetensors", tmp_path / "s.npy", tmp_path / "v.png"
        assert run(capsys, "fit", stores["two"], "--out", est, "-q")[0] == 0
        assert run(capsys, *sample_args(npy))[0] == 0
        assert run(capsys, "plot", "variance", est, "--out", png)[0] == 0
        for path in (est, npy, png):
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    finally:
        os.umask(old)


def test_a_failed_write_leaves_the_old_output_and_no_temporary(tmp_path):
    out = tmp_path / "a.npy"
    np.save(out, np.arange(3))
    with pytest.raises(RuntimeError), atomic_output(out, "npy") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk gone")
    assert np.load(out).tolist() == [0, 1, 2] and not strays(tmp_path)


def test_full_or_read_only_disk_is_one_line_exit_2(tmp_path, capsys, stores, monkeypatch):
    import qdrift_stats.correct.estimator_file as ef

    for code_ in (errno.ENOSPC, errno.EROFS):

        def failing_save(tensors, filename, metadata=None, _code=code_):
            Path(filename).write_bytes(b"partial")
            raise OSError(_code, os.strerror(_code), filename)

        monkeypatch.setattr(ef, "save_file", failing_save)
        line = refused(capsys, "fit", stores["two"], "--out", tmp_path / "e.safetensors", "-q")
        assert os.strerror(code_) in line
        assert not list(tmp_path.iterdir())


def test_output_in_a_read_only_folder_is_refused_before_work(tmp_path, monkeypatch):
    # (root ignores permission bits, so the check is exercised through os.access)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(QDriftError, match="cannot write in the folder"):
        check_output(tmp_path / "x.npy", "npy")


def test_own_output_recognition(tmp_path, stores):
    assert is_own_output(stores["two"], "store") and not is_own_output(stores["two"], "cv")
    assert is_own_output(stores["est"], "estimator") and not is_own_output(stores["est"], "npy")
    (tmp_path / "fake.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    assert not is_own_output(tmp_path / "fake.safetensors", "estimator")
    assert not is_own_output(tmp_path, "store")


# ---- no code from data -------------------------------------------------------------------------


@pytest.fixture
def evil_store(tmp_path, stores, monkeypatch):
    """A store whose 'pair' attribute names a module that leaves a mark when imported or called."""
    mark = tmp_path / "EXECUTED"
    (tmp_path / "evil_pairs.py").write_text(
        f"from pathlib import Path\nPath({str(mark)!r}).write_text('imported')\n"
        f"def pair():\n    Path({str(mark)!r}).write_text('called')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    store = copy_store(stores["two"], tmp_path / "evil.zarr")
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    group.attrs["pair"] = "evil_pairs:pair"
    zarr.consolidate_metadata(store)
    return store, mark


def test_cv_never_imports_the_pair_named_by_the_store(evil_store, tmp_path, capsys):
    store, mark = evil_store
    code, out, err = run(capsys, "cv", store, "--out", tmp_path / "cv.zarr", "--splits", 2)
    assert code == 0, err
    assert "strength by CV: skipped (no pair given" in out and "pass --pair" in out
    line = refused(capsys, "cv", store, "--out", tmp_path / "cv2.zarr", "--splits", 2, "--strength")
    assert "--pair" in line and "evil_pairs:pair" in line  # says which pair to pass
    assert not mark.exists()


def test_moment_fit_never_imports_the_pair_named_by_the_store(evil_store, tmp_path, capsys):
    store, mark = evil_store
    line = refused(capsys, "fit", store, "--out", tmp_path / "m.safetensors", "--estimator", "moment")
    assert "pass --pair" in line
    code, _, err = run(
        capsys, "fit", store, "--out", tmp_path / "m.safetensors", "--estimator", "moment", "--pair", VP_PAIR, "-q"
    )
    assert code == 0, err
    assert not mark.exists()


def test_plot_accumulation_needs_the_pair_on_the_command_line(evil_store, tmp_path, capsys, stores):
    store, mark = evil_store
    refused(capsys, "plot", "accumulation", store, "--estimator", stores["est"], "--out", tmp_path / "a.png")
    assert not mark.exists()


def test_a_store_naming_os_abort_is_never_called(tmp_path, capsys, stores):
    """The issue's case: a store whose pair is ``os:abort`` killed the process in ``cv`` (its default
    strength search) and ``fit --estimator moment``. Were it called, this test process would die."""
    store = copy_store(stores["two"], tmp_path / "abort.zarr")
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    group.attrs["pair"] = "os:abort"
    zarr.consolidate_metadata(store)
    code, out, err = run(capsys, "cv", store, "--out", tmp_path / "cv.zarr", "--splits", 2)
    assert code == 0, err
    assert "strength by CV: skipped (no pair given" in out and "os:abort" in out
    line = refused(capsys, "fit", store, "--out", tmp_path / "m.safetensors", "--estimator", "moment")
    assert "pass --pair" in line and "os:abort" in line
    assert not (tmp_path / "m.safetensors").exists()


# ---- crashes that are now one line ------------------------------------------------------------

ONE_RUN_ESTIMATORS = [name for name in ESTIMATORS if name not in ("moment", "auto")]  # these two need --pair


@pytest.mark.parametrize("name", ONE_RUN_ESTIMATORS)
def test_one_run_store_fits_with_nan_intervals_and_says_why(name, tmp_path, capsys, stores):
    out = tmp_path / "e.safetensors"
    code, text, err = run(capsys, "fit", stores["one"], "--out", out, "--estimator", name)
    assert code == 0, err
    est = EstimatorFile.load(out)
    assert np.all(np.isfinite(est.variance))
    if np.isnan(est.tensors["ci_low"]).all():
        assert "needs at least 2" in text


def test_one_run_json_states_the_interval_reason(tmp_path, capsys, stores):
    code, out, _ = run(capsys, "fit", stores["one"], "--out", tmp_path / "e.safetensors", "--json")
    data = json.loads(out)
    assert code == 0 and all(v is None for v in data["ci_low"]) and "at least 2" in data["interval_note"]


def test_out_dot_is_refused_everywhere(capsys, stores, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(capsys, "fit", stores["two"], "--out", ".")
    refused(capsys, "diagnose", stores["two"], "--out", ".")
    refused(capsys, "cv", stores["two"], "--out", ".", "--no-strength")
    refused(capsys, "plot", "variance", stores["est"], "--out", ".")
    refused(capsys, "record", "--pair", VP_PAIR, "--scheduler", "euler", "--steps", 2, "--runs", 1, "--batch", 1)
    refused(capsys, *sample_args("."))


MY_PAIRS = """
from qdrift_stats import testbed

def my_pair():
    return testbed.mixture_vp_noise()

def needs_weights():
    open("weights/unet.safetensors", "rb")
"""


def test_pair_from_a_file_path_and_from_the_current_folder(tmp_path, capsys, monkeypatch):
    (tmp_path / "my_pairs.py").write_text(MY_PAIRS)
    monkeypatch.chdir(tmp_path)
    base = ["record", "--scheduler", "euler", "--steps", 2, "--runs", 1, "--batch", 2, "--seed", 0, "--quiet"]
    code, _, err = run(capsys, *base, "--pair", "./my_pairs.py:my_pair", "--out", "a.zarr")
    assert code == 0, err
    code, _, err = run(capsys, *base, "--pair", "my_pairs:my_pair", "--out", "b.zarr")
    assert code == 0, err
    code, _, err = run(capsys, *base, "--pair", str(tmp_path / "my_pairs.py") + ":my_pair", "--out", "c.zarr")
    assert code == 0, err
    refused(capsys, *base, "--pair", "./nowhere.py:my_pair", "--out", "d.zarr", match="does not exist")
    refused(capsys, *base, "--pair", "./my_pairs.py:missing", "--out", "d.zarr", match="no callable")


def test_missing_model_file_inside_a_users_pair_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "my_pairs.py").write_text(MY_PAIRS)
    monkeypatch.chdir(tmp_path)
    line = refused(
        capsys,
        *sample_args("x.npy", pair="./my_pairs.py:needs_weights"),
        match="FileNotFoundError",
    )
    assert "weights/unet.safetensors" in line and not (tmp_path / "x.npy").exists()


def test_a_broken_pair_module_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "broken.py").write_text("def f(:\n")
    monkeypatch.chdir(tmp_path)
    refused(capsys, *sample_args("x.npy", pair="./broken.py:f"), match="SyntaxError")


def _rewrite_metadata(src: Path, dst: Path, edit) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    tensors, meta = edit(tensors, meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_deeply_nested_json_metadata_is_refused(tmp_path, capsys, stores):
    def nest(tensors, meta):  # 100000 levels: json.loads would raise RecursionError
        return tensors, {"qdrift": meta["qdrift"][:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"}

    bad = _rewrite_metadata(stores["est"], tmp_path / "deep.safetensors", nest)
    refused(capsys, *sample_args(tmp_path / "x.npy", "--estimator", bad), match="nested deeper")


@pytest.mark.parametrize(
    "strength, match",
    [('"abc"', "must be a number"), ("-1", "must be >= 0"), ("NaN", "must be finite"), ("true", "must be a number")],
)
def test_bad_strength_in_metadata_is_refused(tmp_path, capsys, stores, strength, match):
    def edit(tensors, meta):
        data = json.loads(meta["qdrift"])
        data["correction"]["strength"] = "__S__"
        return tensors, {"qdrift": json.dumps(data).replace('"__S__"', strength)}

    bad = _rewrite_metadata(stores["est"], tmp_path / "s.safetensors", edit)
    refused(capsys, *sample_args(tmp_path / "x.npy", "--estimator", bad), match=match)


@pytest.mark.parametrize(
    "name, value, match",
    [
        ("k", np.nan, "'k' must be finite"),
        ("k", 1e300, "'k' must be finite"),
        ("k", np.inf, "'k' must be finite"),
        ("k", -1.0, "1 + k > 0"),
        ("k", -2.0, "1 + k > 0"),
        ("mu", np.nan, "'mu' must be finite"),
        ("mu", 1e300, "'mu' must be finite"),
        ("timesteps", np.nan, "'timesteps' must be finite"),
        ("b_next", np.inf, "'b_next' must be finite"),
    ],
)
def test_unchecked_estimator_tensors_are_refused(tmp_path, capsys, stores, name, value, match):
    import torch

    def edit(tensors, meta):
        tensors = dict(tensors)
        tensors[name] = torch.full((STEPS,), value, dtype=torch.float64)
        return tensors, meta

    bad = _rewrite_metadata(stores["est"], tmp_path / "t.safetensors", edit)
    refused(capsys, *sample_args(tmp_path / "x.npy", "--estimator", bad), match=match)
    assert not (tmp_path / "x.npy").exists()


def test_per_channel_shape_mismatches_are_refused(tmp_path, capsys, stores):
    import torch

    def k_wrong(tensors, meta):  # k per channel (3) against a per-channel variance of 8
        tensors = dict(tensors)
        for key in ("variance", "ci_low", "ci_high"):
            tensors[key] = torch.full((STEPS, 8), 0.01, dtype=torch.float64)
        tensors["k"] = torch.zeros((STEPS, 3), dtype=torch.float64)
        return tensors, meta

    bad = _rewrite_metadata(stores["est"], tmp_path / "k.safetensors", k_wrong)
    refused(capsys, *sample_args(tmp_path / "x.npy", "--estimator", bad), match="'k'")

    def channels_wrong(tensors, meta):  # per-channel estimator of 3 channels, samples have 8
        tensors = dict(tensors)
        for key in ("variance", "ci_low", "ci_high"):
            tensors[key] = torch.full((STEPS, 3), 0.01, dtype=torch.float64)
        return tensors, meta

    bad = _rewrite_metadata(stores["est"], tmp_path / "c.safetensors", channels_wrong)
    refused(capsys, *sample_args(tmp_path / "y.npy", "--estimator", bad), match="3 channels")
    assert not (tmp_path / "y.npy").exists()


def test_negative_strength_is_refused_at_write_time(tmp_path, capsys, stores):
    refused(capsys, "fit", stores["two"], "--out", tmp_path / "e.safetensors", "--strength", "-1")
    assert not list(tmp_path.iterdir())
    fitted = get_estimator("empirical").fit(stores["two"])
    with pytest.raises(QDriftError, match="strength"):
        fitted.export(tmp_path / "e.safetensors", strength=-1.0)
    est = EstimatorFile.from_fitted(fitted)
    est.metadata["correction"]["strength"] = "abc"
    with pytest.raises(QDriftError, match="strength"):
        est.save(tmp_path / "e.safetensors")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "options, match",
    [
        ({"correction": "xyz"}, "correction"),
        ({"strength": "abc"}, "strength"),
        ({"strength": -1}, "strength"),
        ({"estimator_file": "../../etc/passwd"}, "estimator_file"),
        ({"wrapped_class": ["x"]}, "wrapped_class"),
        ({"model": {"a": 1}}, "model"),
    ],
)
def test_malformed_wrapper_options_are_refused(tmp_path, stores, options, match):
    from diffusers import EulerDiscreteScheduler

    from qdrift_stats.correct.diffusers import WRAPPER_CONFIG_NAME, QDriftScheduler
    from qdrift_stats.loop import prepared_scheduler

    scheduler = prepared_scheduler(testbed.mixture_vp_noise(), "euler", STEPS)
    wrapped = QDriftScheduler(EulerDiscreteScheduler.from_config(scheduler.config), stores["est"])
    wrapped.save_pretrained(tmp_path / "s")
    path = tmp_path / "s" / WRAPPER_CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **options}))
    with pytest.raises(QDriftError, match=match):
        QDriftScheduler.from_pretrained(tmp_path / "s")


@pytest.mark.parametrize("text", ["[" * 50_000 + "]" * 50_000, "[1, 2]", "not json", '"x" * 3'])
def test_wrapper_options_not_a_json_object_are_refused(tmp_path, stores, text):
    from diffusers import EulerDiscreteScheduler

    from qdrift_stats.correct.diffusers import WRAPPER_CONFIG_NAME, QDriftScheduler
    from qdrift_stats.loop import prepared_scheduler

    scheduler = prepared_scheduler(testbed.mixture_vp_noise(), "euler", STEPS)
    QDriftScheduler(EulerDiscreteScheduler.from_config(scheduler.config), stores["est"]).save_pretrained(tmp_path / "s")
    (tmp_path / "s" / WRAPPER_CONFIG_NAME).write_text(text)
    with pytest.raises(QDriftError):
        QDriftScheduler.from_pretrained(tmp_path / "s")


def test_deeply_nested_store_attribute_is_one_line(tmp_path, capsys, stores):
    store = copy_store(stores["two"], tmp_path / "deep.zarr")
    meta = store / "zarr.json"
    text = meta.read_text()
    meta.write_text(
        text.replace('"attributes": {', '"attributes": {"deep": ' + "[" * 100_000 + "]" * 100_000 + ", ", 1)
    )
    refused(capsys, "fit", store, "--out", tmp_path / "e.safetensors")


def test_declared_huge_variable_is_never_allocated(tmp_path, capsys, stores):
    # 10^10 float64 = 80 GB declared in a few KB: opening it would fail with MemoryError or take minutes
    store = copy_store(stores["two"], tmp_path / "bomb.zarr")
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    group.create_array("huge", shape=(10**10,), dtype="float64", chunks=(10**6,), dimension_names=("huge",))
    zarr.consolidate_metadata(store)
    code, _, err = run(capsys, "fit", store, "--out", tmp_path / "e.safetensors", "-q")
    assert code == 0, err
    # a huge declared size on a dimension the readers use is refused before allocation
    store2 = copy_store(stores["two"], tmp_path / "bomb2.zarr")
    group = zarr.open_group(store2, mode="r+", use_consolidated=False)
    del group["timestep"]
    group.create_array("timestep", shape=(10**10,), dtype="float64", chunks=(10**6,), dimension_names=("step",))
    zarr.consolidate_metadata(store2)
    refused(capsys, "fit", store2, "--out", tmp_path / "e2.safetensors", match="dimension 'step'")


# ---- provenance warnings ----------------------------------------------------------------------


def test_sample_warns_about_another_pair_and_about_correcting_fp(tmp_path, capsys, stores):
    base = sample_args(tmp_path / "a.npy", "--estimator", stores["est"])
    code, _, err = run(capsys, *base)
    assert code == 0 and "warning" not in err
    other = [a if a != VP_PAIR else "qdrift_stats.testbed:mixture_vp_gauss" for a in base]
    code, _, err = run(capsys, *[a if a != tmp_path / "a.npy" else tmp_path / "b.npy" for a in other])
    assert code == 0 and "recorded with pair" in err and "mixture_vp_noise" in err
    fp = [a if a != "q" else "fp" for a in base]
    code, _, err = run(capsys, *[a if a != tmp_path / "a.npy" else tmp_path / "c.npy" for a in fp])
    assert code == 0 and "correcting the FP model" in err
    code, out, _ = run(capsys, *[a if a != tmp_path / "a.npy" else tmp_path / "d.npy" for a in fp], "--json")
    assert any("FP model" in n for n in json.loads(out)["notes"])


def test_pair_names_that_load_the_same_file_do_not_warn(tmp_path):
    est = EstimatorFile({}, {"provenance": {"pair": "./my_pairs.py:make_pair"}})
    assert est.use_warnings(pair="my_pairs:make_pair") == []
    assert est.use_warnings(pair="other:make_pair") != []


# ---- progress ----------------------------------------------------------------------------------


def test_progress_lines_off_a_terminal_and_quiet(tmp_path, capsys):
    args = ["record", "--pair", VP_PAIR, "--scheduler", "euler", "--steps", 2, "--runs", 3, "--batch", 2, "--seed", 0]
    code, _, err = run(capsys, *args, "--out", tmp_path / "a.zarr")
    lines = [line for line in err.splitlines() if line.startswith("qdrift record: run")]
    assert code == 0 and [line.split(" done")[0] for line in lines] == [f"qdrift record: run {k}/3" for k in (1, 2, 3)]
    assert all("elapsed" in line and "ETA" in line for line in lines)
    code, _, err = run(capsys, *args, "--out", tmp_path / "b.zarr", "--quiet")
    assert code == 0 and err == ""


def test_progress_eta_is_the_mean_time_per_item_times_those_left():
    import io

    from qdrift_stats.progress import progress_lines

    ticks = iter([0.0, 2.0, 4.0, 6.0])
    stream = io.StringIO()
    assert list(progress_lines(range(3), "x", "run", stream=stream, clock=lambda: next(ticks))) == [0, 1, 2]
    assert stream.getvalue().splitlines() == [
        "x: run 1/3 done, elapsed 2.0s, ETA 4.0s",
        "x: run 2/3 done, elapsed 4.0s, ETA 2.0s",
        "x: run 3/3 done, elapsed 6.0s, ETA 0.0s",
    ]


# ---- help --------------------------------------------------------------------------------------


def test_help_lists_every_scheduler_and_imports_no_torch():
    import subprocess
    import sys

    from qdrift_stats.cli import SCHEDULER_HELP
    from qdrift_stats.schedulers.base import SCHEDULER_NAMES

    assert SCHEDULER_HELP == f"One of {', '.join(SCHEDULER_NAMES)}."
    code = (
        "import sys; from qdrift_stats.cli import main; main(['--help']); print(sorted(m for m "
        "in ('torch', 'diffusers', 'xarray', 'zarr') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]")


# ---- saved pipelines reload in a fresh interpreter -------------------------------------------


def test_saved_pipeline_with_the_wrapper_reloads_in_a_fresh_interpreter(tmp_path, stores):
    import subprocess
    import sys

    from diffusers import DDIMScheduler, DiTPipeline

    from qdrift_stats.correct.diffusers import QDriftScheduler

    from .test_pipeline import tiny_dit, tiny_vae

    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(4)
    from qdrift_stats.correct.estimator_file import EstimatorFile

    wrapped = QDriftScheduler(scheduler, EstimatorFile.zeros_like_grid(scheduler), strength=0.25)
    DiTPipeline(transformer=tiny_dit(), vae=tiny_vae(), scheduler=wrapped).save_pretrained(tmp_path / "saved")
    script = (
        "import sys, warnings; warnings.simplefilter('ignore')\n"
        "from diffusers import DiffusionPipeline\n"
        "assert not any(m.startswith('qdrift_stats') for m in sys.modules)\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(tmp_path / 'saved')!r}, trust_remote_code=True)\n"
        "s = pipe.scheduler\n"
        "print(type(s).__module__, type(s).__name__, s.strength, type(s.scheduler).__name__)\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["qdrift_stats.correct.diffusers", "QDriftScheduler", "0.25", "DDIMScheduler"]
    # in a process that imported qdrift_stats, the scheduler can also be passed without trusting the folder
    loaded = QDriftScheduler.from_pretrained(tmp_path / "saved", subfolder="scheduler")
    pipe = DiTPipeline.from_pretrained(tmp_path / "saved", scheduler=loaded)
    assert isinstance(pipe.scheduler, QDriftScheduler) and pipe.scheduler.strength == 0.25


# ---- the quick start's conditional example, as written in the docs ----------------------------


def quickstart_commands(section: str) -> list[str]:
    """The indented shell commands of one section of docs/quickstart.md (continuation lines joined)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "quickstart.md").read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    commands, current = [], ""
    for line in body.splitlines():
        if not line.startswith("    ") or line.strip().startswith("#"):
            continue
        current += line.strip().rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


def test_quickstart_conditional_pair_runs_offline_as_written(tmp_path, capsys):
    import shlex
    import subprocess
    import sys

    commands = quickstart_commands("A conditional pair, offline, in your own file")
    assert len(commands) == 4 and commands[0].startswith("python -c")
    subprocess.run([sys.executable, *shlex.split(commands[0])[1:]], cwd=tmp_path, check=True)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for line in commands[1:]:
            argv = shlex.split(line)
            assert argv[0] == "qdrift"
            code = main(argv[1:])
            _, err = capsys.readouterr()
            assert code == 0, (line, err)
    finally:
        os.chdir(cwd)
    samples = np.load(tmp_path / "cond_q.npy")
    assert samples.shape == (256, 8) and np.isfinite(samples).all()


def test_conditional_example_pair_denoises_towards_the_labelled_class():
    import torch

    from qdrift_stats.examples.conditional_pair import make_pair

    pair = make_pair()
    labels = pair.conditions(6, torch.Generator().manual_seed(0))["class_labels"]
    assert labels.shape == (6,)
    # the exact model's x0 estimate is the posterior mean of the labelled class's Gaussian (analytic)
    t = torch.tensor(999.0)
    a, b = pair._levels(t)
    x = torch.zeros(6, 8, dtype=torch.float64)
    eps = pair.fp(x, t, class_labels=labels)
    x0 = (x - b * eps) / a
    means = pair.means[labels]
    gain = a * pair.std**2 / (a * a * pair.std**2 + b * b)
    assert torch.allclose(x0, means * (1 - gain * a), atol=1e-9)


# ---- Ctrl-C -----------------------------------------------------------------------------------


def test_ctrl_c_during_record_is_one_line_exit_130_and_the_store_resumes(tmp_path, capsys):
    """Ctrl-C printed zarr's "Task was destroyed" tracebacks. Now: progress lines, then
    ``qdrift: interrupted`` and exit 130; the store holds complete runs, and ``record`` extends it
    without changing them."""
    import signal
    import subprocess
    import sys

    from qdrift_stats.record.store import open_store

    out = tmp_path / "s.zarr"
    args = ["record", "--pair", VP_PAIR, "--scheduler", "euler", "--steps", "30", "--batch", "64", "--seed", "0"]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "qdrift_stats.cli", *args, "--runs", "200", "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C's default action: a test run in the background ignores SIGINT, and children inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    first = proc.stderr.readline()  # the first run's progress line: the store exists
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=300)
    lines = [line for line in (first + rest).splitlines() if line.strip()]
    assert proc.returncode == 130, lines[-5:]
    assert lines[-1] == "qdrift: interrupted", lines[-5:]
    assert all(line.startswith("qdrift record: ") for line in lines[:-1]), lines
    kept = open_store(out).load()
    done = kept.sizes["run"]
    assert 1 <= done < 200
    code, _, err = run(capsys, *args, "--runs", done + 1, "--out", out, "--quiet")
    assert code == 0, err
    resumed = open_store(out).load()
    assert list(resumed["seed"].values) == list(kept["seed"].values) + [done]  # seeds 0 .. done, each once
    np.testing.assert_array_equal(resumed["delta_x"].values[:done], kept["delta_x"].values)
