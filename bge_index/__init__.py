"""bge-index: index documents into BGE-M3 sparse + dense (+ ColBERT) vectors in Parquet shards, and search them."""

__version__ = "0.1.0"
