"""Optional extras (`bge-index[ray]`, `bge-index[milvus]`): importing them, and what fails when they are missing.

The core install needs neither Ray nor pymilvus; the modules that use them
(ray_engine.py, milvus.py) import them through `require`, at the moment they
are needed, so a missing extra is one clear error, not an ImportError trace.
"""

from __future__ import annotations

import importlib
from bge_index.errors import ExtraUnavailableError


def require(module: str, extra: str, purpose: str):
    """Import `module` or fail with the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ExtraUnavailableError(f"{purpose} needs the {extra!r} extra: pip install 'bge-index[{extra}]' "
                                    f"({error})") from error
