"""Search: what a search is asked and answers, scoring, exact top-k, the backends and evaluation.

Owns: the request and result types and the backend interface (`query`),
scoring and exact top-k over an index's vectors (`scoring`, which never
loads the model), the local backend (`local_index`, which loads the model an
index records to encode queries), the Milvus backend (`milvus`), and
trec_eval-style evaluation (`evaluation`).

Must never import: the run, serve or cli packages.
"""
