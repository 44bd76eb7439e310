"""FAISS indexes over stored vectors: which kind to build, building and loading it, its layouts, and measuring recall against exact search."""
