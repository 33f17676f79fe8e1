"""Caching what a frozen function computes over a whole split on disk, keyed by everything it
depends on."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Callable

import jax
import numpy as np


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_arrays(path: pathlib.Path, key: dict[str, Any],
                  compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Loads `path` (.npz) when it was written for the same `key`, else computes and writes it.

    The key is stored inside the file; a stale or partial file is recomputed with a message,
    never silently reused. Writes go to a per-process temporary file and are renamed into
    place, so a crash never leaves a file that looks complete.
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
    tmp = path.with_name(f".{path.name}.{jax.process_index()}.tmp.npz")
    np.savez(tmp, __key__=np.asarray(digest), **arrays)
    os.replace(tmp, path)
    return arrays
