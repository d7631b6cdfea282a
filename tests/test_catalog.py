"""The catalogue: the default pool, arms, prices and validation messages."""

import numpy as np
import pytest

from r2ray.catalog import (DEFAULT_BUDGET, DEFAULT_MAX_OUTPUT_TOKENS, Arm, CatalogError,
                           UnknownModel, catalog_from_dict, load_catalog, repriced_catalog,
                           save_catalog)
from r2ray.errors import R2RayError

GRID = [10, 20, 30, 40, 50, 80, 100, 150, 200, 300, 500, 800, 1200, 2000, 4000, DEFAULT_BUDGET]


def test_default_catalogue_is_the_papers_pool():
    catalog = load_catalog()
    assert len(catalog.models) == 11
    assert catalog.budgets == GRID
    assert catalog.n_arms == 176
    assert catalog.arms[0] == Arm("Qwen3-0.6B", 10)
    assert catalog.arms[15] == Arm("Qwen3-0.6B", DEFAULT_BUDGET)
    glm = catalog.model("GLM-4.6")
    assert (glm.input_per_m, glm.output_per_m) == (0.44, 1.76)
    out_prices = [m.output_per_m for m in catalog.models]
    assert max(out_prices) / min(out_prices) == pytest.approx(88.0)  # prices span ~100x


def test_arm_lookup_and_costs():
    catalog = load_catalog()
    j = catalog.arm_of("GLM-4.6", 200)
    assert catalog.arms[j] == Arm("GLM-4.6", 200)
    cost = catalog.arm_cost_usd(np.array([1000.0]), np.full((1, catalog.n_arms), 100.0))
    assert cost[0, j] == pytest.approx((1000 * 0.44 + 100 * 1.76) / 1e6)
    assert catalog.cost_usd("GLM-4.6", 1000, 100) == pytest.approx(cost[0, j])
    with pytest.raises(UnknownModel, match="unknown model 'gpt-9'.*GLM-4.6"):
        catalog.arm_of("gpt-9", 10)
    with pytest.raises(CatalogError, match="offers no budget 7"):
        catalog.arm_of("GLM-4.6", 7)


def test_per_model_budgets_and_round_trip(tmp_path):
    catalog = catalog_from_dict({
        "budgets": [100, "default", 10],
        "models": [{"name": "a", "input_per_m": 1, "output_per_m": 2, "context": 4096},
                   {"name": "b", "input_per_m": 0, "output_per_m": 0.5, "context": 8192,
                    "budgets": ["default"], "endpoint": "http://127.0.0.1:9/v1"}],
    })
    assert catalog.budgets == [10, 100, DEFAULT_BUDGET]
    assert catalog.arms == [Arm("a", 10), Arm("a", 100), Arm("a", 0), Arm("b", 0)]
    path = tmp_path / "cat.yaml"
    save_catalog(catalog, str(path))
    again = load_catalog(str(path))
    assert again == catalog and again.fingerprint == catalog.fingerprint


def _two(second: dict, first_name: str = "a") -> dict:
    """A catalogue of model ``first_name`` and a second one that differs by ``second``."""
    first = {"name": first_name, "input_per_m": 1, "output_per_m": 1, "context": 10}
    return {"budgets": [10], "models": [first, first | second]}


@pytest.mark.parametrize("data, message", [
    # before the fix: accepted as two models (one routed/model=<name>/ folder on macOS)
    (_two({"name": "A"}), "duplicate model name 'A' .the same as 'a' but for letter case"),
    (_two({"name": "\u00e9"}, first_name="e\u0301"),   # é composed and decomposed
     "duplicate model name '\u00e9' .the same as 'e\u0301' but for letter case or Unicode"),
    # before the fix: YAML's yes/true read as USD 1 per million tokens, a 1-token context
    (_two({"name": "b", "output_per_m": True}),
     r"models\.1 \(b\)\.output_per_m: True is a yes/no value, not a number"),
    (_two({"name": "b", "context": True}), r"models\.1 \(b\)\.context: True is a yes/no"),
    # before the fix: accepted, and a 2,000-token bill at it was inf USD
    (_two({"name": "b", "input_per_m": 1e305}),
     r"models\.1 \(b\)\.input_per_m: Input should be less than or equal to 1000000"),
    # before the fix: accepted, an arm that routing.context_fits never let a prompt beside
    # (budget 40 and its 41-byte length instruction fill an 80-token window; budget 5's 40 not)
    (_two({"name": "b", "budgets": [5, 40, "default"], "context": 80}),
     r"models\.1 \(b\): budgets of 'b': budget 40 leaves no room for a prompt in its context"),
    # before the fix: accepted when b took the catalogue's budgets rather than its own
    ({"budgets": [5, 40, "default"], "models": [
        {"name": "a", "input_per_m": 1, "output_per_m": 1, "context": 4096},
        {"name": "b", "input_per_m": 1, "output_per_m": 1, "context": 80}]},
     r"the catalogue's budgets, inherited by the model of 'b': budget 40 leaves no room"),
    # before the fix: the error said models.1.ouput_per_m, not which model that is
    (_two({"name": "b", "ouput_per_m": 3}), r"models\.1 \(b\)\.ouput_per_m: Extra inputs"),
])
def test_bad_models_are_named_in_the_error(data, message):
    with pytest.raises(CatalogError, match=message):
        catalog_from_dict(data, "cat.yaml")


@pytest.mark.parametrize("data, message", [
    ({"budgets": [10], "models": [{"name": "a", "input_per_m": -1, "output_per_m": 1,
                                   "context": 10}]}, r"models\.0 \(a\)\.input_per_m"),
    ({"budgets": [10], "models": [{"name": "a", "input_per_m": 1, "output_per_m": 1,
                                   "context": 10}] * 2}, "duplicate model name 'a'"),
    ({"budgets": [10, -5], "models": []}, "budget -5 is neither"),
    ({"budgets": [10, "lots"], "models": []}, "budget 'lots' is neither"),
    ({"budgets": [10, 10, "default"], "models": []}, "duplicate budgets"),
    ({"budgets": [10], "models": [{"name": "a", "input_per_m": 1, "output_per_m": 1,
                                   "context": 10, "colour": "red"}]}, "colour"),
    ({"budgets": [10], "models": [{"name": "a", "input_per_m": 1, "output_per_m": 1,
                                   "context": 10, "max_output_tokens": 0}]},
     r"models\.0 \(a\)\.max_output_tokens"),
    ([1, 2], "expected a mapping"),
    # before the fix: accepted, then an OverflowError traceback when the arms were first priced
    ({"budgets": [10, 3_000_000_000], "models": []}, "budget 3000000000 is above 2147483647"),
    ({"budgets": [10], "models": [{"name": "a", "input_per_m": 1, "output_per_m": 1,
                                   "context": 2**63}]}, r"models\.0 \(a\)\.context.*2147483647"),
    # a str was read character by character: "budget 'd' is neither a positive integer ..."
    ({"budgets": "default", "models": [{"name": "a", "input_per_m": 1, "output_per_m": 1,
                                        "context": 99}]}, r"budgets must be a list.*'default'"),
    ({"budgets": [10], "models": [{"name": "a", "input_per_m": 1, "output_per_m": 1,
                                   "context": 99, "budgets": "10"}]},
     r"models\.0 \(a\)\.budgets: budgets must be a list"),
])
def test_bad_catalogues_say_where(data, message):
    with pytest.raises(CatalogError, match=message):
        catalog_from_dict(data, "cat.yaml")


def test_the_fingerprint_is_the_same_for_the_same_prices_written_otherwise():
    """Key order, budget order, ``unlimited`` for ``default``, ints for floats and a price of
    -0.0 for 0 (before the fix: JSON wrote ``-0.0`` and the fingerprint differed) give one
    fingerprint; any change of a price or an arm gives another."""
    from r2ray.catalog import catalog_from_yaml
    plain = catalog_from_yaml("budgets: [10, default]\nmodels:\n"
                              "  - {name: a, input_per_m: 0, output_per_m: 2, context: 8192}\n")
    for text in ("budgets: [unlimited, 10]\nmodels:\n"
                 "  - {context: 8192, output_per_m: 2.0e0, name: a, input_per_m: -0.0}\n",
                 "models:\n  - {name: a, input_per_m: 0.0, output_per_m: 2, context: 8192.0}\n"
                 "budgets: ['10', default]\n"):
        assert catalog_from_yaml(text).fingerprint == plain.fingerprint
    model = {"name": "a", "input_per_m": 0, "output_per_m": 2, "context": 8192}
    changed = [{"budgets": [10, "default"], "models": [model | {"output_per_m": 2.0000001}]},
               {"budgets": [10, "default"], "models": [model | {"input_per_m": 1e-9}]},
               {"budgets": [10, "default"], "models": [model | {"context": 8191}]},
               {"budgets": [11, "default"], "models": [model]},
               {"budgets": [10], "models": [model]}]
    prints = {catalog_from_dict(data).fingerprint for data in changed}
    assert len(prints) == len(changed) and plain.fingerprint not in prints


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("budgets: [10\nmodels: {")
    with pytest.raises(CatalogError, match="not valid YAML"):
        load_catalog(str(path))


def test_output_cap_defaults_round_trips_and_never_exceeds_the_context(tmp_path):
    model = {"name": "a", "input_per_m": 1, "output_per_m": 2, "context": 4096}
    plain = catalog_from_dict({"budgets": ["default"], "models": [model]})
    capped = catalog_from_dict({"budgets": ["default"],
                                "models": [model | {"max_output_tokens": 1000}]})
    assert plain.model("a").max_output_tokens is None
    assert plain.model("a").output_cap_tokens == DEFAULT_MAX_OUTPUT_TOKENS == 4000
    assert capped.model("a").output_cap_tokens == 1000
    assert list(capped.arm_arrays["output_cap_tokens"]) == [1000]
    assert capped.fingerprint != plain.fingerprint  # the cap is part of what a model was made for
    path = tmp_path / "cat.yaml"
    save_catalog(capped, str(path))
    assert load_catalog(str(path)) == capped and "max_output_tokens: 1000" in path.read_text()
    with pytest.raises(CatalogError, match="max_output_tokens 5000 of 'a' exceeds its context"):
        catalog_from_dict({"budgets": ["default"],
                           "models": [model | {"max_output_tokens": 5000}]})


def test_a_model_may_be_repriced_but_not_given_other_arms(tmp_path):
    """``--catalog`` for a trained model (batch job and Serve): new prices are taken, other arms
    are an error naming the file and the model."""
    trained = catalog_from_dict({"budgets": [100, "default"], "models": [
        {"name": "a", "input_per_m": 1, "output_per_m": 2, "context": 4096}]})
    repriced = catalog_from_dict({"budgets": [100, "default"], "models": [
        {"name": "a", "input_per_m": 3, "output_per_m": 5, "context": 4096}]})
    save_catalog(repriced, str(tmp_path / "new.yaml"))
    assert repriced_catalog(str(tmp_path / "new.yaml"), trained, "m/1") == repriced
    other = catalog_from_dict({"budgets": [50, "default"], "models": [
        {"name": "a", "input_per_m": 1, "output_per_m": 2, "context": 4096}]})
    save_catalog(other, str(tmp_path / "other.yaml"))
    with pytest.raises(R2RayError, match=r"other\.yaml offers other arms than m/1 .*\(2 vs 2\)"):
        repriced_catalog(str(tmp_path / "other.yaml"), trained, "m/1")


def test_catalog_text_is_parsed_once_per_process_and_errors_still_name_the_source():
    """The batch job hands the catalogue as YAML to every block's assign: parsed once."""
    from r2ray.catalog import catalog_from_yaml, load_catalog
    text = load_catalog().to_yaml()
    first = catalog_from_yaml(text, "catalogue")
    assert catalog_from_yaml(text, "catalogue") is first and first == load_catalog()
    for _ in range(2):                                      # an error is not cached away
        with pytest.raises(CatalogError, match="catalogue x: expected a mapping"):
            catalog_from_yaml("- just a list", "x")


@pytest.mark.parametrize("text, key", [
    ("budgets: [10, default]\nmodels:\n  - {name: a, input_per_m: 1, output_per_m: 2, context: 8192}\n"
     "models:\n  - {name: b, input_per_m: 1, output_per_m: 2, context: 8192}\n", "'models'"),
    ("budgets: [10, default]\nmodels:\n"
     "  - {name: a, input_per_m: 1, output_per_m: 2, context: 8192, output_per_m: 20}\n",
     "'output_per_m'")])
def test_a_key_given_twice_is_an_error_not_the_last_one_kept(tmp_path, text, key):
    """PyYAML keeps a repeated key's last value: a second ``models:`` list silently dropped the
    first's models, and a price written twice silently took the second."""
    from r2ray.catalog import catalog_from_yaml
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(CatalogError, match=rf"twice\.yaml is not valid YAML(.|\n)*the key {key} "
                                           r"is given twice(.|\n)*line [34]"):
        load_catalog(str(path))
    with pytest.raises(CatalogError, match=rf"catalogue x is not valid YAML(.|\n)*{key}"):
        catalog_from_yaml(text, "x")


def test_a_merge_key_may_still_be_overridden():
    from r2ray.catalog import catalog_from_yaml
    catalog = catalog_from_yaml("budgets: [10, default]\nmodels:\n"
                                "  - &base {name: a, input_per_m: 1, output_per_m: 2, context: 8192}\n"
                                "  - {<<: *base, name: b, output_per_m: 4}\n")
    assert [(m.name, m.input_per_m, m.output_per_m) for m in catalog.models] == [
        ("a", 1.0, 2.0), ("b", 1.0, 4.0)]
