"""``selected``: choose the predictor by K-fold cross-validation on the training data, then refit it.

Candidates (``CANDIDATES``) are registry entries at given settings: the joint network at a few
capacities and regularisation strengths (each on the default step budget; the former
``r2ray_steps``, batch 128 for 40 epochs, is now the default's plan below ~2,900 queries), per-arm
Ridge at two strengths, CARROT KNN / linear on every arm, ``stacked``, a per-arm convex blend
of the other candidates in the set (:mod:`r2ray.predictor.stacked`), and ``averaged``, their plain
mean, each calibrated (:mod:`r2ray.predictor.averaged`). Folds are by query, over the
training data only (the caller never passes its test split), in the calibrations' order
(:func:`~r2ray.predictor.base.model_fold_ids`: each model with rows in two or more queries is
spread over two or more folds, so that every fold's fit sees it; :func:`check_folds_see_models`
refuses a model that is not): at the default 3 folds a single winner is calibrated
exactly as it is when fitted alone. Every candidate is fitted ``folds`` times and predicts the fold
it did not see; those out-of-fold predictions are then corrected as the router would see them
(token and quality calibrations cross-fitted over the out-of-fold rows by the same folds, each
candidate's q̂ mapped along its own budget chains as it predicts: a fold's
rows are mapped by calibrations fitted on the other folds' rows, never on rows its own fold model
predicted, as the router's maps never saw the refitted model; mixing them in raised the joint
network's CV AUDC by 0.008 on the small ParetoBandit copy, Ridge's by 0.001) and scored per fold
with the evaluation package's AUDC (:func:`r2ray.evaluation.method_scores.score_predictions`: the metric
``r2ray evaluate`` reports, costs normalised over the non-learned methods). The stack's weights are
cross-fitted too: for each fold, fitted on the other folds' out-of-fold predictions. (Those came
from members that saw this fold's labels, a small optimism the single candidates do not get.) The
average needs no fit: its out-of-fold predictions are the mean of the single candidates' ones, each
corrected as the router would see it, then scored like the others (its own token calibration on
top; no q̂ map of its own). Its members are the set's ``per_arm_ridge``, ``carrot_knn_all`` and
``r2ray`` (``AVERAGED_MEMBERS``, the mean measured), those of them the set has.

The winner has the highest mean AUDC; candidates within ``AUDC_TIE`` of it are tied, and the tie
goes to the lower Brier score, then the lower log-token MAE. When ``averaged`` was scored, it is
kept unless that winner beats it by more than one standard error of their paired per-fold AUDC
gap (the one-standard-error rule): on a few hundred queries three folds cannot tell candidates
apart, and the average was the steadiest choice on every bench measured (``docs/design.md``). It is refitted on all the training
data and wrapped: the ``selected`` predictor predicts with it, and its calibrations and spend
simulation are fitted on the winner's out-of-fold predictions (no further refits). The CV table
is kept in the fitted state (``selection_``) and saved with it. A candidate whose fit raises, or
that predicts no arm of a scored query (NaN), stops the selection with an error naming it: never
dropped from the table in silence. A composite whose members a search (``--tune``'s ASHA)
stopped, all but one, is listed as not scored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from r2ray.catalog import Catalog
from r2ray.errors import R2RayError
from r2ray.predictor.averaged import averaged_out_of_fold
from r2ray.predictor.base import (ArmPredictions, BasePredictor, check_fold_count, fold_counts,
                                  model_fold_ids, model_presence, out_of_fold, router_view)
from r2ray.predictor.data import BenchArrays
from r2ray.predictor.stacked import cross_fitted_stack

AUDC_TIE = 0.001  # mean-AUDC gap under which two candidates count as tied
STACKED = "stacked"
AVERAGED = "averaged"
COMPOSITES = (STACKED, AVERAGED)   # candidates made of the single ones
AVERAGED_MEMBERS = ("per_arm_ridge", "carrot_knn_all", "r2ray")  # the average measured (module doc)

CANDIDATES: dict[str, tuple[str, dict]] = {   # name → (registry key, settings)
    "r2ray": ("r2ray", {}),
    "r2ray_small": ("r2ray", {"query_hidden": 64, "joint_hidden": 64, "head_hidden": 32}),
    "r2ray_decay": ("r2ray", {"weight_decay": 0.5, "dropout": 0.3}),
    "r2ray_rank": ("r2ray", {"rank": 16}),
    "r2ray_residual": ("r2ray_residual", {}),
    "per_arm_ridge": ("per_arm_ridge", {}),
    "per_arm_ridge_strong": ("per_arm_ridge", {"alpha": 100.0}),
    "carrot_knn_all": ("carrot_knn_all", {}),
    "carrot_linear_all": ("carrot_linear_all", {}),
}
CANDIDATE_SETS = {
    "small": ["per_arm_ridge", "carrot_knn_all", "r2ray", STACKED, AVERAGED],
    "fast": ["per_arm_ridge", "per_arm_ridge_strong", "carrot_knn_all", STACKED, AVERAGED],
    "full": [*CANDIDATES, STACKED, AVERAGED],
}


@dataclass(frozen=True)
class Candidate:
    name: str
    kind: str       # a key of r2ray.predictor.PREDICTORS
    settings: dict

    def build(self) -> BasePredictor:
        from r2ray.predictor import make_predictor

        return make_predictor(self.kind, **self.settings)


def resolve_candidates(spec: str | list[str], overrides: dict[str, dict] | None = None,
                       seed: int = 0) -> list[Candidate]:
    """A set name (``small``, ``fast``, ``full``) or candidate names → candidates; ``overrides``
    ({registry key: settings}) apply to every candidate of that key; ``stacked`` and
    ``averaged`` combine the others. A candidate with a ``seed`` setting gets ``seed``."""
    names = CANDIDATE_SETS.get(spec, None) if isinstance(spec, str) else list(spec)
    if names is None:
        names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in CANDIDATES and n not in COMPOSITES]
    if unknown or not names:
        problem = f"unknown candidate(s) {unknown}" if unknown else \
            f"--candidates {spec!r} names no candidate"
        raise R2RayError(f"{problem}; choose a set ({', '.join(CANDIDATE_SETS)}) or names from "
                         f"{', '.join([*CANDIDATES, *COMPOSITES])}")
    unused = sorted(set(overrides or {}) - {CANDIDATES[n][0] for n in names if n in CANDIDATES})
    if unused:   # silently fitting the candidates without them would look like they were used
        raise R2RayError(f"settings for {', '.join(unused)} apply to no candidate "
                         f"({', '.join(names)}): name a candidate of that kind in --candidates, "
                         "or fit it alone with --select none")
    singles = []
    for name in dict.fromkeys(n for n in names if n not in COMPOSITES):
        kind, settings = CANDIDATES[name]
        settings = {**settings, **(overrides or {}).get(kind, {})}
        if "seed" in Candidate(name, kind, settings).build().settings():
            settings.setdefault("seed", seed)
        singles.append(Candidate(name, kind, settings))
    composites = []
    for name in [n for n in COMPOSITES if n in names]:
        members = composite_members(name, singles)
        if len(members) < 2:
            raise R2RayError(f"the {name} candidate needs at least two other candidates"
                             + (f" of {', '.join(AVERAGED_MEMBERS)}" if name == AVERAGED else ""))
        composites.append(composite_candidate(name, members, seed))
    return singles + composites


def composite_candidate(name: str, members: list[Candidate], seed: int) -> Candidate:
    return Candidate(name, name, {
        "members": [{"kind": c.kind, "settings": c.settings} for c in members], "seed": seed})


def composite_members(name: str, singles: list[Candidate]) -> list[Candidate]:
    """What a composite candidate combines: the stack, every single candidate; the average,
    those named in ``AVERAGED_MEMBERS``, in that order."""
    if name == STACKED:
        return singles
    by_name = {c.name: c for c in singles}
    return [by_name[n] for n in AVERAGED_MEMBERS if n in by_name]


@dataclass
class CrossValidation:
    table: list[dict]                          # one row per scored candidate, in candidate order
    winner: str
    out_of_fold: dict[str, ArmPredictions]     # uncorrected, every training row
    candidates: list[Candidate] = field(default_factory=list)   # those scored (a search may stop some)
    stopped: list[dict] = field(default_factory=list)   # name, folds done, running AUDC: ASHA's
    fold: np.ndarray | None = None   # [N] the fold whose fit made each row's out-of-fold prediction
    unscored: list[str] = field(default_factory=list)   # composites left with < 2 members kept

    @property
    def measured_uncalibrated(self) -> bool:
        """Whether the AUDC of q̂ without its calibration was scored (``cross_validate``'s
        ``uncalibrated``: `r2ray train` does not ask, it doubles the scoring time)."""
        return any(row["audc_uncalibrated"] is not None for row in self.table)

    def report(self) -> str:
        """The table as text; the uncalibrated AUDC column only when it was measured (an
        always-empty column would read as a failed measurement)."""
        raw = self.measured_uncalibrated
        lines = [f"{'candidate':22} {'CV AUDC':>15} " + (f"{'uncalibrated':>12} " if raw else "")
                 + f"{'Brier':>7} {'log-tok MAE':>11} {'ECE':>6} {'fit s':>7}"]
        for row in sorted(self.table, key=lambda r: -r["audc"]):
            mark = " ← chosen" if row["name"] == self.winner else ""
            uncalibrated = ("—" if row["audc_uncalibrated"] is None
                            else f"{row['audc_uncalibrated']:.4f}")
            lines.append(f"{row['name']:22} {row['audc']:>7.4f} ± {row['audc_std']:.4f} "
                         + (f"{uncalibrated:>12} " if raw else "")
                         + f"{row['brier']:>7.4f} {row['log_tokens_mae']:>11.4f} "
                         f"{row['ece']:>6.4f} {row['fit_seconds']:>7.1f}{mark}")
        lines += [f"{row['name']:22} stopped by ASHA after {row['folds']} fold(s), running AUDC "
                  f"{row['audc']:.4f} (uncalibrated)" for row in self.stopped]
        lines += [f"{name:22} {unscored_reason(name)}" for name in self.unscored]
        return "\n".join(lines)


OutOfFoldSearch = Callable[[list[Candidate], BenchArrays, Catalog, np.ndarray,
                            Callable[[str], None]],
                           tuple[dict[str, ArmPredictions], dict[str, float], list[dict]]]
"""(singles, train, catalog, fold ids, log) → (out-of-fold predictions of the candidates it kept,
fit seconds, the stopped ones): how the candidates are fitted. Default: each in turn, here;
``r2ray.tuning.asha_search``: as Ray Tune trials, ASHA stopping the trailing ones."""


def sequential_search(singles: list[Candidate], train: BenchArrays, catalog: Catalog,
                      fold: np.ndarray, log: Callable[[str], None]):
    oof, seconds = {}, {}
    for candidate in singles:
        started = time.perf_counter()
        try:
            oof[candidate.name] = out_of_fold(candidate.build, train, catalog, fold)
        except Exception as err:  # noqa: BLE001 — whatever a fit raises, say which candidate
            raise failed_candidate(candidate, err) from err
        seconds[candidate.name] = time.perf_counter() - started
        log(f"  cv: {candidate.name} {len(np.unique(fold))} folds in "
            f"{seconds[candidate.name]:.1f} s")
    return oof, seconds, []


def failed_candidate(candidate: Candidate, err: Exception) -> R2RayError:
    """The error for a candidate whose fit raised: the fit's own message says what failed, not
    which of the candidates it was, nor that the others were fine."""
    return R2RayError(f"cross-validation: candidate {candidate.name!r} ({candidate.kind}, "
                      f"settings {candidate.settings}) failed to fit: {type(err).__name__}: "
                      f"{err}; drop it from --candidates or change its settings")


def cross_validate(train: BenchArrays, catalog: Catalog, candidates: list[Candidate],
                   folds: int = 3, seed: int = 0,
                   log: Callable[[str], None] = lambda line: None,
                   uncalibrated: bool = False,
                   search: OutOfFoldSearch | None = None) -> CrossValidation:
    """Out-of-fold predictions of every candidate on ``train``, scored per fold (module doc);
    ``uncalibrated``: also score q̂ without its calibration (a measurement, not a criterion).
    ``seed`` seeds the stack, not the folds. ``search`` fits the single candidates (default
    :func:`sequential_search`); the stack and the average then combine those it kept."""
    check_fold_count(train.n_queries, folds, "cross-validation")
    fold = model_fold_ids(train, catalog, folds)  # the calibrations' folds, not ``seed``
    check_folds_see_models(train, catalog, fold, folds)
    singles = [c for c in candidates if c.kind not in COMPOSITES]
    oof, seconds, stopped = (search or sequential_search)(singles, train, catalog, fold, log)
    kept = [c for c in singles if c.name in oof]
    chains = {c.name: c.build().quality_chains(catalog) for c in kept}   # the q̂ maps' chains
    combine = {STACKED: lambda members: cross_fitted_stack(
                   [oof[c.name] for c in members], train, fold),
               AVERAGED: lambda members: averaged_out_of_fold(
                   [oof[c.name] for c in members], train, catalog, fold,
                   [chains[c.name] for c in members])}
    composites, unscored = [], []
    for name in [c.kind for c in candidates if c.kind in COMPOSITES]:
        members = composite_members(name, kept)
        if len(members) < 2:                    # the search stopped the others: say so
            unscored.append(name)
            log(f"  cv: {name} {unscored_reason(name)}")
            continue
        started = time.perf_counter()
        oof[name] = combine[name](members)
        seconds[name] = time.perf_counter() - started
        composites.append(composite_candidate(name, members, seed))
    kept += composites
    chains |= {c.name: c.build().quality_chains(catalog) for c in composites}
    table = [row | {"name": c.name, "kind": c.kind, "fit_seconds": seconds[c.name]}
             for c, row in zip(kept, score_out_of_fold(
                 {c.name: oof[c.name] for c in kept}, train, catalog, fold, uncalibrated,
                 raw_quality={c.name for c in kept if not c.build().calibrates_quality},
                 chains=chains).values())]
    winner = choose(table)
    for row in table:
        row["chosen"] = row["name"] == winner
    return CrossValidation(table, winner, oof, kept, stopped, fold, unscored)


def unscored_reason(composite: str) -> str:
    """Why ``composite`` has no row in the CV table (a search stopped its members): a candidate
    asked for never vanishes from the table, the log and MLflow's cv_selection.txt in silence."""
    return "not scored: the search stopped all but one of its members (fewer than two kept)"


def check_folds_see_models(train: BenchArrays, catalog: Catalog, fold: np.ndarray,
                           folds: int) -> None:
    """Every model must have training rows in two or more folds (:func:`model_fold_ids` spreads
    those it can): the fold holding all of a model's rows would be predicted by a fit that never
    saw it (NaN, or the joint network's guess from an untrained model embedding), and its score
    would compare candidates on that, not on what they learned."""
    presence = model_presence(train, catalog)
    counts = fold_counts(presence, fold, folds)
    model = catalog.arm_arrays["model_index"]
    for m in np.flatnonzero((counts > 0).sum(axis=1) == 1):
        queries, rows = int(presence[:, m].sum()), int(train.mask[:, model == m].sum())
        raise R2RayError(f"cross-validation: model {catalog.model_names[m]!r} has {rows} row(s) "
                         f"in {queries} training quer{'y' if queries == 1 else 'ies'}, all in one "
                         f"of the {folds} folds, so the fit that holds that fold out "
                         "never sees it; add rows of it for more queries, drop it from --catalog, "
                         "or train with --select none")


def score_out_of_fold(oof: dict[str, ArmPredictions], train: BenchArrays, catalog: Catalog,
                      fold: np.ndarray, uncalibrated: bool = False,
                      raw_quality: set[str] = frozenset(),
                      chains: Mapping[str, list[np.ndarray]] | None = None) -> dict[str, dict]:
    """Per candidate: mean and std over folds of AUDC, Brier, log-token MAE and expected
    calibration error over every out-of-fold cell; with ``uncalibrated``, also the AUDC with q̂
    not calibrated (``audc_uncalibrated``, else None; it doubles the scoring time). Candidates in
    ``raw_quality`` have no q̂ calibration of their own (``calibrates_quality``): their q̂ is
    already their members' calibrated one, so they have no uncalibrated AUDC (None).
    ``chains``: each candidate's budget chains (:meth:`BasePredictor.quality_chains`), so a
    monotone network is scored on the q̂ maps it is fitted with (one per chain), not per arm."""
    from r2ray.evaluation.method_scores import evaluable_queries, score_predictions
    from r2ray.predictor.diagnostics import summary_metrics

    views = {name: router_view(p, train, catalog, name not in raw_quality, fold,
                               (chains or {}).get(name, []))
             for name, p in oof.items()}
    raw = {f"{name}\x00raw": router_view(p, train, catalog, False, fold)
           for name, p in oof.items() if name not in raw_quality} if uncalibrated else {}
    per_fold = []
    for f in np.unique(fold):
        rows = np.flatnonzero(fold == f)   # a fold is scored as sampled or not on its own rows
        rows = rows[evaluable_queries(train.subset(rows), catalog)]   # (is_sampled): so judged
        if len(rows):
            check_predicts_every_query(views, train, catalog, rows)
            both = {n: p.subset(rows) for n, p in (views | raw).items()}
            per_fold.append(score_predictions(both, train.subset(rows), catalog))
    if not per_fold:
        raise R2RayError("cross-validation: no training query can be scored (none has every default "
                         "arm, and the bench is not sampled: see evaluation.method_scores.is_sampled)")
    out = {}
    for name, view in views.items():
        audc = np.array([scores[name]["audc"] for scores in per_fold])
        metrics = summary_metrics(view, train)
        out[name] = {"audc": float(audc.mean()), "audc_folds": audc.tolist(),
                     "audc_std": float(audc.std(ddof=1)) if len(audc) > 1 else 0.0,
                     "audc_uncalibrated": float(np.mean(
                         [scores[f"{name}\x00raw"]["audc"] for scores in per_fold]))
                     if uncalibrated and name not in raw_quality else None,
                     "brier": metrics["test_brier"],
                     "log_tokens_mae": metrics["test_log_tokens_mae"],
                     "ece": metrics["test_calibration_error"]}
    return out


def check_predicts_every_query(views: dict[str, ArmPredictions], train: BenchArrays,
                               catalog: Catalog, rows: np.ndarray) -> None:
    """A candidate must predict q̂ and t̂ on an arm the bench has for every scored query of a
    full-information fold (a replayed one skips queries by design): else the scoring stops at a
    fold-local query index without saying whose predictions were NaN (a fit that diverged)."""
    from r2ray.evaluation.method_scores import is_sampled

    if is_sampled(train.subset(rows), catalog):
        return
    present = np.isfinite(train.quality[rows])
    for name, view in views.items():
        usable = present & np.isfinite(view.quality[rows]) & np.isfinite(view.output_tokens[rows])
        blind = rows[~usable.any(axis=1)]
        if blind.size:
            first = str(train.query_id[blind[0]])
            raise R2RayError(f"cross-validation: candidate {name!r} predicted no arm of query_id "
                             f"{first!r} (nor of {blind.size - 1} more of the {rows.size} "
                             "scored in its fold: NaN q̂ or t̂, a fit that failed); drop it "
                             "from --candidates or change its settings")


def choose(table: list[dict], prefer: str = AVERAGED) -> str:
    """Highest mean AUDC; within ``AUDC_TIE`` of it, lowest Brier, then lowest log-token MAE;
    but ``prefer``, when in the table, unless the winner's per-fold AUDC (``audc_folds``) beats
    its by more than one standard error of the paired gap."""
    best = max(row["audc"] for row in table)
    tied = [row for row in table if row["audc"] >= best - AUDC_TIE]
    winner = min(tied, key=lambda row: (row["brier"], row["log_tokens_mae"]))
    preferred = next((row for row in table if row["name"] == prefer), None)
    if preferred is None or preferred is winner or "audc_folds" not in preferred:
        return winner["name"]
    gap = np.asarray(winner["audc_folds"]) - np.asarray(preferred["audc_folds"])
    error = gap.std(ddof=1) / np.sqrt(len(gap)) if len(gap) > 1 else 0.0
    return prefer if gap.mean() <= error else winner["name"]
