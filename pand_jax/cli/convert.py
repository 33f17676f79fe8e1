"""`convert_weights.py`: turns released PyTorch weights into pand_jax weight directories.

    convert_weights.py                                   teacher (model hub) + both students
    convert_weights.py --model N --pretrained TAG [--out D] [--verify]   any supported open_clip
                                                         CLIP by its pretrained tag (model hub)
    convert_weights.py --checkpoint F [--model N | --model-config F.json] [--out D] [--verify]
    convert_weights.py --demo-model [NAME] [--verify] [--out D]  tiny random CLIP, offline
    convert_weights.py --student resnet18|mobilenet_v2 [--checkpoint F] [--out D] [--verify]

Errors a user can fix print as one line `error: ...` and exit with status 2; a --verify above
tolerance prints the differences and exits with status 1. --out is written only when the
conversion (and its --verify) succeeded: the weights are saved beside it, checked, and renamed
into place, so a failure leaves --out as it was.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import posixpath
from typing import Any

import numpy as np

from pand_jax import files
from pand_jax.cli import common
from pand_jax.convert import open_clip as oc
from pand_jax.convert.state_dict import ConversionError, read_state_dict
from pand_jax.devices import report_devices
from pand_jax.models import clip as clip_lib
from pand_jax.models.student import ARCHS

WEIGHTS = pathlib.Path("weights")
DEMO_MODEL = "pand_demo_convnext"
DEMO_MODELS = tuple(oc.DEMO_MODELS)


class VerifyFailed(Exception):
    """--verify found differences above the tolerance (already printed): exit status 1."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = common.Parser(prog="convert_weights.py", description=__doc__.split("\n")[0])
    p.add_argument(
        "--checkpoint",
        type=pathlib.Path,
        help="local PyTorch state dict (.safetensors, .bin, .pt); no download",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help=f"open_clip model name (default {clip_lib.TEACHER_MODEL})")
    which.add_argument("--model-config", type=pathlib.Path, help="open_clip model config JSON")
    which.add_argument("--student", choices=ARCHS, help="convert a torchvision student")
    which.add_argument(
        "--demo-model",
        nargs="?",
        const=DEMO_MODEL,
        choices=DEMO_MODELS,
        help="a tiny random-weight CLIP built in PyTorch (offline smoke run; "
        f"default {DEMO_MODEL})",
    )
    p.add_argument(
        "--pretrained",
        help="open_clip pretrained tag to download "
        f"(default {clip_lib.TEACHER_PRETRAINED} for {clip_lib.TEACHER_MODEL}); with "
        "--checkpoint, the tag the file holds (recorded and checked, no download)",
    )
    p.add_argument("--out", type=pathlib.Path, help="output directory (default weights/<name>)")
    p.add_argument(
        "--verify",
        action="store_true",
        help="compare against the PyTorch model on random inputs; exit 1 above tolerance",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest relative difference --verify accepts (default 1e-4)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def convert() -> int:
        report_devices()
        try:
            if args.student:
                return convert_student(args.student, args.checkpoint, args.out, args.verify)
            if args.demo_model:
                return convert_demo(
                    args.demo_model,
                    args.out or WEIGHTS / "demo_teacher",
                    args.verify,
                    args.tolerance,
                )
            default_run = not (args.checkpoint or args.model or args.model_config)
            status = convert_teacher(args)
            if default_run and status == 0:
                for arch in ARCHS:
                    status = max(status, convert_student(arch, None, None, args.verify))
            return status
        except VerifyFailed:
            return 1

    return common.run(convert)


def convert_student(
    arch: str, checkpoint: pathlib.Path | None, out: pathlib.Path | None, verify: bool
) -> int:
    from pand_jax.convert.torchvision import convert_student as convert  # torch side, lazily

    result = convert(arch, checkpoint=checkpoint, out=out or WEIGHTS / arch, verify=verify)
    return result if isinstance(result, int) else 0


def _model_spec(args: argparse.Namespace) -> tuple[str | dict[str, Any], str]:
    """(open_clip name or config dict, a label for the metadata)."""
    if args.model_config is None:
        return args.model or clip_lib.TEACHER_MODEL, args.model or clip_lib.TEACHER_MODEL
    if not args.model_config.is_file():
        raise ConversionError(f"model config file not found: {args.model_config}")
    try:
        return json.loads(args.model_config.read_text()), args.model_config.stem
    except json.JSONDecodeError as e:
        raise ConversionError(f"{args.model_config} is not valid JSON: {e}") from e


def convert_teacher(args: argparse.Namespace) -> int:
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise ConversionError(f"checkpoint file not found: {args.checkpoint}")
    spec, name = _model_spec(args)
    # Everything that can refuse (model, tag, activation, mean/std) does before any download.
    cfg = oc.config_from_open_clip(spec)
    tag = args.pretrained or (
        clip_lib.TEACHER_PRETRAINED
        if name == clip_lib.TEACHER_MODEL and args.checkpoint is None
        else None
    )
    if tag is not None and not isinstance(spec, str):
        raise ConversionError(
            "--pretrained names a tag of a built-in open_clip model; with "
            "--model-config pass --checkpoint FILE only"
        )
    if tag is None and args.checkpoint is None:
        raise ConversionError(
            f"no pretrained tag known for {name}: pass --pretrained TAG "
            f"({_tags(name)}) or --checkpoint FILE"
        )
    meta: dict[str, Any] = {
        "model": name,
        **({"pretrained": tag} if tag else {}),
        "preprocess": oc.preprocess_meta(spec, tag),
    }
    clip_lib.check_preprocessing(meta["preprocess"], f"{name}" + (f" / {tag}" if tag else ""))
    checkpoint = args.checkpoint or download_checkpoint(name, tag)
    meta["checkpoint"] = str(checkpoint)
    out = args.out or WEIGHTS / "teacher"
    out.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(out) as tmp:
        _save_verified(
            read_state_dict(checkpoint),
            spec,
            cfg,
            tmp,
            out=out,
            meta=meta,
            verify=args.verify,
            tolerance=args.tolerance,
        )
    return 0


def _save_verified(
    sd: dict[str, np.ndarray],
    spec,
    cfg: clip_lib.CLIPConfig,
    tmp: pathlib.Path,
    *,
    out: pathlib.Path,
    meta: dict[str, Any],
    verify: bool,
    tolerance: float,
) -> None:
    """Converts `sd` into `tmp` (which becomes `out`) and, with `verify`, checks the saved copy
    against open_clip (raising VerifyFailed, so that it never becomes `out`)."""
    model = oc.convert_state_dict(sd, cfg, label=meta["model"])
    clip_lib.save_clip(tmp, model, **meta)
    if verify:
        _verify(clip_lib.load_clip(tmp), spec, sd, tolerance)
    print(f"saved {meta['model']} ({clip_lib.param_count(model):,} parameters) to {out.absolute()}")


def _verify(model: clip_lib.CLIP, spec, sd: dict[str, np.ndarray], tolerance: float) -> None:
    """Prints the differences to open_clip; raises VerifyFailed above `tolerance`."""
    import torch

    torch_model = oc.build_torch_model(spec)
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    diffs = oc.verify_clip(model, torch_model, batch=2)
    worst = max(d["rel"] for d in diffs.values())
    for key, d in diffs.items():
        print(f"verify {key:6s}: max abs {d['abs']:.3e}  max rel {d['rel']:.3e}")
    ok = worst <= tolerance
    print(f"verify {'passed' if ok else 'FAILED'}: max rel {worst:.3e} (tolerance {tolerance:.0e})")
    if not ok:
        raise VerifyFailed


def convert_demo(name: str, out: pathlib.Path, verify: bool, tolerance: float) -> int:
    """Random-weight tiny open_clip CLIP: saved as a PyTorch state dict, converted back."""
    from safetensors.torch import save_file

    torch_model = oc.build_torch_model(name)
    oc.randomize_torch_model(torch_model, seed=0)
    file = "open_clip_demo.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(out) as tmp:
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in torch_model.state_dict().items()}, str(tmp / file))
        print(f"wrote a random {name} open_clip state dict to {out / file}")
        _save_verified(
            read_state_dict(tmp / file),
            name,
            oc.config_from_open_clip(name),
            tmp,
            out=out,
            meta={
                "model": name,
                "checkpoint": str(out / file),
                "preprocess": oc.preprocess_meta(name),
            },
            verify=verify,
            tolerance=tolerance,
        )
    return 0


def _tags(model: str) -> str:
    """open_clip's pretrained tags of `model`, for a message."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model)
    return (
        f"open_clip has: {', '.join(tags)}" if tags else "open_clip has no pretrained tags for it"
    )


def download_checkpoint(model: str, tag: str) -> pathlib.Path:
    """The open_clip weights from the model hub (safetensors first), cached by huggingface_hub."""
    import open_clip
    from huggingface_hub import hf_hub_download

    pretrained = open_clip.get_pretrained_cfg(model, tag)
    # "owner/repo/" (open_clip's own file names) or "owner/repo/file.bin" (that file).
    hub_id, named = posixpath.split((pretrained or {}).get("hf_hub", "").strip())
    if not hub_id:
        raise ConversionError(
            f"open_clip has no model-hub weights for {model} / {tag}; pass --checkpoint FILE"
        )
    print(f"downloading {model} / {tag} from the model hub ({hub_id}) ...")
    errors = []
    names = [named] if named else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for filename in names:
        try:
            return pathlib.Path(hf_hub_download(hub_id, filename))
        except Exception as e:  # network, auth and missing-file errors all end the same way
            errors.append(f"{filename}: {type(e).__name__}: {e}")
    raise ConversionError(
        f"could not download {hub_id} ({errors[-1]}). Download open_clip_model.safetensors from "
        f"https://huggingface.co/{hub_id} elsewhere and pass --checkpoint FILE --model {model}"
    )
