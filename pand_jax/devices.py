"""Devices: data parallelism over every device of every process, the compute dtype, and the
start line every command prints (`report_devices`).

A 1-D mesh with axis "data": parameters are replicated and batches are sharded along their
leading axis. Under `jax.jit` the batch mean in BatchNorm then spans the global batch, which
gives sync BN for free. Modules run under jit through `jit_apply`: a module is split once into
a static graphdef and a state pytree, and the state is an argument (so 1.2B teacher weights are
never baked into a program as constants), merged back with `copy=True`, which avoids NNX's
"mutate from a different trace level" error. `run_over_split` runs such a function over a
whole evaluation split (training's evaluation, PSC's features, evaluate.py).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pand_jax.progress import progress_bar

DATA = "data"
GPU_INSTALL = "bash scripts/setup.sh --gpu"
NVIDIA_PROC = pathlib.Path("/proc/driver/nvidia/gpus")


def maybe_initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Joins a multi-process run when asked to, or when a cluster environment says so.

    Explicit arguments serve localhost runs and tests; under SLURM, Open MPI or a multi-worker
    TPU slice (or with JAX_COORDINATOR_ADDRESS set) JAX reads the cluster from the environment.
    """
    if coordinator is not None:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif _launched_as_several_processes():
        jax.distributed.initialize()


def _launched_as_several_processes() -> bool:
    env = os.environ
    return bool(
        env.get("JAX_COORDINATOR_ADDRESS")
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    )


def device_line(dtype=None) -> str:
    """'devices: 8 x NVIDIA H100 80GB HBM3 (gpu), 1 process[, compute bfloat16]'."""
    kinds = Counter(d.device_kind for d in jax.devices())
    n = jax.process_count()
    line = (
        f"devices: {', '.join(f'{c} x {kind}' for kind, c in kinds.items())} "
        f"({jax.default_backend()}), {n} process{'es' if n > 1 else ''}"
    )
    return line if dtype is None else f"{line}, compute {np.dtype(dtype).name}"


def report_devices(dtype=None, file=None) -> None:
    """The start line of every command (after `maybe_initialize_distributed`), plus one warning
    line when an NVIDIA GPU sits idle because only the CPU jaxlib is installed. `file`: stdout
    by default; commands whose stdout is data (predict.py --json) pass stderr."""
    if jax.process_index() == 0:
        print(device_line(dtype), file=file or sys.stdout, flush=True)
    if jax.default_backend() == "cpu" and nvidia_gpu_visible():
        print(
            f"warning: an NVIDIA GPU is visible but JAX runs on the CPU; install JAX's CUDA "
            f"plugin with `{GPU_INSTALL}`",
            file=sys.stderr,
            flush=True,
        )


def nvidia_gpu_visible() -> bool:
    """Whether the NVIDIA driver sees a GPU, asked without JAX (which may lack the plugin)."""
    if NVIDIA_PROC.is_dir() and any(NVIDIA_PROC.iterdir()):
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(line.startswith("GPU ") for line in listing.splitlines())


def make_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "batch size") -> None:
    n = mesh.size
    if global_batch % n:
        raise ValueError(
            f"the global {what} {global_batch} is not divisible by the {n} devices of the mesh; "
            f"choose a multiple of {n} (for example {max(n, global_batch // n * n)})."
        )


def to_global(mesh: Mesh, local_batch: dict) -> dict:
    """This process's slice of a batch (NumPy) -> global arrays sharded on "data"."""
    sharding = batch_sharded(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


def replicate(mesh: Mesh, tree):
    """Puts a host pytree on every device (identical on every process)."""
    return jax.device_put(tree, replicated(mesh))


TEACHER_SHARDINGS = ("replicated", "fsdp")  # the values of the config key `teacher_sharding`


def fsdp_spec(shape: tuple[int, ...], n: int) -> P:
    """The leaf's largest axis that `n` devices divide carries "data"; without one (biases,
    scalars, odd sizes) the leaf is replicated."""
    axes = [i for i, d in enumerate(shape) if d % n == 0]
    if n == 1 or not axes:
        return P()
    axis = max(axes, key=lambda i: shape[i])
    return P(*[None] * axis, DATA)


def place_frozen(mesh: Mesh, tree, sharding: str):
    """A frozen model's weights on the mesh: "replicated" (every device holds all of them) or
    "fsdp" (each leaf split over "data" as `fsdp_spec` says: a device holds about 1/n of the
    weights, and XLA's partitioner gathers each one where a step uses it)."""
    if sharding == "replicated":
        return replicate(mesh, tree)
    if sharding != "fsdp":
        raise ValueError(
            f"unknown teacher_sharding {sharding!r}; expected one of {list(TEACHER_SHARDINGS)}"
        )
    return jax.tree.map(
        lambda x: jax.device_put(x, NamedSharding(mesh, fsdp_spec(np.shape(x), mesh.size))), tree
    )


_DTYPES = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
}
DTYPE_NAMES = ("auto", *_DTYPES)  # the values of the config key `dtype`


def compute_dtype(name: str):
    """'auto' is bf16 on accelerators and fp32 on CPU (where bf16 matmuls are slow)."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {DTYPE_NAMES}") from None


def jit_apply(
    module: nnx.Module,
    fn: Callable[..., Any],
    mesh: Mesh | None = None,
    sharding: str = "replicated",
) -> Callable[..., Any]:
    """`fn(module, *args)` as a jitted function of `*args`, with the module's state an argument
    (placed on `mesh` when given, as `place_frozen` says, so sharded batches run
    data-parallel)."""
    graphdef, state = nnx.split(module)
    if mesh is not None:
        state = place_frozen(mesh, state, sharding)

    @jax.jit
    def apply(state, *args):
        return fn(nnx.merge(graphdef, state, copy=True), *args)

    return lambda *args: apply(state, *args)


def run_over_split(
    fn: Callable[[dict], Any], loader, mesh, desc: str
) -> tuple[np.ndarray, np.ndarray]:
    """Applies jitted `fn(global_batch) -> [B, ...]` to every example of an eval `loader`
    (in order, last batch padded) and returns (outputs [N, ...], labels [N]) on every process."""
    outs, labels = [], []
    for batch in progress_bar(
        iterable=loader.epoch(0), total=loader.steps_per_epoch, desc=desc, unit="batch"
    ):
        gbatch = to_global(mesh, batch)
        out = fn(gbatch)
        # Gathering a global batch onto every host keeps the order of the split.
        out, label, mask = multihost_utils.process_allgather(
            (out, gbatch["label"], gbatch["mask"]), tiled=True
        )
        outs.append(np.asarray(out)[mask])
        labels.append(np.asarray(label)[mask])
    return np.concatenate(outs), np.concatenate(labels)
