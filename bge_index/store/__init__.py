"""Store: the on-disk format of an index, and nothing else.

Owns: file names (`names`), the versioned manifest and shard schema
(`manifest`), atomic writes and fsync (`files`), writing shards, deletion
sets and the manifest switch (`shard_writer`), reading and verifying them
(`shard_reader`), the derived search files (`vector_store`), checksums
already checked (`checked_files`) and the writer's lock (`lock`).

Must never import: input, model, search, run, serve or cli. The store knows
no model and no run: it writes and reads the vectors it is given.
"""
