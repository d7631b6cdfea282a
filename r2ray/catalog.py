"""The model catalogue: which LLMs may answer, what they cost, which length budgets they offer.

The YAML shape is a public interface::

    budgets: [10, 20, ..., 4000, default]      # the default grid (output tokens)
    models:
      - {name, input_per_m, output_per_m, context, budgets (optional), endpoint (optional),
         max_output_tokens (optional), api_key_env, max_concurrency, requests_per_minute,
         tokens_per_minute (optional: the execution engine's key variable and limits)}

Prices are USD per million tokens. An *arm* is a (model, budget) pair; budget 0 stands for
``default`` (no length instruction, the model's own length, capped at the model's
``max_output_tokens``, else :data:`DEFAULT_MAX_OUTPUT_TOKENS`). Arms are enumerated model-major in
catalogue order, so arm ``j`` is stable for a given catalogue and the catalogue hash pins it.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from functools import cached_property, lru_cache
from importlib import resources
from typing import Annotated, NamedTuple

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from r2ray.errors import R2RayError

DEFAULT_BUDGET = 0
"""Arm budget value meaning 'default': no length instruction; capped at the model's output cap."""

DEFAULT_MAX_OUTPUT_TOKENS = 4000
"""Output cap (tokens) of a default arm when the catalogue gives no ``max_output_tokens``: the
paper's largest budget level, so no arm is sent uncapped (an uncapped default arm could spend the
whole context window). Never more than the context leaves: see ``prompting.max_tokens_array``."""

DEFAULT_CATALOG = "default_catalog.yaml"

MAX_CATALOG_TOKENS = 2**31 - 1
"""Largest budget, context or output cap (tokens) a catalogue may give: budgets are int32 in the
arm arrays and the routed rows (10,000× any model's window, so only a typo reaches it)."""

MAX_PRICE_PER_M = 1e6
"""Largest price (USD per million tokens, in or out) a catalogue may give: USD 1 a token, over
1,000× the dearest model offered, so only a typo reaches it; a bill at it stays finite
(a price near float64's top made a 2,000-token bill ``inf`` USD)."""


EXECUTION_FIELDS = ("api_key_env", "max_concurrency", "requests_per_minute", "tokens_per_minute")
"""Optional per-model settings of the execution engine (``r2ray bench collect``, ``r2ray execute``)."""

FILE_NAME_BYTES = 255
"""The longest file name (bytes) ext4, xfs, btrfs and most file systems take: a model's routed
folder is one, and a longer name failed the batch job's assign stage (``File name too long``, after
every query was scored) where a name of 28 CJK characters escaped to 258 bytes."""

NUMERIC_FIELDS = ("input_per_m", "output_per_m", "context", "max_output_tokens", "max_concurrency",
                  "requests_per_minute", "tokens_per_minute")
"""A model's fields that hold a number (USD per million tokens, tokens, requests): never a bool."""


class CatalogError(R2RayError, ValueError):
    """A catalogue that cannot be used; the message says where and how to fix it."""


class UnknownModel(CatalogError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


def parse_budget(value: int | str) -> int:
    """`'default'` -> 0; positive integers pass; anything else is an error."""
    if isinstance(value, str):
        if value.strip().lower() in ("default", "unlimited"):
            return DEFAULT_BUDGET
        if value.strip().isdigit():
            value = int(value)
        else:
            raise ValueError(f"budget {value!r} is neither a positive integer nor 'default'")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"budget {value!r} is neither a positive integer nor 'default'")
    if value > MAX_CATALOG_TOKENS:
        raise ValueError(f"budget {value} is above {MAX_CATALOG_TOKENS} tokens")
    return int(value)


def budget_label(budget_tokens: int) -> str:
    return "default" if budget_tokens == DEFAULT_BUDGET else str(budget_tokens)


Budgets = list[int | str]


def _normalise_budgets(values: Budgets) -> list[int]:
    if not isinstance(values, (list, tuple)):   # a str was read character by character ('d')
        raise ValueError(f"budgets must be a list, e.g. [100, 1000, default]; got the "
                         f"{type(values).__name__} {values!r}")
    budgets = [parse_budget(v) for v in values]
    if not budgets:
        raise ValueError("the budget list is empty")
    if len(set(budgets)) != len(budgets):
        raise ValueError(f"duplicate budgets in {values}")
    return sorted(budgets, key=lambda b: (b == DEFAULT_BUDGET, b))  # numeric ascending, default last


class ModelSpec(BaseModel):
    """One LLM: prices in USD per million tokens, context window and output cap in tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(min_length=1)]
    input_per_m: Annotated[float, Field(ge=0, le=MAX_PRICE_PER_M, allow_inf_nan=False)]
    output_per_m: Annotated[float, Field(ge=0, le=MAX_PRICE_PER_M, allow_inf_nan=False)]
    context: Annotated[int, Field(gt=0, le=MAX_CATALOG_TOKENS)]
    budgets: list[int] | None = None
    endpoint: str | None = None
    max_output_tokens: Annotated[int, Field(gt=0)] | None = None  # default arm's cap; None: default
    # executing against ``endpoint`` (r2ray.execution): the key is named, never given
    api_key_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    max_concurrency: Annotated[int, Field(gt=0)] | None = None      # requests in flight
    requests_per_minute: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    tokens_per_minute: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None

    @field_validator("budgets", mode="before")
    @classmethod
    def _budgets(cls, value: Budgets | None) -> list[int] | None:
        return None if value is None else _normalise_budgets(value)

    @field_validator(*NUMERIC_FIELDS, mode="before")
    @classmethod
    def _not_a_bool(cls, value: object) -> object:
        """YAML reads ``yes``/``true`` as a bool, which pydantic would take as 1 (USD 1 per
        million tokens, a 1-token context): a price or a size is a number, never a yes/no."""
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is a yes/no value, not a number")
        return value

    @field_validator("input_per_m", "output_per_m")
    @classmethod
    def _unsigned_zero(cls, value: float) -> float:
        """-0.0 is 0.0: the same price must give the same fingerprint (JSON writes ``-0.0``)."""
        return value + 0.0

    @model_validator(mode="after")
    def _cap_within_context(self) -> ModelSpec:
        if self.max_output_tokens is not None and self.max_output_tokens > self.context:
            raise ValueError(f"max_output_tokens {self.max_output_tokens} of {self.name!r} exceeds "
                             f"its context window ({self.context} tokens): give at most that")
        self.check_budgets_fit(self.budgets or [], "budgets")
        return self

    def check_budgets_fit(self, budgets: list[int], which: str) -> None:
        """Every budget leaves room for a prompt in the context window beside its length
        instruction: :func:`r2ray.routing.context_fits` never lets a prompt beside a budget
        that does not, so its arm would be one that is never used. ``which`` names the list
        in the error: the model's own ``budgets``, or the catalogue's that it inherits."""
        from r2ray.prompting import instruction_bytes   # prompting imports this module
        too_long = [b for b in budgets if b + instruction_bytes(b) >= self.context]
        if too_long:
            raise ValueError(f"{which} of {self.name!r}: budget {too_long[0]} leaves no room for a "
                             f"prompt in its context window ({self.context} tokens) beside its "
                             f"length instruction ({instruction_bytes(too_long[0])} UTF-8 bytes)")

    @property
    def output_cap_tokens(self) -> int:
        """The default arm's cap before the context check: ``max_output_tokens`` or the default."""
        cap = self.max_output_tokens
        return DEFAULT_MAX_OUTPUT_TOKENS if cap is None else cap

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        """Names are data (``meta-llama/Llama-3.1-8B-Instruct`` is fine), but never a path escape
        or an invisible character in a file name or a log line."""
        if value != value.strip():
            raise ValueError(f"model name {value!r} has leading or trailing white space")
        if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in value):
            raise ValueError(f"model name {value!r} holds a control character")
        if any(part in (".", "..") for part in value.replace("\\", "/").split("/")):
            raise ValueError(f"model name {value!r} holds a '.' or '..' path segment")
        from r2ray.manifest import routed_partition   # manifest's storage imports are heavy
        folder = len(routed_partition(value).encode())
        if folder > FILE_NAME_BYTES:
            raise ValueError(f"model name {value!r} is {folder} bytes as the batch job's folder of "
                             f"its routed prompts (model=<name percent-escaped>); a file name "
                             f"holds at most {FILE_NAME_BYTES}: shorten it")
        return value


class Arm(NamedTuple):
    model: str
    budget_tokens: int  # 0 = default


class Catalog(BaseModel):
    """A validated catalogue. Build with :func:`load_catalog` or ``Catalog.model_validate``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    budgets: list[int]
    models: Annotated[list[ModelSpec], Field(min_length=1)]

    @field_validator("budgets", mode="before")
    @classmethod
    def _budgets(cls, value: Budgets) -> list[int]:
        return _normalise_budgets(value)

    @model_validator(mode="after")
    def _unique_names(self) -> Catalog:
        """Names must differ in more than letter case or Unicode form: each model's routed rows
        go to a ``routed/model=<name>/`` folder, one folder for both on a case-insensitive or
        normalising file system (macOS, Windows), and the two read the same in a report."""
        seen: dict[str, str] = {}
        for spec in self.models:
            key = unicodedata.normalize("NFC", spec.name).casefold()
            if key in seen:
                same = "" if seen[key] == spec.name else f" (the same as {seen[key]!r} but for " \
                    "letter case or Unicode form)"
                raise ValueError(f"duplicate model name {spec.name!r}{same}")
            seen[key] = spec.name
        return self

    @model_validator(mode="after")
    def _inherited_budgets_fit(self) -> Catalog:
        """A model without budgets of its own takes the catalogue's: they must fit its context
        as its own would (:meth:`ModelSpec.check_budgets_fit`)."""
        for spec in self.models:
            if spec.budgets is None:
                spec.check_budgets_fit(self.budgets,
                                       "the catalogue's budgets, inherited by the model")
        return self

    # ---- lookups -------------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]

    def model(self, name: str) -> ModelSpec:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownModel(
                f"unknown model {name!r}; the catalogue has: {', '.join(self.model_names)}"
            ) from None

    def budgets_of(self, name: str) -> list[int]:
        spec = self.model(name)
        return spec.budgets if spec.budgets is not None else self.budgets

    @cached_property
    def _by_name(self) -> dict[str, ModelSpec]:
        return {m.name: m for m in self.models}

    # ---- arms ----------------------------------------------------------------------------
    @cached_property
    def arms(self) -> list[Arm]:
        """All (model, budget) arms, model-major in catalogue order, budgets ascending, default last."""
        return [Arm(m.name, b) for m in self.models for b in self.budgets_of(m.name)]

    @property
    def n_arms(self) -> int:
        return len(self.arms)

    @cached_property
    def arm_index(self) -> dict[Arm, int]:
        return {arm: j for j, arm in enumerate(self.arms)}

    def arm_of(self, model: str, budget_tokens: int) -> int:
        try:
            return self.arm_index[Arm(model, int(budget_tokens))]
        except KeyError:
            self.model(model)  # raises UnknownModel with the list of known models
            raise CatalogError(
                f"model {model!r} offers no budget {budget_label(budget_tokens)}; "
                f"it offers {[budget_label(b) for b in self.budgets_of(model)]}"
            ) from None

    @cached_property
    def arm_arrays(self) -> dict[str, np.ndarray]:
        """Per-arm columns [K]: model index, budget tokens, the model's context and output cap
        (tokens), USD per token in and out."""
        model_pos = {name: i for i, name in enumerate(self.model_names)}
        return {
            "model_index": np.array([model_pos[a.model] for a in self.arms], dtype=np.int32),
            "budget_tokens": np.array([a.budget_tokens for a in self.arms], dtype=np.int32),
            "context_tokens": np.array([self.model(a.model).context for a in self.arms], np.int64),
            "output_cap_tokens": np.array([self.model(a.model).output_cap_tokens
                                           for a in self.arms], np.int64),
            "price_in_usd": np.array([self.model(a.model).input_per_m * 1e-6 for a in self.arms]),
            "price_out_usd": np.array([self.model(a.model).output_per_m * 1e-6 for a in self.arms]),
        }

    def arm_cost_usd(self, input_tokens: np.ndarray, output_tokens: np.ndarray) -> np.ndarray:
        """Cost [N, K] in USD: input tokens [N] × input price + output tokens [N, K] × output price."""
        arrays = self.arm_arrays
        input_tokens = np.asarray(input_tokens, dtype=np.float64)
        return (input_tokens[:, None] * arrays["price_in_usd"][None, :]
                + np.asarray(output_tokens, dtype=np.float64) * arrays["price_out_usd"][None, :])

    def cost_usd(self, model: str, input_tokens: float, output_tokens: float) -> float:
        spec = self.model(model)
        return (input_tokens * spec.input_per_m + output_tokens * spec.output_per_m) * 1e-6

    # ---- identity and persistence --------------------------------------------------------
    def to_dict(self) -> dict:
        """The YAML shape, with budget 0 written back as ``default``."""

        def budgets(values: list[int]) -> list[int | str]:
            return [budget_label(b) if b == DEFAULT_BUDGET else b for b in values]

        models = []
        for m in self.models:
            row = {"name": m.name, "input_per_m": m.input_per_m, "output_per_m": m.output_per_m,
                   "context": m.context}
            if m.budgets is not None:
                row["budgets"] = budgets(m.budgets)
            if m.endpoint is not None:
                row["endpoint"] = m.endpoint
            if m.max_output_tokens is not None:
                row["max_output_tokens"] = m.max_output_tokens
            for name in EXECUTION_FIELDS:   # only when set: older catalogues keep their fingerprint
                if getattr(m, name) is not None:
                    row[name] = getattr(m, name)
            models.append(row)
        return {"budgets": budgets(self.budgets), "models": models}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=120)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the canonical JSON form; pins arm order, prices and caps in manifests and models."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _format_validation(source: str, error: ValidationError, data: dict) -> str:
    lines = []
    for item in error.errors():
        where = _where(item["loc"], data)
        msg = item["msg"].removeprefix("Value error, ")
        got = "" if item.get("input") is data else f" (got {item.get('input')!r})"
        lines.append(f"  {where}: {msg}{got}")
    return f"catalogue {source} is invalid:\n" + "\n".join(lines)


def _where(loc: tuple, data: dict) -> str:
    """An error's place, a model named as well as numbered (``models.7 (GLM-4.5-Air).context``):
    nobody should have to count entries to find the one at fault."""
    parts = [str(p) for p in loc]
    models = data.get("models")
    if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int) \
            and isinstance(models, list) and isinstance(models[loc[1]], dict) \
            and isinstance(models[loc[1]].get("name"), str):
        parts[1] = f"{loc[1]} ({models[loc[1]]['name']})"
    return ".".join(parts) or "(top level)"


def catalog_from_dict(data: object, source: str = "<dict>") -> Catalog:
    if not isinstance(data, dict):
        raise CatalogError(f"catalogue {source}: expected a mapping with 'budgets' and 'models'")
    try:
        return Catalog.model_validate(data)
    except ValidationError as err:
        raise CatalogError(_format_validation(source, err, data)) from None


@lru_cache(maxsize=8)
def catalog_from_yaml(text: str, source: str = "<yaml>") -> Catalog:
    """A catalogue from its YAML text, parsed once per text and process (a Catalog is frozen):
    the batch job hands the catalogue as text to every assign of a block, where a parse took
    ~70 ms on a busy 2-core host, a third of the assign of 8,192 rows."""
    return catalog_from_dict(_parse_yaml(text, source), source)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``, refusing a key given twice in one mapping: PyYAML keeps the last, so a
    second ``models:`` list silently dropped every model of the first, and a price written twice
    in one model silently took the second."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":   # ``<<: *base``: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float)):   # unhashable: pydantic names it
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"the key {key!r} is given twice; give it once", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, source: str) -> object:
    """The catalogue's YAML (keys unique in every mapping), or a :class:`CatalogError` naming
    ``source`` and where the YAML goes wrong."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise CatalogError(f"catalogue {source} is not valid YAML: {err}") from None


def load_catalog(path: str | None = None) -> Catalog:
    """Load and validate a catalogue from a path or fsspec URI; ``None`` gives the default pool."""
    if path is None:
        text = resources.files("r2ray").joinpath(DEFAULT_CATALOG).read_text()
        source = f"r2ray/{DEFAULT_CATALOG}"
    else:
        text, source = _read_catalog_text(path), str(path)
    return catalog_from_dict(_parse_yaml(text, source), source)


def _read_catalog_text(path: str) -> str:
    """The catalogue file's text; a path that is missing, a folder, unreadable or not UTF-8 text
    is a :class:`CatalogError` naming it (the CLI prints one line), not an OS traceback."""
    from r2ray.redaction import redact_uri
    from r2ray.storage import read_text, reporting

    action = f"cannot read the catalogue {redact_uri(path)}"
    try:
        with reporting(action):   # a folder, no permission, storage down: one line
            return read_text(path)
    except FileNotFoundError:
        raise CatalogError(f"{action}: no such file") from None
    except UnicodeDecodeError as err:
        raise CatalogError(f"{action}: not UTF-8 text ({err.reason} at byte {err.start})"
                           ) from None


def repriced_catalog(path: str, trained: Catalog, model_label: str) -> Catalog:
    """The catalogue at ``path`` in place of the one ``model_label`` was trained on (``trained``):
    prices and endpoints may change, the arms (models × budgets, in order) may not."""
    from r2ray.redaction import redact_uri

    catalog = load_catalog(path)
    if catalog.arms != trained.arms:
        raise R2RayError(f"catalog {redact_uri(path)} offers other arms than {model_label} was "
                         f"trained on ({catalog.n_arms} vs {trained.n_arms}); prices and "
                         "endpoints may change, arms may not: retrain for a new arm set")
    return catalog


def save_catalog(catalog: Catalog, path: str) -> None:
    from r2ray.storage import write_text

    write_text(path, catalog.to_yaml())
