"""Automatic choice of the correction: estimator, form and strength profile, by cross-validation over calibration runs.

``qdrift fit STORE --estimator auto`` (:class:`AutoEstimator`) leaves one calibration run out at a
time. For each held-out run it fits every candidate estimator on the other runs, samples the
quantized model from the held-out run's own seed with the candidate correction, and compares the
final samples, pooled over the held-out runs, with the FP sampler's from the same seeds. Nothing
but calibration runs (their seeds) and the model pair the user passes is used; the samples of a
study are never seen.

The score is a distribution distance (unbiased MMD², Gaussian kernel whose bandwidth is the median
nearest-neighbour distance within the FP set, so that it sees the spread around each sample's
neighbourhood and not only the between-mode layout; or the energy distance). The search:

1. each candidate estimator (default ``first-order``, ``persistent``, ``persistent-ptqd``,
   ``decomposed``) with the shrink form at each strength of a grid (default 0 to 32), scanned upwards and
   stopped ``patience`` strengths after the best so far;
2. the best one's strength refined piecewise in ``log b``: the corrected steps are split into
   ``segments`` groups of equal count by their target level, and each group's strength is scanned
   over the same grid with the others held (one pass of coordinate descent);
3. the drift form tried with that profile.

Each candidate is scored with the correction its exported file would apply (:func:`profiled_file`): the
residual terms of the pull, the landing-level pull, PTQD's terms and the affine output map included, the
strength profile multiplying the statistic. A candidate that corrects the model output (PTQD terms, an
output map) is scored at strength 0 too: that is the output correction alone.

The library default (``persistent`` at strength 1, shrink form: ``anchor``) is kept unless the search's
best beats it beyond the held-out noise: a paired bootstrap over the held-out samples
(:func:`paired_score_difference`) must put ``score(best) - score(default)`` below 0. On 5 x 64 held-out
samples a distribution distance is noisy, and an argmin alone follows the noise (``docs/results.md``, "The
automatic choice"). Uncorrected Q is always a candidate, so the choice is never worse than uncorrected Q
*on the held-out score*: a correction is picked only when its pooled held-out score is below Q's. The fitted result
(:class:`AutoFit`) carries the chosen estimator's statistic times the per-step strength profile (the
file's strength is 1), its other tensors, the form, and a table of every score tried (``summary()``
says what was chosen and why).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from qdrift_stats.correct.corrector import Corrector
from qdrift_stats.correct.estimator_file import EstimatorFile
from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators.base import Estimator, FittedEstimator, as_dataset
from qdrift_stats.loop import initial_noise, prepared_scheduler, run_sampler
from qdrift_stats.schedulers.base import step_grid

CANDIDATES: tuple[str, ...] = ("first-order", "persistent", "persistent-ptqd", "decomposed")
STRENGTHS: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
SCORES: tuple[str, ...] = ("mmd", "energy")
#: The candidate the choice keeps unless another beats it beyond the held-out noise: ``qdrift fit``'s default.
DEFAULT_ANCHOR = "persistent"
#: The per-step tensors a strength profile multiplies: the statistic, its interval and, for the landing-level
#: pull, the independent variance beside it (``residual_fraction``, ``residual_error``, ``k``, ``mu`` and the output
#: map describe the model's error and the marginal, not the pull's size, and are left as they are).
PROFILED_TENSORS: tuple[str, ...] = ("variance", "ci_low", "ci_high", "independent_variance")
#: Tensors that correct the model output whatever the strength: a candidate carrying one is scored also at strength 0.
OUTPUT_TENSORS: tuple[str, ...] = ("k", "mu", "map_center")


def _pairwise_sq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x.pow(2).sum(1)[:, None] + y.pow(2).sum(1)[None] - 2.0 * x @ y.T).clamp_min(0.0)


def local_bandwidth(reference: np.ndarray) -> float:
    """Median distance from each reference sample to its nearest other reference sample."""
    x = torch.as_tensor(reference.reshape(len(reference), -1), dtype=torch.float64)
    d2 = _pairwise_sq(x, x)
    d2.fill_diagonal_(float("inf"))
    return float(d2.min(dim=1).values.sqrt().median())


def distribution_score(samples: np.ndarray, reference: np.ndarray, score: str = "mmd", bandwidth: float = 1.0) -> float:
    """Distance between two sample sets: unbiased MMD² (Gaussian kernel, ``bandwidth``) or the energy distance."""
    x = torch.as_tensor(samples.reshape(len(samples), -1), dtype=torch.float64)
    y = torch.as_tensor(reference.reshape(len(reference), -1), dtype=torch.float64)
    if not torch.isfinite(x).all():
        return float("inf")
    if score == "energy":
        from qdrift_stats.metrics import energy_distance

        return float(energy_distance(x, y))
    if score != "mmd":
        raise QDriftError(f"unknown score {score!r}; choose mmd or energy")
    g = 1.0 / (2.0 * bandwidth**2)
    kxx, kyy, kxy = (torch.exp(-g * _pairwise_sq(a, b)) for a, b in ((x, x), (y, y), (x, y)))
    n, m = len(x), len(y)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def profiled_file(fitted: FittedEstimator, form: str, strength: np.ndarray) -> EstimatorFile:
    """The estimator file of ``fitted`` asking for ``form``, with a per-step strength folded into its statistic.

    This is the file ``qdrift fit`` would export, so a candidate is scored with the very correction a user would
    sample with (residual terms, landing-level pull, PTQD terms and output map included); only the tensors of
    :data:`PROFILED_TENSORS` are multiplied by ``strength`` ``(steps,)`` (the file's own strength stays 1).
    """
    file = EstimatorFile.from_fitted(fitted, correction=form)
    strength = np.asarray(strength, dtype=np.float64)
    for key in PROFILED_TENSORS:
        if key in file.tensors:
            value = file.tensors[key]
            file.tensors[key] = value * strength.reshape((-1,) + (1,) * (value.ndim - 1))
    return file


def corrects_output(fitted: FittedEstimator) -> bool:
    """Whether the fit's correction changes the model output (PTQD terms, an output map): it then acts at
    strength 0 too."""
    return fitted.k is not None or fitted.mu is not None or any(k in fitted.export_tensors() for k in OUTPUT_TENSORS)


def _kernel(x: torch.Tensor, y: torch.Tensor, score: str, bandwidth: float) -> torch.Tensor:
    """The pairwise kernel whose ``s_xx + s_yy - 2 s_xy`` is the score: Gaussian for MMD², minus the distance
    for the energy distance."""
    if score == "energy":
        return -torch.cdist(x, y)
    return torch.exp(-_pairwise_sq(x, y) / (2.0 * bandwidth**2))


def paired_score_difference(
    a: np.ndarray,
    b: np.ndarray,
    reference: np.ndarray,
    score: str = "mmd",
    bandwidth: float = 1.0,
    n_boot: int = 400,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(difference, low, high)``: ``score(a) - score(b)`` against ``reference`` with a paired bootstrap interval.

    ``a``, ``b`` and ``reference`` are ``(n, ...)`` sample sets whose row ``i`` comes from the same initial
    noise (the same seed and sample index), so each replicate resamples one set of row indices for all three.
    The reference's own term is common to both scores and cancels. Percentile interval at ``confidence``
    (two-sided); the point difference is that of :func:`distribution_score`.
    """
    if not (len(a) == len(b) == len(reference)):
        raise QDriftError("a paired score difference needs sets of the same size, row i from the same noise")
    x, z, y = (torch.as_tensor(v.reshape(len(v), -1), dtype=torch.float64) for v in (a, b, reference))
    n = len(x)
    kxx, kzz = _kernel(x, x, score, bandwidth), _kernel(z, z, score, bandwidth)
    kxy, kzy = _kernel(x, y, score, bandwidth), _kernel(z, y, score, bandwidth)
    point = distribution_score(a, reference, score, bandwidth) - distribution_score(b, reference, score, bandwidth)
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for rep in range(n_boot):
        idx = torch.as_tensor(rng.integers(0, n, n))
        diff = kxx[idx][:, idx] - kzz[idx][:, idx]
        if score == "mmd":  # a U-statistic, as distribution_score: pairs of one draw with itself left out
            distinct = idx[:, None] != idx[None, :]
            within = diff[distinct].mean()
        else:  # a V-statistic, as energy_distance
            within = diff.mean()
        across = (kxy[idx][:, idx] - kzy[idx][:, idx]).mean()
        reps[rep] = float(within - 2.0 * across)
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(reps, [tail, 100.0 - tail])
    return float(point), float(low), float(high)


def segment_index(b_next: np.ndarray, segments: int) -> np.ndarray:
    """``(steps,)`` the strength segment of each step: equal-count groups of the corrected steps by ``log b_next``
    (segment 0 the noisiest); -1 for steps that land on ``b = 0``."""
    b_next = np.asarray(b_next, dtype=np.float64)
    out = np.full(len(b_next), -1, dtype=np.int64)
    active = np.flatnonzero(b_next > 0)
    if len(active) == 0:
        return out
    order = active[np.argsort(-b_next[active], kind="stable")]
    for s, chunk in enumerate(np.array_split(order, max(1, min(segments, len(order))))):
        out[chunk] = s
    return out


@dataclass
class AutoFit(FittedEstimator):
    """The chosen correction: ``variance`` is the chosen estimator's statistic times the strength profile.

    ``choice``: what was chosen (``estimator``, ``form``, ``profile`` per segment, ``segment_b``, the
    held-out ``score`` and Q's) and ``trials``: every (estimator, form, profile, score) evaluated.
    """

    choice: dict[str, Any] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)
    chosen_tensors: dict[str, np.ndarray] = field(default_factory=dict)
    chosen_metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def default_correction(self) -> str:
        return str(self.choice.get("form", "shrink"))

    def export_tensors(self) -> dict[str, np.ndarray]:
        """The chosen fit's own tensors (residual terms, output map, ...; the landing pull's independent variance
        times the profile), so the exported file corrects exactly as the candidate scored."""
        return dict(self.chosen_tensors)

    def export_metadata(self) -> dict[str, Any]:
        return {**self.chosen_metadata, "auto": self.choice}

    def summary(self, max_rows: int = 12) -> str:
        c = self.choice
        lines = [super().summary(max_rows), "automatic choice (cross-validation over calibration runs):"]
        if c.get("estimator") is None:
            lines.append(
                "  no correction: nothing tried scored below uncorrected Q on the held-out runs "
                f"(Q {c.get('q_score'):.4g})"
            )
        else:
            profile = ", ".join(f"{p:g}" for p in c["profile"])
            lines.append(
                f"  chose {c['estimator']} with the {c['form']} form, strength profile [{profile}] over "
                f"{len(c['profile'])} segments of log b (noisiest first)"
            )
            lower = f"{c['improvement']:.0%} lower" if c["q_score"] > 0 else f"{c['q_score'] - c['score']:.3g} lower"
            lines.append(
                f"  held-out {c['score_name']}: {c['score']:.4g} against {c['q_score']:.4g} uncorrected ({lower})"
            )
            if c.get("reason"):
                lines.append(f"  why: {c['reason']}")
            against = c.get("against_default")
            if against:
                lines.append(
                    f"  best found - {against['against']}: {against['difference']:.3g} "
                    f"[{against['low']:.3g}, {against['high']:.3g}] (paired bootstrap over the held-out samples)"
                )
        best = {}
        for t in self.trials:
            key = t["estimator"]
            if key not in best or t["score"] < best[key]["score"]:
                best[key] = t
        for key, t in sorted(best.items(), key=lambda kv: kv[1]["score"]):
            lines.append(f"  best {key:<18} {t['form']:<7} profile {t['profile']}  score {t['score']:.4g}")
        return "\n".join(lines)


class AutoEstimator(Estimator):
    """Chooses estimator, correction form and strength profile by leave-one-run-out cross-validation.

    Args:
        candidates: registered estimator names to try.
        forms: correction forms to try on the best estimator and profile (the first one is used
            during the search).
        strengths: the strength grid (for the global strength and for each segment).
        segments: pieces of the strength profile, equal-count groups of steps by ``log b``.
        score: ``"mmd"`` (default) or ``"energy"``.
        max_folds: most held-out runs (the first ones); all runs by default.
        patience: each strength scan (ascending) stops after this many strengths in a row score no better than
            the best so far; ``None`` scans the whole grid.
        anchor: the candidate kept at strength 1 in the first form (the library default, ``persistent``) unless
            the search's best beats it beyond the held-out noise: the upper end of the paired bootstrap interval
            (:func:`paired_score_difference`, ``confidence``) of ``score(best) - score(anchor)`` is below 0.
            Where the anchor scores no better than Q the search's best is taken as it is. ``None``, or the default
            anchor when it is not among ``candidates``: the plain argmin.
        pair: the model pair (``qdrift fit --pair``); required, never taken from the store.
    """

    name = "auto"
    confidence = 0.95
    unrecorded_params = ("pair",)

    def __init__(
        self,
        candidates: tuple[str, ...] = CANDIDATES,
        forms: tuple[str, ...] = ("shrink", "drift"),
        strengths: tuple[float, ...] = STRENGTHS,
        segments: int = 2,
        score: str = "mmd",
        max_folds: int | None = None,
        patience: int | None = 2,
        anchor: str | None = DEFAULT_ANCHOR,
        pair: Any = None,
    ):
        if score not in SCORES:
            raise QDriftError(f"unknown score {score!r}; choose mmd or energy")
        if not candidates or not forms or not strengths:
            raise QDriftError("auto needs at least one candidate, form and strength")
        if segments < 1:
            raise QDriftError("segments must be at least 1")
        if patience is not None and patience < 1:
            raise QDriftError("patience must be at least 1 (or None for the whole grid)")
        self.candidates = tuple(candidates)
        self.forms = tuple(forms)
        self.strengths = tuple(float(s) for s in strengths)
        self.segments = int(segments)
        self.score = score
        self.max_folds = max_folds
        self.patience = None if patience is None else int(patience)
        if anchor is not None and anchor not in self.candidates:
            if anchor != DEFAULT_ANCHOR:
                raise QDriftError(f"the anchor {anchor!r} must be one of the candidates {list(self.candidates)}")
            anchor = None  # the library default is not among the candidates: the plain argmin
        self.anchor = anchor
        self.pair = pair

    @property
    def params(self) -> dict[str, Any]:
        p = super().params
        return {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()}

    def _pair(self, ds: xr.Dataset):
        from qdrift_stats.pair import check_pair, recorded_pair_hint

        if self.pair is not None:
            return check_pair(self.pair)
        # A pair is code: never imported from the store's 'pair' attribute (a data file).
        raise QDriftError(recorded_pair_hint(ds.attrs.get("pair"), "the automatic choice"))

    def fit(self, store: xr.Dataset | str | Path) -> AutoFit:
        from qdrift_stats.estimators import get_estimator

        ds = as_dataset(store).load()
        runs = ds.sizes["run"]
        if runs < 2:
            raise QDriftError("auto needs at least 2 calibration runs (one is held out at a time)")
        pair = self._pair(ds)
        scheduler_name, steps = str(ds.attrs.get("scheduler")), int(ds.sizes["step"])
        batch = int(ds.sizes["sample"])
        seeds = [int(s) for s in ds["seed"].values]
        folds = list(range(runs if self.max_folds is None else min(runs, int(self.max_folds))))
        grid = step_grid(prepared_scheduler(pair, scheduler_name, steps))
        seg = segment_index(grid.b_next, self.segments)
        n_seg = int(seg.max()) + 1 if np.any(seg >= 0) else 1

        def scheduler():
            return prepared_scheduler(pair, scheduler_name, steps)

        def draw(seed: int, model: str, corrector: Corrector | None = None) -> np.ndarray:
            sched = scheduler()
            x, cond = initial_noise(pair, sched, batch, seed)
            if corrector is not None:
                corrector = corrector.to(x.device, x.dtype)
            with torch.no_grad():
                out = run_sampler(pair.fp if model == "fp" else pair.q, sched, x, cond, corrector)
            return out.detach().double().cpu().numpy()

        reference = np.concatenate([draw(seeds[r], "fp") for r in folds])
        uncorrected = np.concatenate([draw(seeds[r], "q") for r in folds])
        bandwidth = local_bandwidth(reference)
        q_score = distribution_score(uncorrected, reference, self.score, bandwidth)
        fits: dict[str, list[FittedEstimator]] = {}

        def candidate(name: str):
            est = get_estimator(name)
            return est.with_params(pair=pair) if "pair" in est.param_names() else est

        for name in self.candidates:
            fits[name] = [candidate(name).fit(ds.isel(run=[k for k in range(runs) if k != r])) for r in folds]

        trials: list[dict[str, Any]] = []
        cache: dict[tuple, float] = {}
        pooled: dict[tuple, np.ndarray] = {}  # the corrected held-out samples of each key, rows as in `reference`
        acts_at_zero = {name: any(corrects_output(f) for f in fits[name]) for name in self.candidates}

        def evaluate(name: str, form: str, profile: tuple[float, ...]) -> float:
            key = (name, form, profile)
            if key in cache:
                return cache[key]
            if all(p == 0 for p in profile) and not acts_at_zero[name]:
                cache[key] = q_score
                return q_score
            lam = np.array([profile[s] if s >= 0 else 0.0 for s in seg])
            draws = []
            for fold, r in enumerate(folds):
                file = profiled_file(fits[name][fold], form, lam)
                draws.append(draw(seeds[r], "q", file.corrector(scheduler(), device="cpu", dtype=torch.float64)))
            pooled[key] = np.concatenate(draws)
            value = distribution_score(pooled[key], reference, self.score, bandwidth)
            cache[key] = value
            trials.append({"estimator": name, "form": form, "profile": list(profile), "score": value})
            return value

        def scan(name: str, form: str, profile_at) -> tuple[float, tuple[float, ...]]:
            """The best (score, profile) over the strength grid, ascending; stops ``patience`` strengths after
            the best so far."""
            best_here, worse = (float("inf"), profile_at(self.strengths[0])), 0
            for lam in sorted(self.strengths):
                value = evaluate(name, form, profile_at(lam))
                if value < best_here[0]:
                    best_here, worse = (value, profile_at(lam)), 0
                else:
                    worse += 1
                    if self.patience is not None and worse >= self.patience:
                        break
            return best_here

        form0 = self.forms[0]
        best = (q_score, None, form0, (0.0,) * n_seg)
        for name in self.candidates:
            value, profile = scan(name, form0, lambda lam: (lam,) * n_seg)
            if value < best[0]:
                best = (value, name, form0, profile)
        if best[1] is not None and n_seg > 1:
            name = best[1]
            for s in range(n_seg):
                held = list(best[3])
                value, profile = scan(name, form0, lambda lam: tuple(held[:s] + [lam] + held[s + 1 :]))  # noqa: B023
                if value < best[0]:
                    best = (value, name, form0, profile)
        if best[1] is not None:
            for form in self.forms[1:]:
                value = evaluate(best[1], form, best[3])
                if value < best[0]:
                    best = (value, best[1], form, best[3])
        score, chosen, form, profile = best
        reason = "lowest held-out score" if chosen else "nothing tried scored below uncorrected Q on the held-out runs"
        comparison = None
        if self.anchor is not None:
            anchor_key = (self.anchor, form0, (1.0,) * n_seg)
            anchor_score = evaluate(*anchor_key)
            if anchor_score < q_score and anchor_score <= score:
                # the default scored lowest (also when a scan stopped before the default's strength)
                score, chosen, form, profile = anchor_score, *anchor_key
                reason = f"the default {self.anchor} scored lowest"
            elif anchor_score < q_score:
                # the default stays unless the search's best beats it beyond the held-out noise (paired bootstrap)
                difference, low, high = paired_score_difference(
                    pooled[(chosen, form, profile)],
                    pooled[anchor_key],
                    reference,
                    self.score,
                    bandwidth,
                    confidence=self.confidence,
                )
                comparison = {"against": self.anchor, "difference": difference, "low": low, "high": high}
                if high >= 0:
                    reason = (
                        f"{chosen} ({form}, profile {list(profile)}) did not beat the default {self.anchor} beyond the "
                        "held-out noise"
                    )
                    score, chosen, form, profile = anchor_score, *anchor_key
                else:
                    reason = f"beats the default {self.anchor} beyond the held-out noise"
        full = candidate(chosen or self.candidates[0]).fit(ds)
        lam = np.array([profile[s] if s >= 0 else 0.0 for s in seg]) if chosen else np.zeros(len(seg))
        variance = full.variance * lam.reshape((-1,) + (1,) * (full.variance.ndim - 1))
        bounds = [float(grid.b_next[seg == s].min()) for s in range(n_seg)] if np.any(seg >= 0) else []
        choice = {
            "estimator": chosen,
            "estimator_params": full.params if chosen else None,
            "form": form,
            "profile": [float(p) for p in profile],
            "segment_b": bounds,
            "score_name": self.score,
            "score": float(score),
            "q_score": float(q_score),
            "improvement": float(1.0 - score / q_score) if q_score > 0 else float("nan"),
            "reason": reason,
            "against_default": comparison,
            "held_out_runs": [seeds[r] for r in folds],
            "bandwidth": bandwidth,
        }
        scale = lam.reshape((-1,) + (1,) * (full.variance.ndim - 1))
        tensors = full.export_tensors() if chosen else {}
        if "independent_variance" in tensors:
            tensors["independent_variance"] = tensors["independent_variance"] * scale
        return AutoFit.on_store(
            ds,
            self,
            variance,
            full.ci_low * scale,
            full.ci_high * scale,
            np.empty((0,)),
            k=full.k if chosen else None,
            mu=full.mu if chosen else None,
            choice=json.loads(json.dumps(choice)),
            trials=trials,
            chosen_tensors=tensors,
            chosen_metadata=full.export_metadata() if chosen else {},
        )
