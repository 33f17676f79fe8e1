"""Caching what a frozen function computes over a whole split on disk, keyed by everything it
depends on."""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from pand_jax import files


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_arrays(
    path: pathlib.Path, key: dict[str, Any], compute: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Loads `path` (.npz) when it was written for the same `key`, else computes and writes it.

    The key is stored inside the file; a stale, partial or damaged file (every .npz member
    carries a CRC-32 that zipfile checks as the member is read) is recomputed with a message,
    never silently reused. Writes go through `files.atomic_path`, so a crash never leaves a
    file that looks complete and processes writing the same file never collide; a disk that
    refuses the file is one line naming it and its size.
    """
    digest = cache_key(**key)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                if str(f["__key__"]) == digest:
                    return {k: f[k] for k in f.files if k != "__key__"}
            reason = "it was made for another teacher, dataset or setting"
        except Exception as e:  # truncated or corrupt file
            reason = f"it could not be read ({type(e).__name__})"
        if jax.process_index() == 0:
            print(f"warning: recomputing {path}: {reason}", flush=True)
    arrays = compute()
    size = sum(np.asarray(a).nbytes for a in arrays.values())
    with files.disk_full_errors(path, size, "the feature cache"), files.atomic_path(path) as tmp:
        np.savez(tmp, __key__=np.asarray(digest), **arrays)
    return arrays
