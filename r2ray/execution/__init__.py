"""Executing chat requests against the catalogue's OpenAI-compatible endpoints.

``requests`` builds them (the routing template and cap), ``policy`` decides retries, spend and
resumption (pure), ``client`` sends them (async HTTP, per-endpoint limits), ``engine`` composes
the work on Ray Data into crash-safe parts with a manifest written last. ``collect`` turns the
answers into a bench (``graders``), ``execute`` runs a committed batch run into actuals.
"""
