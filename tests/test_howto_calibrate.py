"""docs/howto/calibrate-pipeline.md runs offline end to end, as written, on the shipped digits pipeline."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from pathlib import Path

from qdrift_stats.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "howto" / "calibrate-pipeline.md"


def blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(bash|python)\n(.*?)```", text, re.S)]


def test_the_calibrate_pipeline_howto_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.symlink(ROOT / "data", tmp_path / "data")
    (tmp_path / "labels.txt").write_text("3 7\n")  # the page's labels.txt
    found = blocks(PAGE.read_text())
    assert [kind for kind, _ in found] == ["bash", "python"]
    namespace: dict = {}
    for kind, code in found:
        if kind == "bash":
            for command in code.replace("\\\n", " ").splitlines():
                args = shlex.split(command)
                assert args[0] == "qdrift"
                err = io.StringIO()
                with contextlib.redirect_stderr(err):
                    assert main(args[1:]) == 0, err.getvalue()
                if args[1] == "calibrate":  # progress: one line per run
                    assert "run 1/2 (seed 0) done" in err.getvalue() and "run 2/2 (seed 1) done" in err.getvalue()
        else:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(code, str(PAGE), "exec"), namespace)
            assert "full-precision model's output" in out.getvalue()
    assert namespace["images"].shape == (2, 1, 8, 8)
    # the Python calibration wrote the same store as the command line (same seeds, same twin)
    from qdrift_stats.record.store import open_store

    a, b = open_store(tmp_path / "calib.zarr").load(), open_store(tmp_path / "calib_py.zarr").load()
    for name in ("delta_x", "delta_out", "out_fp"):
        assert (a[name].values == b[name].values).all()
