"""Input: paths, folders, globs, stdin and every input format -> `Document`s and `Skipped` records.

Owns: resolving inputs (`documents`), reading each format (`formats`; a
Parquet row group's page headers are read first, `parquet_pages`, so that
nothing over the memory bound is unpacked), and the items of the documents
stage with their stable skip reason codes (`types`).
Bad input is reported as a `Skipped` naming `file:line` and a reason code;
it never raises for one bad record.

Must never import: the model, search, run, serve or cli packages, torch or
transformers. It may import `bge_index.store.names` (what an index folder is
called, so that no index file is read as input), nothing else of `store`.
"""
