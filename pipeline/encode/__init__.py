"""Texts to vectors: token ids, long texts cut into windows, batches with dynamic padding, the model on its device (forward, pooling, normalisation) and token-level vectors."""
