"""Mutation testing of the correction path with mutmut, and the score for the docs.

``pyproject.toml`` (``[tool.mutmut]``) names the mutated files and the fast test selection; this
script runs ``mutmut run`` on the functions of the correction path (the ones that compute what the
sampler does to a state: coefficients, the corrector, the loop, the step grids and gains of every
scheduler adapter, the empirical statistic and its interval, and the estimator file's route from a
stored statistic to a corrector), reads ``mutmut results`` and writes the score per function to
``docs/results/mutation.md``. Survivors reviewed as equivalent (the mutant computes the same thing
for every input the function accepts) are listed in :data:`EQUIVALENT` with the reason; every other
survivor counts against the score.

    python studies/mutation.py               # correction path (~1350 mutants), about an hour on 2 busy cores
    python studies/mutation.py --again       # only the path's mutants not yet killed (after new tests)
    python studies/mutation.py --report      # re-read mutmut's stored results, no run
    python studies/mutation.py --rest        # also the remaining functions of the mutated files
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict

from _report import ROOT, command_line, write_section

PAGE = ROOT / "docs" / "results" / "mutation.md"
EF = "qdrift_stats.correct.estimator_file.xǁEstimatorFileǁ"
SB = "qdrift_stats.schedulers.base."
CORRECTION_PATH = [
    "qdrift_stats.correct.coefficients.x_correction_coefficients__*",
    "qdrift_stats.correct.coefficients.x_residual_terms__*",  # the local-spread pull's rho, delta
    "qdrift_stats.correct.coefficients.x_apply_correction__*",
    "qdrift_stats.correct.coefficients.x_stochastic_split__*",
    "qdrift_stats.correct.coefficients.x_channelwise__*",
    "qdrift_stats.correct.coefficients.x_divergence_risk__*",
    "qdrift_stats.correct.corrector.xǁCorrectorǁ*",
    "qdrift_stats.correct.corrector.x__check_channels__*",
    "qdrift_stats.loop.x_run_sampler__*",
    "qdrift_stats.loop.x_advance_step__*",  # the model calls and scheduler steps of one step (run_sampler's body)
    "qdrift_stats.loop.x_scale_model_input__*",
    "qdrift_stats.estimators.empirical.x_t_interval__*",
    "qdrift_stats.estimators.empirical.x_per_run_second_moment__*",
    "qdrift_stats.estimators.empirical.xǁEmpiricalEstimatorǁfit__*",
    EF + "coefficients__*",
    EF + "corrector__*",
    EF + "_same_grid__*",
    EF + "residual_terms_on__*",
    SB + "x_x0_from_output__*",
    SB + "x_x0_slope__*",
    SB + "x_first_order_gain__*",
    SB + "xǁStepGridǁ*",
    SB + "x_step_grid__*",
    SB + "x_step_calls__*",  # which timestep entries make up each step (one per step but Heun's)
    SB + "x_call_steps__*",
    SB + "xǁSchedulerAdapterǁcall_steps__*",
    SB + "x_vp_grid__*",  # the DDIM (and DDPM, LCM) levels, moved out of DDIMAdapter.grid
    SB + "x_gain_on__*",
    SB + "x_output_gains__*",
    SB + "xǁSchedulerAdapterǁx0_hat__*",
    SB + "xǁSchedulerAdapterǁfirst_order_gain__*",
    "qdrift_stats.schedulers.euler.*ǁgrid__*",
    "qdrift_stats.schedulers.ddim.*ǁgrid__*",
    "qdrift_stats.schedulers.dpmpp.*ǁgrid__*",
    "qdrift_stats.schedulers.flow_euler.*ǁgrid__*",
]

# Functions the patterns above match that are not the library's correction: the published Q-Drift code's
# rule, kept as a baseline to compare against (studies/replication_table.py). Their mutants are run with
# --rest and listed apart; they do not enter the score of the correction path.
BASELINE = [
    "qdrift_stats.correct.coefficients.x_published_coefficients__*",
    "qdrift_stats.correct.corrector.xǁIncrementCorrectorǁ*",
]

# Survivors reviewed by hand: mutant name -> (a line of the mutant's diff, why it computes the same thing for every
# accepted input). mutmut numbers a function's mutants in order, so a name points elsewhere once that function's
# code changes: an entry counts only while `mutmut show NAME` still contains its line (checked by the report).
CC = "qdrift_stats.correct.coefficients.x_correction_coefficients__mutmut_"
SS = "qdrift_stats.correct.coefficients.x_stochastic_split__mutmut_"
CO = "qdrift_stats.correct.corrector.xǁCorrectorǁ__init____mutmut_"
EQUIVALENT: dict[str, tuple[str, str]] = {
    CC + "44": (
        "reshape((-2,) +",
        "reshape((-2,) + ...): numpy reads any negative size as the one unknown dimension, as -1",
    ),
    CC + "49": (
        'np.errstate(divide=None, invalid="ignore")',
        "np.errstate(divide=None): the guarded division never divides by 0 (b2 = 0 is replaced by 1), "
        "so the error state is never consulted",
    ),
    CC + "50": ('np.errstate(divide="ignore", invalid=None)', "as _49 (invalid=None): no 0/0 or inf/inf can occur"),
    CC + "51": ('np.errstate(invalid="ignore")', "as _49 (divide left out)"),
    CC + "52": ('np.errstate(divide="ignore", )', "as _50 (invalid left out)"),
    CC + "74": (
        "np.where(b2 >= 0, b2, 1.0)",
        "inner np.where(b2 >= 0, b2, 1): where b2 = 0 the quotient (inf or nan) is discarded by the outer "
        "np.where(b2 > 0, ..., 0), under the errstate that silences it",
    ),
    CC + "76": (
        "np.where(b2 > 0, b2, 2.0)",
        "inner np.where(..., 2.0): the placeholder divisor is used only where the outer np.where discards it",
    ),
    CC + "139": (
        "with np.errstate(invalid=None):",
        "the local-spread root (rho - sqrt(max(disc, 0))) / A has A = rho^2 + rho delta u > 0 (rho > 0 is checked) "
        "and a non-negative square root argument: no invalid operation, so the error state is never consulted",
    ),
    SS + "17": ("reshape((-2,) +", "as correction_coefficients _44 (any negative size is the unknown dimension)"),
    SS + "32": (
        'np.errstate(divide=None, invalid="ignore")',
        "the division is by np.where(s2 > 0, s2, 1.0), never 0: the divide state is never consulted",
    ),
    SS + "33": (
        'np.errstate(divide="ignore", invalid=None)',
        "1 - v / s2 is finite (v and s2 finite, divisor never 0) and the square root takes a value clipped at 0: "
        "no invalid operation",
    ),
    SS + "34": ('np.errstate(invalid="ignore")', "as _32 (divide left out)"),
    SS + "35": ('np.errstate(divide="ignore", )', "as _33 (invalid left out)"),
    SS + "47": (
        "keep = np.where(s2 >= 0,",
        "where s2 = 0 (s = 0) keep is only used in factor = s (1 - keep) = 0 whatever keep is",
    ),
    SS + "64": (
        "np.where(s2 >= 0, s2, 1.0)",
        "inner where: at s2 = 0 the quotient (inf or nan) is discarded by the outer np.where(s2 > 0, ..., 1.0), "
        "under the errstate that silences it",
    ),
    SS + "66": ("np.where(s2 > 0, s2, 2.0)", "the placeholder divisor is used only where the outer where discards it"),
    SS + "68": (
        "0.0, None)), 2.0)",
        "keep = 2 where s = 0 gives factor = 0 * (1 - 2) = -0.0, which equals 0: the step stays inactive "
        "(row != 0 is False) and x - (-0.0) z = x",
    ),
    SS + "76": (
        "factor = np.where(variance >= 0,",
        "where v = 0, keep = 1 (sqrt(1 - 0), or the s = 0 value 1), so s (1 - keep) = 0, the else value",
    ),
    CO + "4": (
        "coefficients = np.asarray(coefficients, dtype=None)",
        "the host array is only compared with 0, reshaped and handed to torch.as_tensor(dtype=...) (also by to()); "
        "float32 and integer values convert to float64 exactly, so every tensor is the same",
    ),
    CO + "6": ("coefficients = np.asarray(coefficients, )", "as _4"),
    CO + "14": ("np.asarray(noise_factor, dtype=None)", "as _4 for the noise factor"),
    CO + "16": ("np.asarray(noise_factor, )", "as _4 for the noise factor"),
    CO + "40": ("coefficients.reshape(grid.num_steps, -2)", "any negative size is the unknown dimension, as -1"),
    "qdrift_stats.loop.x_run_sampler__mutmut_12": (
        'getattr(corrector, "needs_noise", None)',
        "bool(None) is bool(False): the default only matters through bool()",
    ),
    "qdrift_stats.schedulers.base.x_vp_grid__mutmut_22": (
        "np.clip(1.0 - abar_next, None, None)",
        "1 - abar_next >= 0 for every cumulative-alpha table (abar <= 1, DDIM's final_alpha_cumprod at most 1; "
        "1.0 - 1.0 is exactly 0), so the lower clip never acts",
    ),
    "qdrift_stats.schedulers.ddim.xǁDDIMAdapterǁgrid__mutmut_24": (
        "np.clip(prev, None, None)",
        "prev >= -stride > -len(alphas_cumprod) is a valid (negative) index, and np.where(prev >= 0, ..., final) "
        "discards what it reads",
    ),
}
EQUIVALENT.update(
    {
        CC + "157": (
            "return np.where(b2 >= 0, np.where(disc >= 0, exact, rho / A), 0.0)",
            "where b2 = 0, gamma = 0 so u = 1, disc = rho^2 >= 0 and exact = (rho - rho) / A = 0: the same 0",
        ),
        CC + "165": (
            "np.where(disc > 0, exact, rho / A)",
            "at disc = 0 exactly, exact = (rho - 0) / A = rho / A: both branches agree",
        ),
        CO + "60": ("self._noise_host.reshape(grid.num_steps, -2)", "any negative size is the unknown dimension"),
        CO + "150": ("k.reshape(len(k), -2)", "any negative size is the unknown dimension"),
        CO + "156": ("mu.reshape(len(mu), -2)", "any negative size is the unknown dimension"),
        "qdrift_stats.estimators.empirical.x_t_interval__mutmut_9": (
            "np.full_like(mean, None), np.full_like(mean, np.nan)",
            "np.full_like of a float array with None fills it with nan (mean is a float mean)",
        ),
        "qdrift_stats.estimators.empirical.x_t_interval__mutmut_13": ("np.full_like(mean, None)", "as _9"),
        "qdrift_stats.correct.coefficients.x_residual_terms__mutmut_26": (
            "np.asarray(residual_error, dtype=None)",
            "delta only meets float64 operands (rho + delta, rho * delta * u with rho float64): float32 or integer "
            "delta converts exactly, so every result is the same",
        ),
        "qdrift_stats.correct.coefficients.x_residual_terms__mutmut_28": ("np.asarray(residual_error, )", "as _26"),
    }
)
for _n in (35, 40, 41, 48, 53, 54):
    EQUIVALENT[f"qdrift_stats.loop.x_advance_step__mutmut_{_n}"] = (
        "return_dict=None)[0]" if _n in (35, 48) else ("return_dict=True)[0]" if _n in (41, 54) else "**kwargs, )[0]"),
        "scheduler.step returns a SchedulerOutput (a diffusers BaseOutput) when return_dict is true or left out; "
        "indexing it with 0 gives its first field, prev_sample, the same tensor as the tuple's [0]",
    )


def checked_equivalents() -> dict[str, str]:
    """The entries of :data:`EQUIVALENT` whose mutant still has the reviewed diff line (name -> reason)."""
    out = {}
    for name, (line, reason) in EQUIVALENT.items():
        if line in mutmut("show", name, check=False):
            out[name] = reason
        else:
            print(f"warning: {name} no longer shows {line!r}; not counted as equivalent", file=sys.stderr)
    return out


def mutmut(*args: str, check: bool = True, stream: bool = False) -> str:
    # one thread per test process: the workers share 2 cores with other jobs, and torch / BLAS thread pools
    # in forked workers only add contention
    threads = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    env = dict(os.environ, PYTHONPATH=str(ROOT), **threads)
    if stream:  # a long run: mutmut's progress goes straight to the terminal
        proc = subprocess.run(["mutmut", *args], cwd=ROOT, env=env, text=True)
        if check and proc.returncode not in (0, 1):
            raise SystemExit(f"mutmut {' '.join(args[:3])} ... failed with exit code {proc.returncode}")
        return ""
    proc = subprocess.run(["mutmut", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if check and proc.returncode not in (0, 1):
        raise SystemExit(f"mutmut {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return proc.stdout


def results() -> dict[str, str]:
    out = {}
    for line in mutmut("results", "--all", "true").splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def function_of(name: str) -> str:
    return name.split("__mutmut_")[0]


def on_path(name: str) -> bool:
    matches = any(fnmatch.fnmatchcase(name, p) for p in CORRECTION_PATH)
    return matches and not any(fnmatch.fnmatchcase(name, p) for p in BASELINE)


def score_table(statuses: dict[str, str], equivalent: dict[str, str]) -> tuple[list[str], Counter]:
    per_function: dict[str, Counter] = defaultdict(Counter)
    total: Counter = Counter()
    for name, status in statuses.items():
        if status == "survived" and name in equivalent:
            status = "equivalent"
        per_function[function_of(name)][status] += 1
        total[status] += 1
    rows = [
        "| function | mutants | killed | equivalent (argued) | survived | no tests | timeout / other |",
        "|---|---|---|---|---|---|---|",
    ]
    for fn in sorted(per_function):
        c = per_function[fn]
        other = sum(v for k, v in c.items() if k not in ("killed", "equivalent", "survived", "no tests"))
        rows.append(
            f"| `{fn.replace('qdrift_stats.', '')}` | {sum(c.values())} | {c['killed']} | {c['equivalent']} | "
            f"{c['survived']} | {c['no tests']} | {other} |"
        )
    return rows, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="only read the stored results")
    parser.add_argument("--rest", action="store_true", help="also run the other functions of the mutated files")
    parser.add_argument(
        "--again",
        action="store_true",
        help="re-run only the path's mutants not yet killed (survived, timeout, not checked), e.g. after new tests",
    )
    parser.add_argument(
        "--also", nargs="*", default=[], help="with --again: mutant name patterns to re-run in any case (changed code)"
    )
    parser.add_argument("--max-children", type=int, default=2, help="mutmut worker processes")
    args = parser.parse_args()
    start = time.time()
    if not args.report:
        patterns = ["*"] if args.rest else CORRECTION_PATH
        if args.again:
            stored = results()
            patterns = sorted(k for k, v in stored.items() if on_path(k) and v != "killed")
            print(f"re-running {len(patterns)} mutants and {args.also}", flush=True)
            patterns += args.also
        if patterns:
            mutmut("run", "--max-children", str(args.max_children), *patterns, stream=True)
    statuses = results()
    path = {k: v for k, v in statuses.items() if on_path(k)}
    baseline = {k: v for k, v in statuses.items() if any(fnmatch.fnmatchcase(k, p) for p in BASELINE)}
    unchecked = [k for k, v in path.items() if v == "not checked"]
    if unchecked:
        print(f"warning: {len(unchecked)} mutants on the path not checked yet", file=sys.stderr)
    equivalent_ok = {k: v for k, v in checked_equivalents().items() if path.get(k) == "survived"}
    rows, total = score_table(path, equivalent_ok)
    checked = sum(total.values()) - total["not checked"]
    killed, equivalent = total["killed"], total["equivalent"]
    scored = max(checked - equivalent, 1)
    survivors = sorted(k for k, v in path.items() if v in ("survived", "no tests", "timeout", "suspicious"))
    survivors = [k for k in survivors if k not in equivalent_ok]
    base_counts = Counter(baseline.values())
    lines = [
        "## Mutation score of the correction path",
        "",
        f"mutmut {mutmut('--version', check=False).strip() or '3.x'} over the functions of the correction path "
        "(`CORRECTION_PATH` in `studies/mutation.py`, less the published baseline, `BASELINE`); mutated files, the "
        "fast test selection and the timeouts are in `pyproject.toml` `[tool.mutmut]`. A mutant counts as killed "
        "when a test of the selection fails.",
        "",
        f"**Strict score: {killed} killed of {checked - equivalent} non-equivalent checked mutants = "
        f"{100 * killed / scored:.1f}%** ({len(path)} mutants on the path, {checked} checked, {total['not checked']} "
        f"not checked; {equivalent} argued equivalent below). Not killed: {total['survived']} survived, "
        f"{total['no tests']} reached by no test of the selection, **{total['timeout']} timed out** (counted as not "
        f"killed here; mutmut counts a timeout as detected, which would give "
        f"{100 * (killed + total['timeout']) / scored:.1f}%), {total['suspicious']} suspicious.",
        "",
        *rows,
        "",
        "### Survivors argued equivalent",
        "",
        *([f"- `{k.replace('qdrift_stats.', '')}`: {v}" for k, v in sorted(equivalent_ok.items())] or ["none"]),
        "",
        "### Survivors not killed (count against the score)",
        "",
        *([f"- `{k.replace('qdrift_stats.', '')}` ({path[k]})" for k in survivors] or ["none"]),
        "",
        "### Not scored: the published baseline",
        "",
        f"`{'`, `'.join(p.replace('qdrift_stats.', '') for p in BASELINE)}`: {len(baseline)} mutants, "
        + (", ".join(f"{n} {status}" for status, n in sorted(base_counts.items())) or "none run")
        + " (run them with `--rest`).",
        "",
        f"Report written by `{command_line()}` ({(time.time() - start) / 60:.1f} min on 2 shared CPU cores); "
        "`mutmut show NAME` prints any mutant's diff.",
    ]
    write_section("mutation", "\n".join(lines), PAGE)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
