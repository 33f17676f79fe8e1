"""Helpers several test files share that the package itself never needs."""
from __future__ import annotations

import numpy as np


def torch_state_dict(model) -> dict[str, np.ndarray]:
    """A PyTorch module's state dict as float32 NumPy arrays, the form the converters read."""
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
