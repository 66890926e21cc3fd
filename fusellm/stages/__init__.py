"""The fusion stages: one module per stage (its content key and how it is built), the walk that
runs them in order (`fusellm.stages.pipeline`), and the folders that cache them (`base`)."""
