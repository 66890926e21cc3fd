"""Data the method runs on: text pieces, top-k stores (extraction) and the fused training store."""
