"""Run storage: s3:// or local folders with atomic commit markers."""

from fjordtune.storage.store import (
    MARKER,
    Location,
    Store,
    cache_root,
    pyarrow_filesystem,
)

__all__ = ["MARKER", "Location", "Store", "cache_root", "pyarrow_filesystem"]
