"""The fusion stages, one module per concept; `fusellm.pipeline` gathers them in one namespace."""
