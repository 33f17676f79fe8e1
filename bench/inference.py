"""Inference throughput of the exported student: the Flax Student, the torchvision model
export.py writes and the ONNX file under onnxruntime, side by side on the same inputs.

Forward only, eval mode, fp32, NCHW/NHWC float inputs already normalised (no decoding), a
200-class head, random weights (speed does not depend on their values). Also prints the
largest relative logit difference of each export against Flax.

    python bench/inference.py --batch 32 --size 224 --iters 10
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import platform
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from pand_jax import cli
from pand_jax.deploy import export
from pand_jax.deploy import student as student_lib
from pand_jax.models.student import ARCHS, Student

NUM_CLASSES = 200  # a CUB-sized head
WARMUP = 2


def images_per_s(run, batch: int, iters: int) -> float:
    for _ in range(WARMUP):
        run()
    start = time.perf_counter()
    for _ in range(iters):
        run()
    return batch * iters / (time.perf_counter() - start)


def bench(arch: str, batch: int, size: int, iters: int) -> dict[str, float]:
    import onnxruntime
    import torch

    model = Student(arch, NUM_CLASSES, rngs=nnx.Rngs(0))
    model.eval()
    trained = student_lib.TrainedStudent(
        model,
        {"class_names": [str(c) for c in range(NUM_CLASSES)]},
        dict(student_lib.default_settings(), image_size=size),
    )
    x = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
    x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    forward = nnx.jit(lambda m, x: m(x))
    flax_logits = np.asarray(forward(model, x))
    tv = export.torchvision_model(trained)
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "student.onnx"
        export.export(trained, "onnx", path)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tensor = torch.from_numpy(x_nchw)

    def torch_run():
        with torch.no_grad():
            return tv(tensor).numpy()

    def ort_run():
        return session.run(["logits"], {"image": x_nchw})[0]

    scale = np.max(np.abs(flax_logits))
    return {
        "flax": images_per_s(lambda: forward(model, x).block_until_ready(), batch, iters),
        "torchvision": images_per_s(torch_run, batch, iters),
        "onnxruntime": images_per_s(ort_run, batch, iters),
        "torchvision_rel_err": float(np.max(np.abs(torch_run() - flax_logits)) / scale),
        "onnxruntime_rel_err": float(np.max(np.abs(ort_run() - flax_logits)) / scale),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--arch", choices=ARCHS, action="append")
    args = p.parse_args()
    import torch

    print(
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"jax {jax.__version__} on {jax.default_backend()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), batch {args.batch}, {args.size} px, "
        f"{args.iters} iterations after {WARMUP} warm-up"
    )
    print(
        "| student | Flax img/s | torchvision img/s | onnxruntime img/s "
        "| torchvision rel. err | onnxruntime rel. err |"
    )
    print("|---|---|---|---|---|---|")
    for arch in args.arch or ARCHS:
        r = bench(arch, args.batch, args.size, args.iters)
        print(
            f"| {arch} | {r['flax']:.1f} | {r['torchvision']:.1f} | {r['onnxruntime']:.1f} "
            f"| {r['torchvision_rel_err']:.1e} | {r['onnxruntime_rel_err']:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    cli.start()  # as the command-line tools do: XLA:CPU's option, huge pages
    main()
