"""Serve: `bge-index serve`, the only part besides the CLI that speaks to the outside.

Owns: the long-lived searcher that answers queued searches in fair, bounded
batches (`search_service`), the generations it serves, opened off the worker
and watched for files changed under them (`generations`, `file_watch`), the
request and answer bounds (`limits`, `answer_size`), the connection guard
against slow and idle clients (`connections`), Prometheus metrics
(`metrics`), POST /embed's stepwise encoding on the search worker
(`embedding`), and the HTTP routes, parsing and server (`http_api`).

Must never import: the cli package.
"""
