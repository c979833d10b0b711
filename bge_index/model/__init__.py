"""Model: the only code that loads or runs BGE-M3.

Owns: what a model folder is and its identity without loading it
(`identity`), the tokenizer (`tokenizer`), loading the weights and heads and
turning texts into dense, sparse and ColBERT vectors (`encoder`), token
batches cut by length (`batching`), encoding on several devices (`workers`),
and the JSON record of an embedded text with the groups and forward passes
that make it, shared by `bge-index embed` and POST /embed (`embedding`).

Must never import: the search, run, serve or cli packages. `identity`,
`batching` and `embedding` import no torch; only `encoder` and `workers` do.
"""
