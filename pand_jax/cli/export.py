"""`python export.py --student DIR --format torchvision|onnx --out FILE`: the trained student for
PyTorch or ONNX Runtime.

torchvision: a state dict for `torchvision.models.ARCH(num_classes=C)`:
    model = torchvision.models.resnet18(num_classes=200)
    model.load_state_dict(torch.load("student.pt"))
onnx: an ONNX model (input "image", output "logits", dynamic batch).
Both take NCHW float32 images normalised with CLIP's mean/std and return logits; FILE with .json
in place of its suffix records arch, num_classes, class_names, image_size, mean, std and layout.
"""
from __future__ import annotations

import argparse

from pand_jax.cli import common
from pand_jax.deploy.export import FORMATS


def parser() -> common.Parser:
    p = common.Parser(prog="export.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="student/ directory or its Stage-NSD workdir")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, metavar="FILE", help="for example student.pt or "
                   "student.onnx")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def export():
        from pand_jax import devices
        from pand_jax.deploy import export as export_lib
        from pand_jax.deploy import student as student_lib

        devices.report_devices()
        sidecar = export_lib.export(student_lib.load(args.student), args.format, args.out)
        print(f"wrote {args.out} and {sidecar}")

    return common.run(export)
