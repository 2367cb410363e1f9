"""myllm: a local LLM daemon for GGUF models."""

__version__ = "0.1.0"
