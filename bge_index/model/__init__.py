"""Model: the only code that loads or runs BGE-M3.

Owns: what a model folder is and its identity without loading it
(`identity`), the tokenizer (`tokenizer`), loading the weights and heads and
turning texts into dense, sparse and ColBERT vectors (`encoder`), token
batches cut by length (`batching`) and encoding on several devices
(`workers`).

Must never import: the search, run, serve or cli packages. `identity` and
`batching` import no torch; only `encoder` and `workers` do.
"""
