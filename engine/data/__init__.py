"""What the model reads: the Batch (batch.py), collate from shards to batches (collate.py, Numba;
intrinsics.py), and the loaders (loader.py).  docs/FORMATS.md §5, docs/TRAINING.md (Data loading)."""
