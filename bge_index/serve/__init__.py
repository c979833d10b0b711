"""Serve: `bge-index serve`, the only part besides the CLI that speaks to the outside.

Owns: the long-lived searcher that answers queued searches in batches
(`search_service`) and the HTTP routes, parsing and server (`http_api`).

Must never import: the cli package.
"""
