"""Run storage: s3:// or local folders as versioned commits behind an atomic pointer."""

from fjordtune.storage.store import (
    COMMITS,
    MANIFESTS,
    MARKER,
    POINTER,
    CommitInfo,
    FileEntry,
    Location,
    Pointer,
    Store,
    cache_root,
    human_size,
)

__all__ = ["COMMITS", "MANIFESTS", "MARKER", "POINTER", "CommitInfo", "FileEntry", "Location", "Pointer", "Store",
           "cache_root", "human_size"]
