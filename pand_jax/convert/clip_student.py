"""A trained `CLIPStudent` as a PyTorch module, for export: open_clip's own ViT image tower, the
VPT-deep prompts inserted as the student inserts them, and its head with the class vectors
folded in (`torch_student`, `state_dict`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict

from pand_jax.convert.open_clip import vit_keys
from pand_jax.convert.state_dict import layout_of, to_torch_layout
from pand_jax.convert.torchvision import ANCHOR_HEAD, LEAF, anchor_head, cosine_head
from pand_jax.models.clip_student import CLIPStudent

OPEN_CLIP_LN_EPS = 1e-5  # open_clip's LayerNorm default


def _open_clip_tower(student: CLIPStudent):
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    v = student.vision
    cfg = CLIPVisionCfg(
        width=v.width,
        layers=v.layers,
        head_width=v.width // v.heads,
        patch_size=v.patch_size,
        image_size=v.image_size,
        norm_kwargs=None if v.ln_eps == OPEN_CLIP_LN_EPS else {"eps": v.ln_eps},
    )
    return _build_vision_tower(student.embed_dim, cfg, quick_gelu=v.quick_gelu)


def torch_student(student: CLIPStudent):
    """The student as a torch module in eval mode: NCHW float32 images normalised with CLIP's
    mean and std -> logits. Its weights are `state_dict(student)`, loaded strictly."""
    import torch

    class PromptedCLIPStudent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = _open_clip_tower(student)
            self.depth, self.tokens = student.prompt_depth, student.prompt_tokens  # static
            self.prompts = torch.nn.Parameter(
                torch.zeros(student.prompt_depth, student.prompt_tokens, student.vision.width)
            )
            self.head = (
                cosine_head(student.embed_dim, student.num_classes)
                if student.head_dim is None
                else anchor_head(student.embed_dim, student.head_dim, student.num_classes)
            )

        def forward(self, images):
            v, n = self.visual, self.tokens
            x = v.conv1(images).flatten(2).transpose(1, 2)  # [B, grid^2, width]
            cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
            x = v.ln_pre(torch.cat([x, self.prompts[0].expand(x.shape[0], -1, -1)], dim=1))
            for i, block in enumerate(v.transformer.resblocks):
                if 0 < i < self.depth:
                    x = torch.cat([x[:, :-n], self.prompts[i].expand(x.shape[0], -1, -1)], dim=1)
                x = block(x)
            return self.head(v.ln_post(x[:, 0]) @ v.proj)

    model = PromptedCLIPStudent()
    model.load_state_dict({k: torch.from_numpy(w) for k, w in state_dict(student).items()})
    return model.eval()


def _head_key(path: tuple, anchor: bool) -> str:
    *module, leaf = path[1:]  # drop "classifier"
    if not anchor:
        return "head.weight"  # the cosine head's only entry, its class vectors
    return f"head.{ANCHOR_HEAD[module[0] if module else leaf]}.{LEAF[leaf]}"


def state_dict(student: CLIPStudent) -> dict[str, Any]:
    """The student's weights as float32 NumPy arrays under `torch_student`'s keys."""
    pure = flatten_dict(nnx.to_pure_dict(nnx.state(student)))
    out = {
        key: to_torch_layout(np.asarray(pure[path]), kind)
        for key, path, kind in vit_keys(student.vision)
    }
    out["prompts"] = np.asarray(pure[("prompts",)])
    anchor = student.head_dim is not None
    for path, w in pure.items():
        if path[0] == "classifier":
            out[_head_key(path, anchor)] = to_torch_layout(np.asarray(w), layout_of(np.ndim(w)))
    if anchor:
        out["head.1.num_batches_tracked"] = np.zeros((), np.int64)
    # np.array copies: writable, C-contiguous arrays that torch.from_numpy takes as they are.
    return {
        k: np.array(v, np.int64 if k.endswith("num_batches_tracked") else np.float32)
        for k, v in out.items()
    }
