"""Texts to vectors: the runtime (device, dtype, kernels) resolved once, the tokenizer, batching with dynamic padding, the model forward pass and pooling."""
