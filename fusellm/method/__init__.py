"""The method itself: canonical token strings, vocabulary maps, alignment, fusion and the loss.

Pure functions over tokenizers, arrays and tensors; no files, no orchestration.
"""
