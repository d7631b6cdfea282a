"""Online routing on Ray Serve: the same predictor and decision rule as the batch job, priced
with its λ*, kept on a spend rate by pacing. Serve-free parts (schema, router, pacer, auth,
upstream, service, api) import without Ray; :mod:`r2ray.serving.deployments` holds the Serve side.
"""
