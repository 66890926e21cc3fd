"""Prefect tasks: thin wrappers that run the stages of `fusellm.stages` as task runs."""
