"""Learning curves: AUDC against the number of training queries, for every learned method.

For each requested size and each split of the evaluation, a seeded random subset of that many
queries is drawn from the split's training part (the subsets are nested: a larger size keeps the
smaller one's queries), every learned method is fitted on it, and all methods are scored on the
split's whole test part exactly as in the main evaluation (costs normalised over the non-learned
methods; by replay when the whole bench is sampled). A size above a split's training part is
skipped, with a note. Per method and size: AUDC mean and sample std over the splits that scored
it, and their number (on a sampled bench, replay leaves out a method none of whose picks a split's
test queries were dealt; a size no split scored has AUDC None).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from r2ray.catalog import Catalog
from r2ray.errors import R2RayError
from r2ray.evaluation.harness import PredictorFactory, Split, fit_methods, log_line
from r2ray.evaluation.method_scores import (evaluable_queries, evaluate_methods, is_sampled,
                                            reference_methods, summarise)
from r2ray.predictor.data import BenchArrays

MIN_TRAIN_QUERIES = 10


def parse_sizes(text: str) -> list[int]:
    """``"250,500,1000"`` → [250, 500, 1000] (sorted, unique); a clear error otherwise."""
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise R2RayError(f"--train-sizes {text!r}: give whole numbers, comma-separated "
                         "(e.g. 250,500,1000)") from None
    if not sizes:
        raise R2RayError(f"--train-sizes {text!r} names no size; give whole numbers, "
                         "comma-separated (e.g. 250,500,1000)")
    if sizes[0] < MIN_TRAIN_QUERIES:
        raise R2RayError(f"--train-sizes {text!r}: every size must be at least "
                         f"{MIN_TRAIN_QUERIES} queries")
    return sizes


def learning_curves(arrays: BenchArrays, catalog: Catalog, splits: list[Split], sizes: list[int],
                    factories: dict[str, PredictorFactory], lambdas: np.ndarray | None = None,
                    log: Callable[[str], None] = log_line) -> dict:
    """``{"sizes", "skipped", "methods": {name: {"audc", "audc_std", "n_splits"}}}``; lists run
    over the sizes kept (those at most every split's training part); ``n_splits``: the splits
    that scored the method at each size (module doc)."""
    largest = min(len(s.train) for s in splits)
    kept = [n for n in sizes if n <= largest]
    skipped = [{"size": n, "reason": f"above the training part of the splits ({largest} queries)"}
               for n in sizes if n > largest]
    for note in skipped:
        log(f"learning curve: size {note['size']} skipped: {note['reason']}")
    per_size: dict[str, list[list[float]]] = {}
    replay = is_sampled(arrays, catalog)   # the whole bench's, as evaluate_split decides it
    for split in splits:
        test = arrays.subset(split.test)
        test = test.subset(evaluable_queries(test, catalog, replay))
        order = np.random.default_rng(split.seed).permutation(split.train)  # nested subsets
        for i, size in enumerate(kept):
            label = f"{split.label}, {size} train"
            fitted, _ = fit_methods(arrays.subset(np.sort(order[:size])), catalog, split.seed,
                                    factories, label, log)
            predictions = {name: p.predict(test.embedding) for name, p in fitted.items()}
            results = evaluate_methods(test, catalog, predictions, lambdas, replay)
            summary = summarise(results, normalise_over=reference_methods(results, predictions))
            for name in [n for n in predictions if n in summary["methods"]]:  # replay may skip
                per_size.setdefault(name, [[] for _ in kept])[i].append(
                    summary["methods"][name]["audc"])
    methods = {name: {"audc": [float(np.mean(v)) if v else None for v in values],
                      "audc_std": [float(np.std(v, ddof=1)) if len(v) > 1 else None
                                   for v in values],
                      "n_splits": [len(v) for v in values]}
               for name, values in per_size.items()}
    return {"sizes": kept, "skipped": skipped, "methods": methods}
