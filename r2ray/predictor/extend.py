"""Cold start of a new model: a fitted predictor extended to a catalogue with more models, fitting
only the new models' own parameters on a few labelled rows, everything else frozen.

Retraining the whole predictor for every model a team adds costs a full bench of the new model
and a full fit; the learned structure of the old pool (how quality moves with the budget, which
queries are hard) carries over. :func:`extend_predictor` takes the fitted predictor, the extended
catalogue (every old model with the same prices, context and budgets; new models anywhere) and
rows of the new models, and returns a predictor over the extended catalogue whose old arms
predict exactly as before. Per kind:

* ``r2ray`` (the joint network): the query tower, arm tower, head and the old models' embeddings
  and arm biases are frozen. The new models get a model-embedding row (started at the mean of the
  old rows), the new arms a bias pair (started at the mean bias of the old arms with the same
  budget), and budget values the old catalogue lacked an embedding row (started at the mean).
  Only those are fitted, full batch by L-BFGS on the new rows, with a Gaussian prior pulling them
  toward their start (``prior``, in pseudo-queries): a new model is placed in the learned model
  space, so a few queries move a few dozen numbers, not a network. Arm features are standardised
  with the statistics the network was trained with, read back from its own arm inputs
  (:func:`r2ray.predictor.network.extended_arm_table`), so the frozen arm tower sees old arms'
  inputs unchanged, and an extended network can be extended again.
* ``per_arm_ridge``, ``carrot_linear_*``: per-arm models share nothing, so the new arms get their
  own fits on the new rows alone.
* ``stacked``: each member extended; a member that cannot cover new arms (``carrot_knn_*``: its
  neighbours are the old training queries, which have no outcome for the new model) predicts NaN
  there and the blend renormalises over the others; new arms take the mean of the old arms' blend
  weights. A new arm no member covers (a stack of KNNs alone) is refused where the old arms of its
  budget are predicted.
* ``averaged``: each member extended with its own calibrations (it predicts with them), by
  :func:`extend_predictor` itself; a KNN member covers the old arms only, and the mean on the new
  ones is over the others (refused, as a stack, where no member covers a new arm). Each
  cross-fitting fold extends the members on the other folds' rows, so each new model needs
  :data:`MIN_NEW_MODEL_QUERIES` queries in every fold's fitting part
  (:func:`check_folds_calibrate_members`).
* ``selected``: its winner extended.
* Anything else (``per_arm_mlp``, a lone ``carrot_knn_*``) is an :class:`ExtensionError` saying why.

Calibrations are per arm, so they are extended too: the new arms' token and quality calibrations
are fitted on out-of-fold predictions of the new rows (the extension refitted ``folds`` times, each
predicting the rows it did not see; a monotone network's new budget chains share one q̂ map, as
in its fit), old arms keep theirs. The spend simulation stays the old
pool's: the new rows do not give realised outcomes of the old arms on the same queries.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from r2ray.catalog import Catalog, budget_label
from r2ray.encoders import check_embedding_dimension
from r2ray.errors import R2RayError
from r2ray.predictor.base import (ArmPredictions, BasePredictor, data_fingerprint, log_tokens,
                                  model_fold_ids, model_presence, training_embedding)
from r2ray.predictor.data import BenchArrays
from r2ray.predictor.diagnostics import summary_metrics
from r2ray.predictor.network import R2Net, budget_chain, extended_arm_table
from r2ray.predictor.per_arm import fit_ridge
from r2ray.predictor.quality_calibration import extend_quality_calibration, fit_quality_calibration
from r2ray.predictor.token_calibration import extend_token_calibration, fit_token_calibration
from r2ray.predictor.torch_fit import Targets, masked_loss, torch_threads

DEFAULT_PRIOR = 1.0   # pseudo-queries of the prior toward the start values (joint network)
DEFAULT_FOLDS = 3     # cross-fitting folds for the new arms' calibrations
SPEC_FIELDS = ("input_per_m", "output_per_m", "context", "max_output_tokens")


class ExtensionError(R2RayError, ValueError):
    """A predictor, catalogue or rows that cannot be extended; the message says why."""


# ---- catalogues ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Extension:
    old: Catalog
    new: Catalog
    arm_map: np.ndarray    # [K_old] int64: the index in ``new`` of each old arm
    new_arms: np.ndarray   # [A] int64: the new models' arms, indices in ``new``
    new_models: list[str]
    folds: int = DEFAULT_FOLDS   # cross-fitting of the new arms' calibrations (a composite's
    seed: int = 0                # members are each calibrated with the same)

    def place(self, old: np.ndarray, new: np.ndarray, fill=np.nan) -> np.ndarray:
        """Per-arm values along the last axis: ``old`` [..., K_old] and ``new`` [..., A] →
        [..., K_new] in the new catalogue's arm order."""
        out = np.full((*old.shape[:-1], self.new.n_arms), fill, dtype=old.dtype)
        out[..., self.arm_map] = old
        out[..., self.new_arms] = new
        return out


def plan_extension(old: Catalog, new: Catalog) -> Extension:
    """Check that ``new`` keeps every model of ``old`` as it was (prices, context, output cap,
    budgets) and adds at least one; the first mismatch is an error naming model and field."""
    for spec in old.models:
        if spec.name not in new.model_names:
            raise ExtensionError(f"model {spec.name!r} of the registered catalogue is missing from "
                                 "the new catalogue; a warm start keeps every old model")
        other = new.model(spec.name)
        for name in SPEC_FIELDS:
            if getattr(spec, name) != getattr(other, name):
                raise ExtensionError(
                    f"model {spec.name!r}: {name} is {getattr(spec, name)} in the registered "
                    f"catalogue but {getattr(other, name)} in the new one; old models must keep "
                    "their prices, context and caps (retrain with `r2ray train` otherwise)")
        if old.budgets_of(spec.name) != new.budgets_of(spec.name):
            raise ExtensionError(
                f"model {spec.name!r}: budgets {old.budgets_of(spec.name)} in the registered "
                f"catalogue but {new.budgets_of(spec.name)} in the new one (0 = default)")
    added = [m for m in new.model_names if m not in old.model_names]
    if not added:
        raise ExtensionError("the new catalogue adds no model to the registered one: nothing to "
                             "warm-start")
    arm_map = np.array([new.arm_of(arm.model, arm.budget_tokens) for arm in old.arms], np.int64)
    new_arms = np.array([j for j, arm in enumerate(new.arms) if arm.model in added], np.int64)
    return Extension(old, new, arm_map, new_arms, added)


def extension_rows(rows: BenchArrays, extension: Extension) -> tuple[BenchArrays, int]:
    """(rows to fit on, old-model cells ignored): old arms are frozen, so their cells are blanked,
    and queries with no cell of a new model are dropped."""
    old_cells = np.zeros(extension.new.n_arms, dtype=bool)
    old_cells[extension.arm_map] = True
    ignored = int(rows.mask[:, old_cells].sum())
    blank = lambda values: np.where(old_cells[None], np.nan, values)  # noqa: E731
    rows = replace(rows, quality=blank(rows.quality).astype(np.float32),
                   output_tokens=blank(rows.output_tokens).astype(np.float32),
                   cost_usd=blank(rows.cost_usd))
    check_new_models_observed(rows, extension)
    keep = np.flatnonzero(rows.mask.any(axis=1))
    return rows.subset(keep), ignored


MIN_NEW_MODEL_QUERIES = 2
"""Queries a new model needs outcomes on: with one, the calibrations' fold that holds it out
never sees the model, and a per-arm fit predicts that one outcome for every query."""


def check_new_models_observed(rows: BenchArrays, extension: Extension) -> None:
    """Every new model needs outcomes on :data:`MIN_NEW_MODEL_QUERIES` queries: one without any
    would keep its start values, and the joint network predict it from the old pool's mean model
    (a q̂ the router acts on); one on a single query is that query's outcome everywhere."""
    missing = [name for name in rows.unobserved_models(extension.new)
               if name in extension.new_models]
    if missing:
        raise ExtensionError(f"the new rows have no outcome of the new model(s) "
                             f"{', '.join(map(repr, missing))}; add rows of them or drop them "
                             "from --catalog (warm-start them later)")
    queries = model_presence(rows, extension.new).sum(axis=0)
    few = [f"{name!r} ({int(queries[m])})" for m, name in enumerate(extension.new.model_names)
           if name in extension.new_models and queries[m] < MIN_NEW_MODEL_QUERIES]
    if few:
        raise ExtensionError(f"the new model(s) {', '.join(few)} have outcomes on fewer than "
                             f"{MIN_NEW_MODEL_QUERIES} queries: too few to fit and calibrate "
                             "them; add rows of them or drop them from --catalog")


# ---- the joint network --------------------------------------------------------------------------
@dataclass
class GrownNetwork:
    network: R2Net            # over the new catalogue, old parts copied
    new_model_rows: np.ndarray
    new_budget_rows: np.ndarray


def _mean_by_budget(old_values: np.ndarray, old_rows: np.ndarray, new_rows: np.ndarray
                    ) -> np.ndarray:
    """[..., A] start values of new arms: the mean over old arms with the same budget row (of the
    budget embedding), else over all old arms. ``old_values`` [..., K_old]."""
    out = np.empty((*old_values.shape[:-1], len(new_rows)), dtype=old_values.dtype)
    for i, row in enumerate(new_rows):
        same = old_rows == row
        out[..., i] = old_values[..., same if same.any() else slice(None)].mean(axis=-1)
    return out


def grow_network(old: R2Net, extension: Extension) -> GrownNetwork:
    """``old`` over the new catalogue: shared weights and old rows copied, new rows at their start
    values (module doc)."""
    arms = extended_arm_table(extension.new, extension.old, old.arm_features.numpy(),
                              old.arm_budget.numpy())
    config = replace(old.config, n_arms=extension.new.n_arms, n_models=arms.n_models,
                     n_budget_values=arms.n_budget_values)
    if not np.allclose(arms.features[extension.arm_map], old.arm_features.numpy(), atol=1e-5):
        raise ExtensionError("the registered network's arm inputs do not match its own catalogue "
                             "(saved by another r2ray version?); retrain it")
    arms.features[extension.arm_map] = old.arm_features.numpy()  # bit for bit, not to rounding
    network = R2Net(config)
    chain, first = budget_chain(extension.new, config.monotone)
    network.load_arms(arms, chain, first, old.x_mean.numpy(), old.x_scale.numpy())
    shared = {k: v for k, v in old.state_dict().items()
              if k.split(".")[0] in ("query_tower", "arm_tower", "head", "query_factors")}
    network.load_state_dict(shared, strict=False)
    old_models = [extension.new.model_names.index(m) for m in extension.old.model_names]
    new_models = np.array([extension.new.model_names.index(m) for m in extension.new_models])
    n_budgets = old.config.n_budget_values
    old_budget_rows = old.arm_budget.numpy()
    new_budget_rows = arms.budget_index[extension.new_arms]
    with torch.no_grad():
        model_weights = old.model_embedding.weight
        network.model_embedding.weight[old_models] = model_weights
        network.model_embedding.weight[new_models] = model_weights.mean(dim=0)
        budget_weights = old.budget_embedding.weight
        network.budget_embedding.weight[:n_budgets] = budget_weights
        network.budget_embedding.weight[n_budgets:] = budget_weights.mean(dim=0)
        bias = old.arm_bias.numpy()
        network.arm_bias.copy_(torch.as_tensor(extension.place(
            bias, _mean_by_budget(bias, old_budget_rows, new_budget_rows))))
        if old.arm_factors is not None:
            factors = old.arm_factors.numpy().reshape(config.rank, -1, 2).transpose(0, 2, 1)
            grown = extension.place(factors, _mean_by_budget(factors, old_budget_rows,
                                                             new_budget_rows))
            network.arm_factors.copy_(torch.as_tensor(grown.transpose(0, 2, 1).reshape(
                config.rank, -1)))
    return GrownNetwork(network.eval(), new_models,
                        np.arange(n_budgets, arms.n_budget_values))


class NewArms(nn.Module):
    """The new models' parameters over a frozen grown network: x → (quality logits, log tokens)
    of the new arms only (B, A). Query-side activations are precomputed (the tower is frozen)."""

    def __init__(self, grown: GrownNetwork, new_arms: np.ndarray):
        super().__init__()
        net = grown.network
        for parameter in net.parameters():  # frozen: gradients only for the new rows below
            parameter.requires_grad_(False)
        self.net = net
        self.arms = torch.as_tensor(new_arms)
        self.model_rows = torch.as_tensor(grown.new_model_rows, dtype=torch.long)
        self.budget_rows = torch.as_tensor(grown.new_budget_rows, dtype=torch.long)
        self.models = nn.Parameter(net.model_embedding.weight[self.model_rows].detach().clone())
        self.budgets = nn.Parameter(
            net.budget_embedding.weight[self.budget_rows].detach().clone())
        self.bias = nn.Parameter(net.arm_bias[:, self.arms].detach().clone())
        self.start = [p.detach().clone() for p in (self.models, self.budgets, self.bias)]
        self.chain = net.chain[self.arms][:, self.arms]
        self.first = net.chain_first[self.arms]

    def query_side(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.no_grad():
            return self.net.query_side(x)

    def forward(self, h: torch.Tensor, factors: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.net
        models = net.model_embedding.weight.detach().index_put((self.model_rows,), self.models)
        budgets = net.budget_embedding.weight.detach().index_put((self.budget_rows,), self.budgets)
        per_arm = (net.arm_factors.view(net.config.rank, -1, 2)[:, self.arms].reshape(
            net.config.rank, -1) if factors is not None else None)
        return net.joint(h, factors, net.arm_vectors(models, budgets, self.arms), per_arm,
                         self.bias, self.chain, self.first)

    def penalty(self) -> torch.Tensor:
        return sum(((p - s) ** 2).sum() for p, s in zip(
            (self.models, self.budgets, self.bias), self.start))

    def write_back(self) -> None:
        with torch.no_grad():
            self.net.model_embedding.weight[self.model_rows] = self.models
            self.net.budget_embedding.weight[self.budget_rows] = self.budgets
            self.net.arm_bias[:, self.arms] = self.bias


def fit_new_arms(module: NewArms, rows: BenchArrays, token_weight: float, prior: float,
                 max_iter: int = 200) -> float:
    """Full-batch L-BFGS on the new arms' cells: masked BCE + token_weight × squared log-token
    error (the training loss) + prior ÷ queries × squared distance from the start; the final
    loss."""
    new = module.arms.numpy()
    cells = replace(rows, quality=rows.quality[:, new], output_tokens=rows.output_tokens[:, new])
    targets = Targets.from_arrays(cells, training_embedding(rows), "cpu")
    h, factors = module.query_side(targets.x)
    optimiser = torch.optim.LBFGS([module.models, module.budgets, module.bias], max_iter=max_iter,
                                  line_search_fn="strong_wolfe")
    weight = prior / max(rows.n_queries, 1)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        quality, tokens = module(h, factors)
        loss = masked_loss(quality, tokens, targets, token_weight) + weight * module.penalty()
        loss.backward()
        return loss

    loss = optimiser.step(closure)
    module.write_back()
    return float(loss.detach())


def extend_joint(predictor, extension: Extension, rows: BenchArrays, prior: float):
    grown = grow_network(predictor.network_, extension)
    fresh = _fresh(predictor, extension)
    with torch_threads(predictor.threads):  # deterministic: full batch, no dropout (eval mode)
        fit_new_arms(NewArms(grown, extension.new_arms), rows, predictor.token_weight, prior)
    fresh.network_, fresh.history_ = grown.network.eval(), None
    return fresh


# ---- per-arm models -------------------------------------------------------------------------------
def extend_ridge(predictor, extension: Extension, rows: BenchArrays, prior: float):
    """The new arms' own Ridge fits on the new rows (per-arm models cannot share)."""
    x, new = training_embedding(rows), extension.new_arms
    wq, bq = fit_ridge(x, rows.quality[:, new], predictor.alpha)
    wt, bt = fit_ridge(x, log_tokens(rows.output_tokens[:, new]), predictor.alpha)
    old, fresh = predictor.coef_, _fresh(predictor, extension)
    fresh.coef_ = {"quality_weights": extension.place(old["quality_weights"], wq, 0.0),
                   "quality_intercept": extension.place(old["quality_intercept"], bq),
                   "log_tokens_weights": extension.place(old["log_tokens_weights"], wt, 0.0),
                   "log_tokens_intercept": extension.place(old["log_tokens_intercept"], bt)}
    return fresh


def extend_carrot_linear(predictor, extension: Extension, rows: BenchArrays, prior: float):
    """The new covered arms' own logistic and Ridge fits on the new rows, on the old input
    normalisation; covered arms are listed, so old and new columns are simply concatenated."""
    from r2ray.predictor.carrot import covered_arms, fit_logistic

    old, fresh = predictor.coef_, _fresh(predictor, extension)
    new = np.intersect1d(covered_arms(extension.new, predictor.arms), extension.new_arms)
    xs = (training_embedding(rows) - old["x_mean"]) / old["x_scale"]
    wq, bq = fit_logistic(xs, rows.quality[:, new], predictor.l2, predictor.max_iter,
                          predictor.threads)
    wt, bt = fit_ridge(xs, log_tokens(rows.output_tokens[:, new]), predictor.alpha)
    join = lambda a, b: np.concatenate([a, b], axis=-1).astype(a.dtype)  # noqa: E731
    fresh.coef_ = {**old, "arms": join(extension.arm_map[old["arms"]], new),
                   "quality_weights": join(old["quality_weights"], wq),
                   "quality_intercept": join(old["quality_intercept"], bq),
                   "log_tokens_weights": join(old["log_tokens_weights"], wt),
                   "log_tokens_intercept": join(old["log_tokens_intercept"], bt)}
    return fresh


def knn_old_arms_only(predictor, extension: Extension, rows: BenchArrays, prior: float):
    """A KNN member of a stack over the new catalogue, NaN on the new arms (see module doc)."""
    fresh = _fresh(predictor, extension)
    fresh.train_ = {**predictor.train_, "arms": extension.arm_map[predictor.train_["arms"]]}
    return fresh


# ---- composites -------------------------------------------------------------------------------------
def extend_stacked(predictor, extension: Extension, rows: BenchArrays, prior: float):
    fresh = _fresh(predictor, extension)
    fresh.members_ = [_extend(m, extension, rows, prior, in_stack=True)
                      for m in predictor.members_]
    fresh.weights_ = {}
    for name, weights in predictor.weights_.items():  # [K, M]: arms along the first axis
        new = np.repeat(weights.mean(axis=0, keepdims=True), len(extension.new_arms), axis=0)
        fresh.weights_[name] = extension.place(weights.T, new.T).T.copy()
    return fresh


def extend_averaged(predictor, extension: Extension, rows: BenchArrays, prior: float):
    """Each member extended with its own calibrations (the average predicts with them); a KNN
    member keeps the old arms only and the mean is over the others on the new ones."""
    fresh = _fresh(predictor, extension)
    fresh.members_ = [_extend_calibrated(m, extension, rows, prior) for m in predictor.members_]
    return fresh


def _extend_calibrated(member: BasePredictor, extension: Extension, rows: BenchArrays,
                       prior: float) -> BasePredictor:
    if member.name not in STACK_ONLY:
        return extend_predictor(member, extension.new, rows, prior, extension.folds,
                                extension.seed)[0]
    fresh = STACK_ONLY[member.name](member, extension, rows, prior)
    fresh.token_calibration_ = extend_token_calibration(
        member.token_calibration_, None, extension.arm_map, extension.new)
    fresh.quality_calibration_ = extend_quality_calibration(
        member.quality_calibration_, None, extension.arm_map, extension.new.n_arms)
    fresh.spend_simulation_ = member.spend_simulation_
    return fresh


def extend_selected(predictor, extension: Extension, rows: BenchArrays, prior: float):
    fresh = _fresh(predictor, extension)
    fresh.winner_ = _extend(predictor.winner_, extension, rows, prior)
    fresh.winner_name_, fresh.selection_ = predictor.winner_name_, predictor.selection_
    return fresh


EXTENDERS = {"r2ray": extend_joint, "per_arm_ridge": extend_ridge,
             "carrot_linear_all": extend_carrot_linear,
             "carrot_linear_default": extend_carrot_linear,
             "stacked": extend_stacked, "averaged": extend_averaged,
             "selected": extend_selected}
STACK_ONLY = {"carrot_knn_all": knn_old_arms_only, "carrot_knn_default": knn_old_arms_only}
WHY_NOT = {
    "carrot_knn_all": "its q̂ is the mean over the nearest old training queries, which have no "
                      "outcome of the new model",
    "per_arm_mlp": "its per-arm networks need far more rows than a cold start has",
}
WHY_NOT["carrot_knn_default"] = WHY_NOT["carrot_knn_all"]


def _fresh(predictor: BasePredictor, extension: Extension) -> BasePredictor:
    """An unfitted copy with the same settings, over the new catalogue."""
    from r2ray.predictor import make_predictor

    fresh = make_predictor(predictor.name, **predictor.settings())
    fresh.catalog_, fresh.embedding_dim_ = extension.new, predictor.embedding_dim_
    fresh.encoder_spec, fresh.encoder_fingerprint = predictor.encoder_spec, \
        predictor.encoder_fingerprint
    return fresh


def _extend(predictor: BasePredictor, extension: Extension, rows: BenchArrays, prior: float,
            in_stack: bool = False) -> BasePredictor:
    """The kind's extension, uncalibrated (module doc)."""
    extender = EXTENDERS.get(predictor.name) or (STACK_ONLY.get(predictor.name) if in_stack
                                                 else None)
    if extender is None:
        why = WHY_NOT.get(predictor.name, "no warm start is defined for it")
        raise ExtensionError(f"a {predictor.name!r} predictor cannot be extended to new models: "
                             f"{why}; retrain on the new catalogue with `r2ray train`")
    return extender(predictor, extension, rows, prior)


# ---- the whole extension ------------------------------------------------------------------------
@dataclass
class ExtensionReport:
    new_models: list[str]
    n_queries: int            # new rows' queries with a cell of a new model
    n_cells: int              # new-model cells fitted on
    ignored_cells: int        # old-model cells in the rows (their arms are frozen)
    folds: int                # cross-fitting folds of the calibrations (0: too few queries)
    out_of_fold: dict[str, float]  # new arms: Brier, log-token MAE, ECE out of fold
    seconds: float


def cross_fitted_new_arms(predictor: BasePredictor, extension: Extension, rows: BenchArrays,
                          prior: float, folds: int, seed: int) -> ArmPredictions:
    """Uncorrected predictions [M, K_new] of every new row by extensions fitted on the other
    folds' rows (NaN on old arms). A new model on a few rows is spread over two folds
    (:func:`~r2ray.predictor.base.model_fold_ids`): all in one, its held-out predictions were
    NaN and its calibrations fitted on none of its rows."""
    fold = model_fold_ids(rows, extension.new, folds, seed)
    if calibrates_members(predictor):
        check_folds_calibrate_members(rows, extension, fold, predictor.name)
    quality = np.full(rows.quality.shape, np.nan, dtype=np.float32)
    tokens = np.full(rows.quality.shape, np.nan, dtype=np.float32)
    new = extension.new_arms
    for f in range(folds):
        held = np.flatnonzero(fold == f)
        part = _extend(predictor, extension, rows.subset(np.flatnonzero(fold != f)), prior)
        predicted = part._predict(rows.embedding[held])
        quality[np.ix_(held, new)] = predicted.quality[:, new]
        tokens[np.ix_(held, new)] = predicted.output_tokens[:, new]
    return ArmPredictions(quality, tokens)


def calibrates_members(predictor: BasePredictor) -> bool:
    """Whether extending ``predictor`` extends and calibrates members by :func:`extend_predictor`
    (``averaged``, or a ``selected`` whose winner is one)."""
    winner = getattr(predictor, "winner_", None)
    return predictor.name == "averaged" or (winner is not None and calibrates_members(winner))


def check_folds_calibrate_members(rows: BenchArrays, extension: Extension, fold: np.ndarray,
                                  kind: str) -> None:
    """Each cross-fitting fold extends an ``averaged``'s members on the other folds' rows, each
    with its own calibrations, so a new model needs :data:`MIN_NEW_MODEL_QUERIES` queries in every
    fold's fitting part, not only in the rows: a model on 2 queries in 2 folds has 1 there, and
    the members' extension failed saying the model had 1 query."""
    presence = model_presence(rows, extension.new)
    for f in np.unique(fold):
        queries = presence[fold != f].sum(axis=0)
        few = [f"{name!r} ({int(presence[:, m].sum())} queries, {int(queries[m])} outside "
               f"fold {f})" for m, name in enumerate(extension.new.model_names)
               if name in extension.new_models and queries[m] < MIN_NEW_MODEL_QUERIES]
        if few:
            raise ExtensionError(
                f"extending {kind!r} calibrates an averaged predictor's members on the rows "
                f"outside each of the {len(np.unique(fold))} cross-fitting folds, which need "
                f"outcomes of every new model on {MIN_NEW_MODEL_QUERIES} queries: the new "
                f"model(s) {', '.join(few)} have fewer; add rows of them")


def check_new_arms_predicted(predictor: BasePredictor, extended: BasePredictor,
                             extension: Extension, probe: np.ndarray) -> None:
    """A new arm that no member of a composite covers (a KNN covers old arms only, a
    ``carrot_linear_default`` default arms only) is NaN: refused where the old predictor covers
    arms of its budget, else the new model is registered but never routed there. ``probe``: one
    embedding [1, D]; coverage does not depend on the query."""
    old = np.isfinite(predictor._predict(probe).quality[0])
    new = np.isfinite(extended._predict(probe).quality[0])
    budgets = {arm.budget_tokens for arm, covered in zip(extension.old.arms, old) if covered}
    missing = [f"{arm.model}|{budget_label(arm.budget_tokens)}"
               for arm in (extension.new.arms[j] for j in extension.new_arms if not new[j])
               if arm.budget_tokens in budgets]
    if missing:
        raise ExtensionError(
            f"the extended {predictor.name!r} predictor predicts no q̂ for the new arm(s) "
            f"{', '.join(missing)}: none of its members covers them (a KNN member covers the old "
            "arms only, a carrot_linear_default one the default arms only), though it covers the "
            "old arms of those budgets; retrain on the new catalogue with `r2ray train`")


def extend_predictor(predictor: BasePredictor, catalog: Catalog, rows: BenchArrays,
                     prior: float = DEFAULT_PRIOR, folds: int = DEFAULT_FOLDS, seed: int = 0
                     ) -> tuple[BasePredictor, ExtensionReport]:
    """``predictor`` extended to ``catalog`` from ``rows`` (BenchArrays over ``catalog`` with
    embeddings); see the module doc. Old arms predict exactly as before."""
    started = time.perf_counter()
    extension = replace(plan_extension(predictor.catalog_, catalog), folds=folds, seed=seed)
    rows, ignored = extension_rows(rows, extension)
    check_embedding_dimension(training_embedding(rows, "new rows"), predictor.embedding_dim_,
                              "the new rows' embeddings")
    extended = _extend(predictor, extension, rows, prior)
    check_new_arms_predicted(predictor, extended, extension, training_embedding(rows)[:1])
    folds = min(folds, rows.n_queries) if rows.n_queries >= 2 else 0
    metrics = {}
    if folds >= 2:
        held_out = cross_fitted_new_arms(predictor, extension, rows, prior, folds, seed)
        new_token = fit_token_calibration(held_out.output_tokens, rows.output_tokens, catalog)
        new_quality = (fit_quality_calibration(held_out.quality, rows.quality, catalog,
                                               chains=extended.quality_chains(catalog))
                       if predictor.calibrates_quality else None)   # averaged: members' maps
        metrics = {k.replace("test_", "new_arms_oof_"): v
                   for k, v in summary_metrics(held_out, rows).items()}
    else:  # one query: no held-out rows; the new arms stay uncorrected
        new_token = new_quality = None
    extended.token_calibration_ = extend_token_calibration(
        predictor.token_calibration_, new_token, extension.arm_map, catalog)
    extended.quality_calibration_ = extend_quality_calibration(
        predictor.quality_calibration_, new_quality, extension.arm_map, catalog.n_arms)
    extended.spend_simulation_ = predictor.spend_simulation_
    extended.data_fingerprint_ = hashlib.sha256(
        f"{predictor.data_fingerprint_}+{data_fingerprint(rows)}".encode()).hexdigest()
    report = ExtensionReport(extension.new_models, rows.n_queries, int(rows.mask.sum()), ignored,
                             folds, metrics, time.perf_counter() - started)
    return extended, report


# ---- held-out-model experiments (tests, benchmarks/cold_start.py) -----------------------------------
def without_models(catalog: Catalog, names: list[str]) -> Catalog:
    """``catalog`` less the models ``names``: the pool before they were added."""
    from r2ray.catalog import catalog_from_dict

    document = catalog.to_dict()
    document["models"] = [m for m in document["models"] if m["name"] not in names]
    return catalog_from_dict(document, "catalogue without " + ", ".join(names))


def arrays_over(arrays: BenchArrays, catalog: Catalog, sub: Catalog) -> BenchArrays:
    """``arrays`` (over ``catalog``) restricted to the arms of ``sub``, a catalogue whose arms
    are all in ``catalog``."""
    columns = np.array([catalog.arm_of(arm.model, arm.budget_tokens) for arm in sub.arms])
    return replace(arrays, quality=arrays.quality[:, columns],
                   output_tokens=arrays.output_tokens[:, columns],
                   cost_usd=arrays.cost_usd[:, columns])
