"""`python export.py --student DIR --format torchvision|onnx --out OUTDIR`: the trained student for
PyTorch or ONNX Runtime, as OUTDIR/student.pt or OUTDIR/student.onnx (an --out ending in .pt,
.pth or .onnx names the file itself).

torchvision: a state dict for `torchvision.models.ARCH(num_classes=C)`:
    model = torchvision.models.resnet18(num_classes=200)
    model.load_state_dict(torch.load("student.pt"))
onnx: an ONNX model (input "image", output "logits", dynamic batch).
Both take NCHW float32 images normalised with CLIP's mean/std and return logits; the model file
name plus .json (student.onnx.json) records arch, num_classes, class_names, image_size, mean,
std and layout, so both formats can share a folder.
"""

from __future__ import annotations

import argparse
import pathlib

from pand_jax.cli import common
from pand_jax.deploy.export import FORMATS


def parser() -> common.Parser:
    p = common.Parser(
        prog="export.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--student", required=True, help="student/ directory or its Stage-NSD workdir")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument(
        "--out",
        metavar="OUTDIR",
        help="output folder (default: DIR/export); a name "
        "ending in .pt, .pth or .onnx is the model file itself",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def export():
        from pand_jax import devices
        from pand_jax.deploy import export as export_lib
        from pand_jax.deploy import student as student_lib

        devices.report_devices()
        out = args.out or pathlib.Path(args.student) / "export"
        model, sidecar = export_lib.export(student_lib.load(args.student), args.format, out)
        print(f"wrote {model} and {sidecar}")

    return common.run(export)
