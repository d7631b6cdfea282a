"""Ray Serve entry point for the online router.

    serve run serve.app:app                                   # defaults: models:/r2ray@champion
    serve run serve.app:app model=models:/r2ray@champion manifest=runs/ api_key_envs=R2RAY_API_KEYS
    serve deploy serve/config.yaml                            # on a running cluster

``app`` is a Serve *application builder*: Serve calls it with the ``key=value`` arguments (or the
``args:`` of a config file), so nothing is built or loaded at import. Every argument is a field of
:class:`r2ray.serving.config.ServeConfig`.
"""


def build_app(args: dict):
    """Application arguments → the bound r2ray Serve application (ingress, router, pacer)."""
    from r2ray.serving.config import serve_config
    from r2ray.serving.deployments import build_application

    return build_application(serve_config(args))


app = build_app
