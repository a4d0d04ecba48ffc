"""Property test over command-line argument combinations (hypothesis).

For any combination of verbs, valid and invalid paths, numbers, names and flags drawn below, the
command line must exit 0 or 2 (never 1: an internal error), print no traceback, print exactly one
``qdrift: error:`` line when it refuses, and change no file except its ``--out`` (and, for a
recording, the store's lock file beside it); no temporary sibling may be left behind.

Kept fast: tiny stores (2 Euler steps, batch 2), a few examples (``QDRIFT_CLI_EXAMPLES``, default
25); ``studies/robustness.py`` runs the same property with many more.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qdrift_stats import testbed
from qdrift_stats.cli import main
from qdrift_stats.estimators import get_estimator
from qdrift_stats.record.lockstep import record

from .conftest import FLOW_PAIR, VP_PAIR

EXAMPLES = int(os.environ.get("QDRIFT_CLI_EXAMPLES", "25"))

INPUTS = ["two.zarr", "one.zarr", "est.safetensors", "notes.txt", "missing.zarr", "docs", "link.npy", ".", "s.npy"]
OUTPUTS = [
    "new",
    "two.zarr",
    "docs",
    ".",
    "link.npy",
    "notes.txt",
    "nodir/x",
    "s.npy",
    "est.safetensors",
    "two.zarr/inner",
    "dirlink",
]
PAIRS = [
    VP_PAIR,
    FLOW_PAIR,
    "nope:x",
    "qdrift_stats.testbed:nothing",
    "./missing.py:f",
    "qdrift_stats.testbed:default_mixture",
    "./my_pairs.py:my_pair",
    "my_pairs:my_pair",
    "no-colon",
]
NUMBERS = ["-1", "0", "1", "2", "abc", "nan"]
SCHEDULERS = ["euler", "ddim", "flow-euler", "nope"]
ESTIMATORS = ["empirical", "first-order", "moment", "bogus", "robust", "per-channel"]
SUFFIX = {
    "record": ".zarr",
    "fit": ".safetensors",
    "sample": ".npy",
    "diagnose": ".zarr",
    "cv": ".zarr",
    "plot": ".png",
}


def build_sandbox(folder: Path) -> None:
    """The files every example starts from: two stores, an estimator, foreign files, links."""
    pair = testbed.mixture_vp_noise()
    common = dict(pair_name=VP_PAIR, scheduler_name="euler", steps=2, batch_size=2, seed=0)
    record(pair, folder / "two.zarr", runs=2, **common)
    record(pair, folder / "one.zarr", runs=1, **common)
    get_estimator("empirical").fit(folder / "two.zarr").export(folder / "est.safetensors")
    (folder / "docs").mkdir()
    (folder / "docs" / "thesis.tex").write_text("years of work")
    (folder / "notes.txt").write_text("keep me")
    (folder / "link.npy").symlink_to(folder / "notes.txt")
    (folder / "dirlink").symlink_to(folder / "docs")
    np.save(folder / "s.npy", np.zeros((2, 8), dtype=np.float32))
    (folder / "my_pairs.py").write_text(
        "from qdrift_stats import testbed\n\ndef my_pair():\n    return testbed.mixture_vp_noise()\n"
    )


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-sandbox")
    build_sandbox(folder)
    return folder


def optional(strategy, *args: str):
    """An option with a value drawn from ``strategy``, or nothing."""
    return st.one_of(st.just([]), strategy.map(lambda v: [*args, v]))


def usually(strategy, *args: str):
    """A required option: present 9 times in 10 (so that some command lines are complete)."""
    return st.tuples(st.integers(0, 9), strategy).map(lambda t: [*args, t[1]] if t[0] else [])


def flags(*names: str):
    return st.lists(st.sampled_from(names), unique=True)


@st.composite
def out_path(draw, verb: str) -> str:
    base = draw(st.sampled_from(OUTPUTS))
    return base + SUFFIX[verb] if base in ("new", "nodir/x") else base


@st.composite
def command(draw) -> list[str]:
    verb = draw(st.sampled_from(list(SUFFIX)))
    out = draw(usually(out_path(verb), "--out"))
    pick = st.sampled_from
    if verb == "record":
        args = [
            *draw(usually(pick(PAIRS), "--pair")),
            *draw(usually(pick(SCHEDULERS), "--scheduler")),
            *draw(usually(pick(["1", "2", "0", "-1", "x"]), "--steps")),
            *draw(usually(pick(["1", "2", "0", "-1"]), "--runs")),
            *draw(usually(pick(["1", "2", "0"]), "--batch")),
            *draw(usually(pick(["0", "-1", "abc"]), "--seed")),
            *draw(optional(pick(["float32", "float16", "int8"]), "--dtype")),
            *draw(flags("--overwrite", "--quiet", "--json", "--trajectories")),
        ]
    elif verb == "fit":
        args = [
            *draw(usually(pick(INPUTS))),
            *draw(optional(pick(ESTIMATORS), "--estimator")),
            *draw(optional(pick(["drift", "shrink", "x"]), "--correction")),
            *draw(optional(pick(NUMBERS), "--strength")),
            *draw(optional(pick(PAIRS), "--pair")),
            *draw(flags("--overwrite", "--quiet", "--json")),
        ]
    elif verb == "sample":
        args = [
            *draw(usually(pick(PAIRS), "--pair")),
            *draw(usually(pick(SCHEDULERS), "--scheduler")),
            *draw(usually(pick(["1", "2", "3", "0", "-1"]), "--steps")),
            *draw(usually(pick(["1", "3", "0", "-1"]), "--num-samples")),
            *draw(usually(pick(["1", "2", "0"]), "--batch")),
            *draw(usually(pick(["0", "5"]), "--seed")),
            *draw(usually(pick(["fp", "q", "x"]), "--model")),
            *draw(optional(pick(INPUTS), "--estimator")),
            *draw(optional(pick(NUMBERS), "--strength")),
            *draw(flags("--overwrite", "--quiet", "--json")),
        ]
    elif verb == "diagnose":
        args = [*draw(usually(pick(INPUTS))), *draw(flags("--overwrite", "--json"))]
    elif verb == "cv":
        args = [
            *draw(usually(pick(INPUTS))),
            *draw(optional(pick(["empirical", "moment", "bogus"]), "--estimator")),
            *draw(optional(pick(["1", "2", "0"]), "--splits")),
            *draw(optional(pick(["--strength", "--no-strength"]))),
            *draw(optional(pick(PAIRS), "--pair")),
            "--samples",
            "8",
            *draw(flags("--overwrite", "--quiet", "--json")),
        ]
    else:
        args = [
            *draw(usually(pick(["variance", "diagnostics", "runs-needed", "accumulation", "nope"]))),
            *draw(usually(pick(INPUTS))),
            *draw(optional(pick(INPUTS), "--estimator")),
            *draw(optional(pick(PAIRS), "--pair")),
            *draw(optional(pick(["empirical", "bogus"]), "--fit")),
            *draw(flags("--overwrite")),
        ]
    return [verb, *args, *out]


def snapshot(folder: Path) -> dict[str, tuple]:
    found = {}
    for p in folder.rglob("*"):
        st_ = p.lstat()
        if p.is_symlink():
            found[str(p.relative_to(folder))] = ("link", os.readlink(p))
        elif p.is_file():
            found[str(p.relative_to(folder))] = (st_.st_size, st_.st_mtime_ns, st_.st_mode)
    return found


def allowed_changes(argv: list[str]) -> list[str]:
    if "--out" not in argv[:-1]:
        return []
    out = argv[argv.index("--out") + 1]
    return [out, out + ".lock"]


def check_one(argv: list[str], folder: Path) -> tuple[int, str]:
    """Run one command in ``folder``; assert the property; return the exit code and the error line."""
    import contextlib
    import io

    before = snapshot(folder)
    cwd = os.getcwd()
    out, errors_ = io.StringIO(), io.StringIO()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(errors_):
            code = main(list(argv))
    finally:
        os.chdir(cwd)
    err = errors_.getvalue()
    assert code in (0, 2), (argv, err)
    assert "Traceback" not in err, (argv, err)
    errors = [line for line in err.splitlines() if line.startswith("qdrift: ")]
    others = [
        line
        for line in err.splitlines()
        if not line.startswith(("qdrift: ", "warning: ", "note: ", f"qdrift {argv[0]}: "))
    ]
    assert not others, (argv, err)
    assert len(errors) == (1 if code == 2 else 0), (argv, err)
    after = snapshot(folder)
    allowed = allowed_changes(argv)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    outside = {k for k in changed if not any(k == a or k.startswith(a.rstrip("/") + "/") for a in allowed)}
    assert not outside, (argv, sorted(outside))
    assert not [k for k in after if ".qdrift-tmp-" in k], (argv, after)
    return code, errors[0] if errors else ""


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
@given(argv=command())
def test_cli_exits_0_or_2_with_one_line_and_touches_only_its_output(argv, sandbox):
    with tempfile.TemporaryDirectory() as tmp:
        check_one(argv, copy_sandbox(sandbox, Path(tmp)))


def copy_sandbox(sandbox: Path, into: Path) -> Path:
    """A fresh copy of the sandbox (its links re-pointed into the copy)."""
    folder = into / "work"
    shutil.copytree(sandbox, folder, symlinks=True)
    for link, target in (("link.npy", "notes.txt"), ("dirlink", "docs")):
        (folder / link).unlink()
        (folder / link).symlink_to(folder / target)
    return folder
