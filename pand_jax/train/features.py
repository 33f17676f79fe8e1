"""Running a frozen function over a whole split, sharded over every device and process, and
caching the result on disk keyed by everything it depends on."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from pand_jax.devices import to_global
from pand_jax.progress import progress_bar


def run_over_split(fn: Callable[[dict], Any], loader, mesh, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Applies jitted `fn(global_batch) -> [B, ...]` to every example of an eval `loader`
    (in order, last batch padded) and returns (outputs [N, ...], labels [N]) on every process."""
    outs, labels = [], []
    for batch in progress_bar(iterable=loader.epoch(0), total=loader.steps_per_epoch, desc=desc,
                              unit="batch"):
        gbatch = to_global(mesh, batch)
        out = fn(gbatch)
        # Gathering a global batch onto every host keeps the order of the split.
        out, label, mask = multihost_utils.process_allgather(
            (out, gbatch["label"], gbatch["mask"]), tiled=True)
        outs.append(np.asarray(out)[mask])
        labels.append(np.asarray(label)[mask])
    return np.concatenate(outs), np.concatenate(labels)


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
            print(f"recomputing {path.name}: {reason}", flush=True)
    arrays = compute()
    tmp = path.with_name(f".{path.name}.{jax.process_index()}.tmp.npz")
    np.savez(tmp, __key__=np.asarray(digest), **arrays)
    os.replace(tmp, path)
    return arrays
