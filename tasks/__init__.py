"""Prefect tasks: thin wrappers over `fusellm.pipeline` stages (retries, cache keys, logging)."""
