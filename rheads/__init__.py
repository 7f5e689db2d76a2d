"""rheads: retrieval-head-aware KV-cache compression for long-context LLM serving."""

__version__ = "0.1.0"
