"""fusellm: fuse LLMs with different architectures and tokenizers into one (FuseLLM)."""

__version__ = "0.1.0"
