"""Patch plausible index / level / interval bugs into a copy of the package and check the tests catch them.

Each bug is a one-line text substitution in a temporary copy of ``qdrift_stats/`` (the working tree is
never touched). For each, the pinned tests (``tests/test_pinned.py``) and, for contrast, the fast
pre-existing selection that covers the same code are run against the patched copy; a bug is *caught*
when pytest fails. The first six rows are the bugs the statistics audit (issue 14) found passing the
whole suite; the rest are further wrong-index / wrong-level variants.

    python studies/bug_injection.py           # about 2 minutes on 2 cores

Writes the table to ``docs/results/bug_injection.md``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import ROOT, command_line, write_section

PAGE = ROOT / "docs" / "results" / "bug_injection.md"
PINNED = ["tests/test_pinned.py"]
# what covered these functions before the pinned tests (the suite the audit ran, its fast part)
EARLIER = [
    "tests/test_correction.py",
    "tests/test_schedulers.py",
    "tests/test_estimators.py",
    "tests/test_sampling.py",
    "tests/test_export.py",
]

# (name, file, old text, new text)
BUGS: list[tuple[str, str, str, str]] = [
    (
        "coefficients use b_i instead of b_{i+1}",
        "correct/estimator_file.py",
        "correction_coefficients(self.variance_on(grid, call=call), grid.b_next,",
        "correction_coefficients(self.variance_on(grid, call=call), grid.b,",
    ),
    (
        "step i uses step i+1's coefficient",
        "correct/corrector.py",
        "float(self.grid.a_next[i]), self.coefficients[i], self.channel_axis)",
        "float(self.grid.a_next[i]), self.coefficients[min(i + 1, self.grid.num_steps - 1)], self.channel_axis)",
    ),
    (
        "ddof=0 in the t interval",
        "estimators/empirical.py",
        "se = per_run.std(axis=0, ddof=1) / np.sqrt(n)",
        "se = per_run.std(axis=0, ddof=0) / np.sqrt(n)",
    ),
    (
        "normal quantile instead of t(R-1)",
        "estimators/empirical.py",
        "half = stats.t.ppf(0.5 + confidence / 2, df=n - 1) * se",
        "half = stats.norm.ppf(0.5 + confidence / 2) * se",
    ),
    (
        "decomposed residual not divided by (1+k)",
        "estimators/decomposed.py",
        'residual = (values["delta_out"] - k[i] * values["out_fp"] - mu[i]) / (1.0 + k[i])',
        'residual = values["delta_out"] - k[i] * values["out_fp"] - mu[i]',
    ),
    (
        "smooth model covariate taken at b_{i+1}",
        "estimators/smooth.py",
        'log_b = np.log(grid["b"])',
        'log_b = np.log(np.where(grid["b_next"] > 0, grid["b_next"], grid["b"]))',
    ),
    (
        "x0_hat from the next level (a_{i+1}, b_{i+1})",
        "correct/corrector.py",
        "x0_hat = self.grid.x0_from_output(i, x, model_output)",
        "x0_hat = x0_from_output(self.grid.prediction_type, float(self.grid.a_next[i]), "
        "float(self.grid.b_next[i]) or 1.0, x, model_output)",
    ),
    (
        "pull target a_i x0_hat instead of a_{i+1} x0_hat",
        "correct/corrector.py",
        "float(self.grid.a_next[i]), self.coefficients[i], self.channel_axis)",
        "float(self.grid.a[i]), self.coefficients[i], self.channel_axis)",
    ),
    (
        "first-order gain shifted by one step",
        "schedulers/base.py",
        "return (a_next - b_next * a / b) * x0_slope(prediction_type, a, b)",
        "return np.roll((a_next - b_next * a / b) * x0_slope(prediction_type, a, b), 1)",
    ),
    (
        "decomposed k interval on the normal quantile",
        "estimators/decomposed.py",
        'cov_kwds={"groups": groups}, use_t=True)',
        'cov_kwds={"groups": groups})',
    ),
    (
        "smooth-GLM cluster interval on the normal quantile",
        "estimators/smooth.py",
        "q = stats.t.ppf(0.5 + self.confidence / 2, max(runs - 1, 1))",
        "q = stats.norm.ppf(0.5 + self.confidence / 2)",
    ),
]


def run_tests(tree: Path, files: list[str]) -> tuple[bool, str]:
    """``(failed, last line)`` of pytest on ``files`` against the package copy in ``tree``."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return proc.returncode != 0, lines[-1] if lines else proc.stderr.strip()[-200:]


def patched_tree(base: Path, file: str, old: str, new: str) -> Path:
    tree = Path(tempfile.mkdtemp(prefix="qdrift-bug-"))
    shutil.copytree(base / "qdrift_stats", tree / "qdrift_stats", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(base / "tests", tree / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(base / "pyproject.toml", tree / "pyproject.toml")
    for extra in ("data",):
        if (base / extra).exists():
            (tree / extra).symlink_to(base / extra)
    target = tree / "qdrift_stats" / file
    text = target.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"{file}: the text to patch occurs {text.count(old)} times: {old!r}")
    if "x0_from_output(self.grid" in new:
        text = text.replace(
            "from qdrift_stats.schedulers import StepGrid",
            "from qdrift_stats.schedulers import StepGrid, x0_from_output",
        )
    target.write_text(text.replace(old, new))
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-earlier", action="store_true", help="skip the pre-existing test selection")
    args = parser.parse_args()
    start = time.time()
    rows = []
    baseline_failed, baseline = run_tests(ROOT, PINNED)
    if baseline_failed:
        raise SystemExit(f"the pinned tests fail on the unpatched tree: {baseline}")
    for name, file, old, new in BUGS:
        tree = patched_tree(ROOT, file, old, new)
        try:
            caught, line = run_tests(tree, PINNED)
            earlier = run_tests(tree, EARLIER)[0] if not args.no_earlier else None
        finally:
            shutil.rmtree(tree, ignore_errors=True)
        rows.append((name, file, caught, earlier, line))
        print(f"{name:55s} pinned: {'caught' if caught else 'NOT CAUGHT'}  earlier: {earlier}  ({line})", flush=True)
    table = [
        "| injected bug | file | caught by tests/test_pinned.py | caught by the earlier fast selection | pinned run |",
        "|---|---|---|---|---|",
    ]
    for name, file, caught, earlier, line in rows:
        earlier_text = "not run" if earlier is None else ("caught" if earlier else "**not caught**")
        table.append(f"| {name} | `{file}` | {'caught' if caught else '**NOT CAUGHT**'} | {earlier_text} | {line} |")
    caught = sum(r[2] for r in rows)
    text = (
        "## Injected bugs\n\n"
        f"{caught} of {len(rows)} injected bugs fail at least one pinned test. The earlier fast selection is "
        f"`{' '.join(EARLIER)}` (what covered these functions before the pinned tests; the audit found the "
        "first six passing the whole suite).\n\n" + "\n".join(table) + "\n\n"
        f"Generated by `{command_line()}` ({(time.time() - start) / 60:.1f} min on 2 CPU cores).\n"
    )
    write_section("bug_injection", text, PAGE)
    print(text)


if __name__ == "__main__":
    main()
