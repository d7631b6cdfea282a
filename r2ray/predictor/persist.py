"""Save and load any fitted predictor as tensors + JSON (never pickles).

A saved predictor is a folder (local path or any fsspec URI) with two files:

* ``tensors.safetensors`` — every learned array by name (network weights and buffers, Ridge
  coefficients, KNN reference embeddings);
* ``predictor.json`` — ``kind`` (the registry key), constructor settings, fitted config, the
  catalogue YAML it was trained with (arm order!), the encoder spec and the fingerprint of its
  files (:func:`r2ray.encoders.encoder_fingerprint`; checked wherever text is embedded for the
  predictor), the embedding dimension, the r2ray version, a fingerprint of the training data,
  the sha256 of ``tensors.safetensors`` and ``document_sha256`` (:func:`document_digest`), the
  sha256 of every field that changes predictions: the predictor's fingerprint.

Loading refuses, naming the file, a document that does not parse or lacks a field a save writes,
a ``catalog_yaml`` that is not the catalogue of ``catalog_fingerprint`` (an edited copy would
label each arm's predictions with another arm), fields that are not the ones of its
``document_sha256`` (an edited calibration or setting would load and predict other numbers), and
tensors that are missing, unreadable or not the ones the document was saved with (a truncated
copy, a flipped bit, another predictor's weights: each would otherwise load and predict wrongly).
It warns (:class:`PredictorVersionWarning`) when the r2ray version differs from this one, when
``expected_data_fingerprint`` is given and differs, and when the document records no
``document_sha256`` (saved before r2ray wrote one: its fields cannot be checked).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from datetime import datetime, timezone

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from r2ray import __version__, storage
from r2ray.catalog import Catalog, catalog_from_yaml
from r2ray.predictor.base import BasePredictor, PredictorError

FORMAT_VERSION = 1
CONFIG_FILE = "predictor.json"
TENSORS_FILE = "tensors.safetensors"
# fields every save has written since format 1 (its own and its ``state``'s)
DOCUMENT_FIELDS = ("kind", "r2ray_version", "encoder", "embedding_dim", "data_fingerprint",
                   "catalog_fingerprint", "catalog_yaml", "state")
STATE_FIELDS = ("settings", "fitted", "embedding_dim")
DIGEST_FIELD = "document_sha256"
# fields no prediction depends on, so outside the digest: when it was saved, by which r2ray (a
# warning), and the catalogue's YAML (pinned by catalog_fingerprint, which the digest covers)
UNDIGESTED_FIELDS = ("saved_at", "r2ray_version", "catalog_yaml", DIGEST_FIELD)


class PredictorVersionWarning(UserWarning):
    """A saved predictor from another r2ray version or other training data than expected."""


def save_predictor(predictor: BasePredictor, directory: str,
                   encoder_spec: str | None = None) -> str:
    """Write ``predictor`` under ``directory``; returns the directory. ``encoder_spec`` overrides
    the predictor's own record of the encoder that produced its training embeddings
    (:func:`encoder_record`)."""
    config, tensors = predictor.state()
    encoder, fingerprint = encoder_record(predictor, encoder_spec)
    arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    data = save_tensors(arrays)
    document = {
        "format": FORMAT_VERSION,
        "kind": predictor.name,
        "r2ray_version": __version__,
        "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "encoder": encoder,
        "encoder_fingerprint": fingerprint,
        "embedding_dim": predictor.embedding_dim_,
        "data_fingerprint": predictor.data_fingerprint_,
        "catalog_fingerprint": predictor.catalog_.fingerprint,
        "catalog_yaml": predictor.catalog_.to_yaml(),
        "tensors_sha256": hashlib.sha256(data).hexdigest(),
        "state": config,
    }
    document[DIGEST_FIELD] = document_digest(json.loads(json.dumps(document)))   # as read back
    # the tensors first, the document (which names their sha256) last
    storage.write_bytes(storage.join(directory, TENSORS_FILE), data)
    storage.write_text(storage.join(directory, CONFIG_FILE), document_text(document))
    return directory


def document_text(document: dict) -> str:
    """``predictor.json`` as a save writes it."""
    return json.dumps(document, indent=2) + "\n"


def document_digest(document: dict) -> str:
    """sha256 (hex) of the canonical JSON of every field of a saved predictor's document but
    ``UNDIGESTED_FIELDS``: its kind, settings, fitted state and calibrations, encoder, catalogue
    fingerprint, training data fingerprint and tensors' sha256. Two saves share it only if every
    number they predict with is the same; it is the predictor's fingerprint, which its cost
    corrections are matched by (:func:`r2ray.reconcile.latest_correction`)."""
    content = {k: v for k, v in document.items() if k not in UNDIGESTED_FIELDS}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def encoder_record(predictor: BasePredictor, encoder_spec: str | None = None
                   ) -> tuple[str | None, str | None]:
    """(encoder spec, its fingerprint) a save records: ``encoder_spec``, else the predictor's own;
    the predictor's record of the fingerprint, else (a predictor fitted here, or one saved
    before fingerprints were recorded) that of the encoder as it is here now; None for
    precomputed embeddings."""
    from r2ray.encoders import recorded_fingerprint

    spec = encoder_spec if encoder_spec is not None else predictor.encoder_spec
    known = predictor.encoder_fingerprint if spec == predictor.encoder_spec else None
    return spec, known or recorded_fingerprint(spec)


def read_predictor_config(directory: str) -> dict:
    """The JSON document of a saved predictor (no tensors loaded)."""
    uri = storage.join(directory, CONFIG_FILE)
    if not storage.exists(uri):
        raise PredictorError(f"{directory} holds no saved predictor (no {CONFIG_FILE}); save one "
                             "with save_predictor() or `r2ray train`")
    try:
        document = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as err:
        raise PredictorError(f"{uri} is not valid JSON ({err}): the saved predictor is damaged "
                             "or was cut short; save or download it again") from None
    if not isinstance(document, dict):
        raise PredictorError(f"{uri} holds a JSON {type(document).__name__}, not the saved "
                             "predictor's object: damaged; save or download it again")
    if document.get("format") != FORMAT_VERSION:
        raise PredictorError(f"{uri}: format {document.get('format')!r} is not {FORMAT_VERSION}; "
                             "retrain the predictor with this r2ray version")
    check_fields(document, uri)
    check_digest(document, uri)
    return document


def predictor_fingerprint(document: dict) -> str:
    """The predictor's fingerprint (what its cost corrections are matched by): the
    ``document_sha256`` it records, which reading checked (:func:`check_digest`), else, for a
    document saved before r2ray wrote one, its :func:`document_digest` computed now."""
    return document.get(DIGEST_FIELD) or document_digest(document)


def check_fields(document: dict, uri: str) -> None:
    """Every field a save writes is there (an edited document that lost one would otherwise
    fail deep in the load with a bare KeyError naming no file)."""
    missing = [f for f in DOCUMENT_FIELDS if f not in document]
    state = document.get("state")
    if isinstance(state, dict):
        missing += [f"state.{f}" for f in STATE_FIELDS if f not in state]
    elif state is not None:
        missing.append("an object as state")
    if missing:
        raise PredictorError(f"{uri} lacks {', '.join(missing)}: the saved predictor was edited "
                             "or damaged; save or download it again")


def check_digest(document: dict, uri: str) -> None:
    """The document's fields are the ones it was saved with (its ``document_sha256``): an edited
    calibration, setting or fitted number is refused, not loaded to predict other numbers. A
    document saved before the digest was written loads with a warning."""
    expected = document.get(DIGEST_FIELD)
    if expected is None:
        warnings.warn(f"{uri} records no {DIGEST_FIELD} (saved before r2ray wrote one): its "
                      "settings and calibrations cannot be checked for edits; save it again",
                      PredictorVersionWarning, stacklevel=3)
    elif document_digest(document) != expected:
        raise PredictorError(f"{uri}: its fields are not the ones it was saved with "
                             f"({DIGEST_FIELD} differs): a setting, calibration or fitted number "
                             "was edited; save it again, and give other prices or endpoints "
                             "with --catalog (or the serving config's catalog:) instead")


def saved_catalog(document: dict, directory: str) -> Catalog:
    """The catalogue the predictor was trained with, once it is the one its fingerprint names:
    its arm order is the order of every prediction's columns."""
    uri = storage.join(directory, CONFIG_FILE)
    catalog = catalog_from_yaml(document["catalog_yaml"], f"{uri} catalog_yaml")
    if catalog.fingerprint != document["catalog_fingerprint"]:
        raise PredictorError(f"{uri}: catalog_yaml is not the catalogue the predictor was saved "
                             f"with (fingerprint {catalog.fingerprint[:12]}…, saved "
                             f"{document['catalog_fingerprint'][:12]}…): it was edited; save it "
                             "again, and give other prices or endpoints with --catalog (or the "
                             "serving config's catalog:) instead")
    return catalog


def read_saved(directory: str, expected_data_fingerprint: str | None = None
               ) -> tuple[dict, dict[str, bytes]]:
    """A saved predictor's document and its two files as bytes, checked as
    :func:`load_predictor` checks them (format, version warnings, readable tensors) but not
    built: no torch. The batch job's driver ships the files to its workers, which build it:
    the document it checked, not a second read of the file (a save there in between would send
    the workers a predictor other than the one the driver planned with and recorded)."""
    document = _checked_document(directory, expected_data_fingerprint)
    files = {CONFIG_FILE: document_text(document).encode(),
             TENSORS_FILE: _tensor_bytes(directory, document)}
    checked_tensors(directory, document, files[TENSORS_FILE])
    return document, files


def _tensor_bytes(directory: str, document: dict) -> bytes:
    """The bytes of ``tensors.safetensors``, or an error naming the folder when it is missing."""
    try:   # one request on an object store, not an existence check and then the read
        return storage.read_bytes(storage.join(directory, TENSORS_FILE))
    except FileNotFoundError:
        raise PredictorError(f"{directory} has {CONFIG_FILE} but no {TENSORS_FILE}: the saved "
                             f"predictor ({document.get('kind')}) is incomplete; save it again"
                             ) from None


def checked_tensors(directory: str, document: dict, data: bytes) -> dict[str, np.ndarray]:
    """The arrays of ``data`` (the folder's ``tensors.safetensors``) once they are the ones the
    document was saved with (its ``tensors_sha256``; absent in predictors saved before it, which
    are only checked to parse)."""
    expected = document.get("tensors_sha256")
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise PredictorError(f"{storage.join(directory, TENSORS_FILE)} is not the file "
                             f"{CONFIG_FILE} was saved with (sha256 differs; {len(data):,} bytes): "
                             "damaged, cut short or from another predictor; save it again")
    try:
        return load_tensors(data)
    except SafetensorError as err:
        raise PredictorError(f"{storage.join(directory, TENSORS_FILE)} cannot be read ({err}): "
                             "damaged or cut short; save it again") from None


def _checked_document(directory: str, expected_data_fingerprint: str | None) -> dict:
    document = read_predictor_config(directory)
    if document["r2ray_version"] != __version__:
        warnings.warn(f"{directory}: predictor saved by r2ray {document['r2ray_version']}, "
                      f"loading with {__version__}; retrain if predictions look off",
                      PredictorVersionWarning, stacklevel=3)
    if expected_data_fingerprint and expected_data_fingerprint != document["data_fingerprint"]:
        warnings.warn(f"{directory}: predictor was trained on other data (fingerprint "
                      f"{document['data_fingerprint'][:12]}…, expected "
                      f"{expected_data_fingerprint[:12]}…)", PredictorVersionWarning, stacklevel=3)
    return document


def with_device(kind: str, state: dict, device: str) -> dict:
    """A saved ``state`` whose settings run on ``device`` wherever the predictor, a composite's
    members or a selection's winner take one (the saved document is not changed). A composite's
    ``members`` is a list of member specs; ``r2ray_residual``'s is a count of networks (an int,
    which all of them run on the residual's own device)."""
    from r2ray.predictor.kinds import make_predictor

    def settings_on(kind: str, settings: dict) -> dict:
        out = dict(settings)
        if "device" in make_predictor(kind).settings():
            out["device"] = device
        if isinstance(out.get("members"), list):
            out["members"] = [m | {"settings": settings_on(m["kind"], m.get("settings") or {})}
                              for m in out["members"]]
        return out

    out = state | {"settings": settings_on(kind, state["settings"])}
    fitted = state.get("fitted") or {}
    if "winner" in fitted:   # a selection: its winner is built from the fitted state
        out["fitted"] = fitted | {"settings": settings_on(fitted["kind"], fitted["settings"])}
    return out


def load_predictor(directory: str, expected_data_fingerprint: str | None = None,
                   device: str | None = None) -> BasePredictor:
    """Rebuild a predictor saved by :func:`save_predictor`. ``device`` overrides the saved one."""
    from r2ray.predictor.kinds import make_predictor

    document = _checked_document(directory, expected_data_fingerprint)
    state = document["state"]
    if device:
        state = with_device(document["kind"], state, device)
    tensors = checked_tensors(directory, document, _tensor_bytes(directory, document))
    predictor = make_predictor(document["kind"], **state["settings"])
    predictor.load_state(state, tensors, saved_catalog(document, directory))
    predictor.encoder_spec = document["encoder"]
    predictor.encoder_fingerprint = document.get("encoder_fingerprint")   # None: saved before it
    predictor.data_fingerprint_ = document["data_fingerprint"]
    predictor.saved_fingerprint_ = predictor_fingerprint(document)
    return predictor
