"""UserBERT: the input layer (embeddings.py), the encoder, the pretraining heads, the model
(userbert.py) and its exported form (export.py).  docs/FORMATS.md §6."""
