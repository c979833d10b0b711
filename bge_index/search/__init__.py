"""Search: what a search is asked and answers, scoring, exact top-k, the backends and evaluation.

Owns: the request and result types and the backend interface (`query`), the
`--where` filters (`filters`: parsed, and evaluated to the rows they match),
scoring and exact top-k over an index's vectors (`scoring`, which never
loads the model; its one exact dense kernel in `dense_kernel`, and the
rank-safe pruning that finds the same top-k scoring few rows: `rank_safe`,
with the bounds of `dense_prune` and `sparse_prune`), the local backend
(`local_index`, which loads the model an index records to encode queries,
after checking what needs only the index),
the Milvus backend (`milvus`), and trec_eval-style evaluation (`evaluation`).

Must never import: the run, serve or cli packages.
"""
