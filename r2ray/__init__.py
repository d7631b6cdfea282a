"""r2ray: route LLM queries to (model, length budget) arms under a global spend limit."""
__version__ = "0.1.0"
