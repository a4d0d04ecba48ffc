"""Robustness of the command line: malformed files, argument combinations, interrupts, concurrent
writers, readers during an append, and the time ``qdrift --help`` takes.

Writes the section ``robustness`` of ``docs/robustness.md``:

- **malformed files**: the seeded fuzzing of ``tests/test_fuzz_files.py`` (every kind of damage to
  a store and to an estimator file, each read by every reader), ``--per-kind`` variants per kind;
- **argument combinations**: ``--cli-examples`` command lines drawn by the hypothesis strategy of
  ``tests/test_cli_properties.py`` (verbs, valid and invalid paths, numbers, names, flags), each
  run in a fresh sandbox; a crash is an exit code other than 0 and 2, a traceback, not exactly one
  error line when refused, a file changed outside ``--out``, or a temporary left behind;
- **interrupts**: ``qdrift record`` (a subprocess) gets SIGINT (Ctrl-C) at a random moment during
  its runs (after a random number of finished runs, 2 .. runs-2, within the next one), then the same command
  is run again (in this process, through ``qdrift_stats.cli.main``, as the other resumes here); a
  crash is an exit code other than 130, any stderr line other than progress and
  ``qdrift: interrupted`` (e.g. zarr's "Task was destroyed"), or a failed resume; a loss is a final
  store that differs from an uninterrupted recording;
- **concurrent writers**: two ``qdrift record`` processes on the same ``--out`` at once, then the
  command once more; a crash is an exit code other than 0 or 2 (2: "another process is writing");
  a loss is a final store that differs from an uninterrupted recording (a seed twice, one missing,
  other values);
- **readers during an append**: while a ``qdrift record`` process appends runs, this process
  opens the store and fits it as fast as it can; a failed read is any error once the store exists
  (before its first run completes, "holds no complete run" / "does not exist" are expected answers,
  counted apart);
- **kills at every write**: ``record`` (``studies/crash_consistency.py``: the creation of the store
  and an append) and ``qdrift cv`` with its strength search (``tests/test_cv_kill.py``: the
  creation of the results folder, every part, the combined result) stopped at every file write,
  by copying the output folder just before each write zarr makes (exactly what a ``kill -9`` at
  that moment leaves); each copy is read by a reader and resumed by the same command; a loss is a
  resume that fails or differs from the uninterrupted result, a crash a reader that sees anything
  but complete runs / a one-line refusal;
- **--help**: wall time of ``qdrift --help`` (the console script, a fresh process each time), and
  the CPU time (user + system) of that process, which a loaded machine inflates less.

    python studies/robustness.py                  # about 8 minutes on 2 busy cores (process starts dominate)
    python studies/robustness.py --quick          # a smoke run (a few minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

from _report import ROOT, command_line, write_section

sys.path.insert(0, str(ROOT))

PAGE = ROOT / "docs" / "robustness.md"
PAIR = "qdrift_stats.testbed:mixture_vp_noise"


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def qdrift_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "qdrift_stats.cli", *args]


def record_args(out: Path, runs: int, steps: int = 30, batch: int = 64) -> list[str]:
    return [
        "record",
        "--pair",
        PAIR,
        "--scheduler",
        "euler",
        "--steps",
        str(steps),
        "--runs",
        str(runs),
        "--batch",
        str(batch),
        "--seed",
        "0",
        "--out",
        str(out),
    ]


def in_process(*args: str) -> subprocess.CompletedProcess:
    """``qdrift ARGS`` run by ``qdrift_stats.cli.main`` in this process (the same code as the console
    script, without another interpreter start): exit code, stdout and stderr."""
    import io

    from qdrift_stats.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def store_values(path: Path):
    """(seeds, delta_x) of a store's complete runs, sorted by seed."""
    import numpy as np

    from qdrift_stats.record.store import open_store

    ds = open_store(path)
    seeds = np.asarray(ds["seed"].values)
    order = np.argsort(seeds)
    return seeds[order].tolist(), np.asarray(ds["delta_x"].values)[order]


def same_store(path: Path, reference) -> bool:
    import numpy as np

    try:
        seeds, values = store_values(path)
    except Exception:
        return False
    return seeds == reference[0] and np.array_equal(values, reference[1])


def clean_stderr(err: str, verb: str = "record", allowed: tuple[str, ...] = ()) -> bool:
    """Only progress lines and the allowed one-line messages."""
    for line in err.splitlines():
        if line.startswith(f"qdrift {verb}: ") or line in allowed or not line.strip():
            continue
        return False
    return True


# ---- malformed files ----------------------------------------------------------------------------


def malformed_files(per_kind: int, seed: int, tmp: Path) -> dict:
    from tests.test_fuzz_files import fuzz, make_base

    store, est = make_base(tmp / "fuzz-base")
    report = fuzz(store, est, tmp / "fuzz-work", per_kind, seed=seed)
    totals = Counter(o.result for o in report.outcomes)
    return {"files": sum(report.tried.values()), "reads": len(report.outcomes), **totals}


# ---- argument combinations --------------------------------------------------------------------------


def argument_combinations(examples: int, seed: int, tmp: Path) -> dict:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed

    from tests.test_cli_properties import build_sandbox, check_one, command, copy_sandbox

    sandbox = tmp / "cli-sandbox"
    sandbox.mkdir()
    build_sandbox(sandbox)
    counts: Counter = Counter()
    crashes: list[str] = []

    @hseed(seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(argv=command())
    def one(argv):
        with tempfile.TemporaryDirectory() as work:
            try:
                code, _ = check_one(argv, copy_sandbox(sandbox, Path(work)))
                counts[f"exit {code}"] += 1
            except AssertionError as exc:
                counts["crash"] += 1
                crashes.append(" ".join(str(exc).split())[:300])
        counts["tried"] += 1

    one()
    return {**counts, "examples": crashes[:3]}


# ---- interrupts -----------------------------------------------------------------------------------


def default_sigint() -> None:
    """In the child: Ctrl-C's default action. A study started in the background (``nohup ... &``)
    ignores SIGINT, its children inherit that, and Python then installs no handler: the signal
    would be lost and the trial would only look finished."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def runs_in(path: Path) -> int:
    """Complete runs a store holds (0 if it cannot be opened)."""
    from qdrift_stats.record.store import open_store

    try:
        return int(open_store(path).sizes["run"])
    except Exception:  # noqa: BLE001 - no store yet
        return 0


def run_seconds(progress: str) -> float:
    """The elapsed time of a progress line (``qdrift record: run 3/6 done, elapsed 1m02s, ...``)."""
    import re

    found = re.search(r"run \d+/\d+ done, elapsed (?:(\d+)m)?([\d.]+)s", progress)
    return 60 * int(found.group(1) or 0) + float(found.group(2)) if found else 0.0


def interrupt_trials(trials: int, runs: int, tmp: Path, reference, rng: random.Random) -> dict:
    counts: Counter = Counter()
    examples: list[str] = []
    for k in range(trials):
        out = tmp / f"int{k}.zarr"
        proc = subprocess.Popen(
            qdrift_cmd(*record_args(out, runs)),
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=default_sigint,
        )
        # wait for the k-th finished run (k random in 2 .. runs-2), then interrupt at a random moment
        # of the next one (the time between the last two progress lines is one run's; the first
        # run's also holds the setup). One run is left after that one: reading the progress pipe
        # lags on a loaded machine, and a signal after the last run only meets the interpreter's exit.
        k_run = rng.randint(2, max(2, runs - 2))
        lines = [proc.stderr.readline() for _ in range(k_run)]
        one_run = max(run_seconds(lines[-1]) - run_seconds(lines[-2]), 0.05)
        time.sleep(rng.uniform(0.0, 0.8 * one_run))
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=300)
        err = "".join(lines) + rest
        clean = clean_stderr(err, allowed=("qdrift: interrupted",))
        if proc.returncode == 0:  # finished before the signal: not an interrupt trial
            counts["finished before the signal"] += 1
        elif proc.returncode == 130 and clean:
            counts["interrupted"] += 1
        elif proc.returncode == -signal.SIGINT and clean:
            # ended by the signal itself (a shell shows exit 130): it came when Python's handler was
            # not installed (interpreter start or exit); no output, the store is checked below
            counts["ended by the signal"] += 1
            if runs_in(out) == runs:
                counts["ended by the signal after the last run"] += 1
        else:
            counts["crash"] += 1
            examples.append(f"exit {proc.returncode}: {' | '.join(err.splitlines()[-3:])}")
        again = in_process(*record_args(out, runs), "--quiet")
        if again.returncode != 0:
            counts["crash"] += 1
            examples.append(f"resume exit {again.returncode}: {again.stderr.strip()[-200:]}")
        elif not same_store(out, reference):
            counts["loss"] += 1
        else:
            counts["resumed identical"] += 1
        counts["tried"] += 1
    return {**counts, "examples": examples[:3]}


# ---- concurrent writers ---------------------------------------------------------------------------


def concurrent_writer_trials(trials: int, runs: int, tmp: Path, reference, rng: random.Random) -> dict:
    counts: Counter = Counter()
    examples: list[str] = []
    for k in range(trials):
        out = tmp / f"cw{k}.zarr"
        procs = []
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    qdrift_cmd(*record_args(out, runs), "--quiet"),
                    env=env(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
            time.sleep(rng.uniform(0.0, 2.0))
        for p in procs:
            _, err = p.communicate(timeout=600)
            counts[f"writer exit {p.returncode}"] += 1
            one_line = len([line for line in err.splitlines() if line.strip()]) <= 1
            if p.returncode not in (0, 2) or "Traceback" in err or not one_line:
                counts["crash"] += 1
                examples.append(f"exit {p.returncode}: {err.strip()[-200:]}")
        final = in_process(*record_args(out, runs), "--quiet")
        if final.returncode != 0:
            counts["crash"] += 1
            examples.append(f"final exit {final.returncode}: {final.stderr.strip()[-200:]}")
        elif not same_store(out, reference):
            counts["loss"] += 1
        counts["tried"] += 1
    return {**counts, "examples": examples[:3]}


# ---- readers during an append ---------------------------------------------------------------------------


def reader_trials(trials: int, runs: int, tmp: Path) -> dict:
    from qdrift_stats.errors import QDriftError
    from qdrift_stats.estimators import get_estimator
    from qdrift_stats.record.store import open_store

    counts: Counter = Counter()
    examples: list[str] = []
    for k in range(trials):
        out = tmp / f"rd{k}.zarr"
        proc = subprocess.Popen(
            qdrift_cmd(*record_args(out, runs), "--quiet"), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        seen_runs = 0
        while proc.poll() is None:
            try:
                ds = open_store(out)
                fitted = get_estimator("empirical").fit(ds)
                if fitted.num_runs < seen_runs:
                    counts["read fewer runs than before"] += 1
                seen_runs = max(seen_runs, fitted.num_runs)
                counts["reads ok"] += 1
            except QDriftError as exc:
                text = str(exc)
                if "does not exist" in text or "holds no complete run" in text:
                    counts["reads before the first run"] += 1
                    time.sleep(0.1)
                else:
                    counts["failed reads"] += 1
                    examples.append(text[:200])
            except Exception as exc:  # noqa: BLE001 - counted as a failed read
                counts["failed reads"] += 1
                examples.append(f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            time.sleep(0.02)  # leave the writer its share of the 2 cores
        proc.communicate()
        counts["writer exit 0" if proc.returncode == 0 else "crash"] += 1
        counts["tried"] += 1
    return {**counts, "examples": examples[:3]}


# ---- kills at every write ---------------------------------------------------------------------------


def scratch_folder(tmp: Path, name: str) -> contextlib.AbstractContextManager[str]:
    """A temporary folder in memory (/dev/shm) where there is one, else under ``tmp``."""
    from crash_consistency import scratch_parent

    return tempfile.TemporaryDirectory(prefix=f"qdrift-{name}-", dir=scratch_parent() or tmp)


def record_kill_trials(runs: int, tmp: Path) -> dict:
    from crash_consistency import kill_trials

    with scratch_folder(tmp, "record-kill") as root:
        return kill_trials(runs, Path(root))


def cv_kill_trials(runs: int, tmp: Path) -> dict:
    """``qdrift cv`` (learning curve + strength search with the command's own grid) killed at every write."""
    from tests.test_cv_kill import kill_trials, make_store

    with scratch_folder(tmp, "cv-kill") as root:
        store = make_store(Path(root) / "calib.zarr", runs=runs)
        trials = Path(root) / "trials"
        trials.mkdir()
        examples: list[str] = []
        counts = kill_trials(store, trials, examples=examples)
    return {**counts, "examples": examples[:3]}


# ---- --help -------------------------------------------------------------------------------------


def help_times(repeats: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (user + system, of the child process) seconds of ``qdrift --help``, a fresh process each."""
    script = shutil.which("qdrift")
    cmd = [script, "--help"] if script else qdrift_cmd("--help")
    walls, cpus = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        walls.append(time.perf_counter() - start)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"qdrift --help exited {proc.returncode}")
        cpus.append(usage.ru_utime + usage.ru_stime)
    return walls, cpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-kind", type=int, default=3, help="Malformed variants per kind of damage.")
    parser.add_argument("--cli-examples", type=int, default=60, help="Argument combinations tried.")
    parser.add_argument("--trials", type=int, default=5, help="Interrupt, concurrent-writer and reader trials each.")
    parser.add_argument("--runs", type=int, default=4, help="Runs of the recordings in those trials.")
    parser.add_argument(
        "--kill-runs", type=int, default=2, help="Runs of the stores in the kill-at-every-write trials."
    )
    parser.add_argument("--help-repeats", type=int, default=20, help="Timed 'qdrift --help' calls.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="A smoke run: a few of each.")
    parser.add_argument("--no-write", action="store_true", help="Print; do not update docs/robustness.md.")
    args = parser.parse_args()
    if args.quick:
        args.per_kind, args.cli_examples, args.trials, args.runs, args.help_repeats = 1, 20, 2, 4, 3
    warnings.filterwarnings("ignore")
    rng = random.Random(args.seed)
    start = time.time()
    load_start = os.getloadavg()[0]
    results, durations = {}, {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        t = time.time()
        results["help"] = help_times(args.help_repeats)
        durations["help"] = time.time() - t
        reference_path = tmp / "reference.zarr"
        subprocess.run(qdrift_cmd(*record_args(reference_path, args.runs), "--quiet"), env=env(), check=True)
        reference = store_values(reference_path)
        for name, run in (
            ("files", lambda: malformed_files(args.per_kind, args.seed, tmp)),
            ("cli", lambda: argument_combinations(args.cli_examples, args.seed, tmp)),
            ("interrupt", lambda: interrupt_trials(args.trials, args.runs, tmp, reference, rng)),
            ("concurrent", lambda: concurrent_writer_trials(args.trials, args.runs, tmp, reference, rng)),
            ("reader", lambda: reader_trials(args.trials, args.runs, tmp)),
            ("record_kill", lambda: record_kill_trials(args.kill_runs, tmp)),
            ("cv_kill", lambda: cv_kill_trials(args.kill_runs, tmp)),
        ):
            t = time.time()
            results[name] = run()
            durations[name] = time.time() - t
            print(name, results[name], f"{durations[name]:.0f} s", flush=True)
    elapsed = time.time() - start
    results["load"] = (load_start, os.getloadavg()[0])
    text = report(results, durations, elapsed, args)
    print(text)
    if not args.no_write:
        write_section("robustness", text, PAGE)


def report(r: dict, durations: dict, elapsed: float, args) -> str:
    files, cli, intr, conc, read = r["files"], r["cli"], r["interrupt"], r["concurrent"], r["reader"]
    rk, ck = r["record_kill"], r["cv_kill"]
    walls, cpus = r["help"]
    rows = [
        (
            "malformed files (store and estimator), each read by every reader",
            f"{files['files']} files, {files['reads']} reads",
            f"{files.get('ok', 0)} ok, {files.get('refused', 0)} refused",
            files.get("crash", 0),
            files.get("touched", 0),
        ),
        (
            "command-line argument combinations (hypothesis), fresh sandbox each",
            f"{cli.get('tried', 0)} command lines",
            f"{cli.get('exit 0', 0)} exit 0, {cli.get('exit 2', 0)} exit 2",
            cli.get("crash", 0),
            "(in crash)",
        ),
        (
            f"Ctrl-C (SIGINT) during `qdrift record` of {args.runs} runs, then the same command",
            f"{intr.get('tried', 0)} trials",
            f"{intr.get('interrupted', 0)} interrupted (exit 130, `qdrift: interrupted`), "
            f"{intr.get('ended by the signal', 0)} ended by the signal outside Python's handler (exit -2, "
            f"130 in a shell, no output; {intr.get('ended by the signal after the last run', 0)} of them with "
            f"all {args.runs} runs stored, i.e. at interpreter exit), "
            f"{intr.get('finished before the signal', 0)} finished before it; "
            f"{intr.get('resumed identical', 0)} resumed to the uninterrupted store",
            intr.get("crash", 0),
            intr.get("loss", 0),
        ),
        (
            "two `qdrift record` on one store at once, then the command once more",
            f"{conc.get('tried', 0)} trials",
            ", ".join(f"{conc[k]} {k}" for k in sorted(conc) if k.startswith("writer exit")),
            conc.get("crash", 0),
            conc.get("loss", 0),
        ),
        (
            f"open + fit while `qdrift record` appends {args.runs} runs",
            f"{read.get('tried', 0)} recordings, "
            f"{read.get('reads ok', 0) + read.get('failed reads', 0)} reads once the store existed",
            f"{read.get('reads ok', 0)} ok (complete runs only)",
            read.get("failed reads", 0) + read.get("crash", 0) + read.get("read fewer runs than before", 0),
            "-",
        ),
        (
            f"`record` of {args.kill_runs} runs killed at every file write (creation included), "
            "each copy read, then the same command",
            f"{rk['kill points']} kill points",
            f"{rk['before the store existed']} before the store existed (creation window), "
            f"{rk['store existed']} after; "
            + (
                "every read showed complete runs only, every resume the reference"
                if not rk["reader failures"] and not rk["resume failures"]
                else f"{rk['reader failures']} reads and {rk['resume failures']} resumes failed"
            ),
            rk["reader failures"],
            rk["resume failures"],
        ),
        (
            f"`qdrift cv` (learning curve + strength search) on {args.kill_runs} runs killed at every file "
            "write of its output, each copy read, then the same command",
            f"{ck.get('kill points', 0)} kill points",
            f"{ck.get('kill points', 0) - ck.get('output existed', 0)} before the output existed; "
            f"{ck.get('reads refused', 0)} reads refused in one line (incomplete), "
            f"{ck.get('resumed identical', 0)} resumed identical",
            ck.get("reader failures", 0),
            ck.get("resume failures", 0),
        ),
    ]
    lines = [
        f"Generated by `{command_line()}` ({elapsed / 60:.1f} minutes on a shared 2-core machine). "
        "Seeded (the fuzzing and the argument combinations repeat exactly; interrupts and concurrent "
        "starts depend on timing).",
        "",
        "| what | tried | outcomes | crashes | losses / files touched |",
        "|---|---|---|---:|---:|",
        *[f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows],
        "",
        f"`qdrift --help`, a fresh process each time ({len(walls)} calls): wall time median "
        f"{statistics.median(walls):.2f} s, max {max(walls):.2f} s; CPU time of the process (user + system) "
        f"median {statistics.median(cpus):.2f} s, max {max(cpus):.2f} s. The machine is shared (load average "
        f"{r['load'][0]:.1f} at the start, {r['load'][1]:.1f} at the end, on {os.cpu_count()} cores): the wall "
        "time includes waiting for a core, the CPU time does not.",
    ]
    examples = [(k, r[k].get("examples")) for k in ("cli", "interrupt", "concurrent", "reader", "cv_kill")]
    if any(e for _, e in examples):
        lines += ["", "First failures:", ""]
        for k, e in examples:
            for item in e or []:
                lines.append(f"- {k}: `{item}`")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
