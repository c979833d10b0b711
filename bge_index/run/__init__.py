"""Run: what an index run decides, and the engines that carry it out.

Owns: the decisions of a run, whichever engine encodes (`index_run`: what
is new, unchanged, removed, and when it commits), the local engine
(`local`) and the Ray engine (`ray`).

Must never import: the search, serve or cli packages.
"""
