"""Reading one image file: every reader goes through `read_rgb`, so a file looks the same
whether it comes from an image folder, a builder or a prepared copy."""

import numpy as np
from PIL import Image, ImageOps

# Integer modes that hold more than 8 bits per pixel (PNG and TIFF 16-bit greyscale open as
# these). PIL's own convert("RGB") clips them at 255, which turns most 16-bit images white.
_WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
# Errors of a file that is not a readable image (truncated, corrupt, not an image at all).
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def read_rgb(path: str) -> Image.Image:
    """The file fully decoded, turned upright by its EXIF orientation, as 8-bit RGB."""
    with Image.open(path) as img:
        img.load()  # truncated files fail here, not later in the training loop
        return to_rgb(ImageOps.exif_transpose(img))


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode.

    16-bit and 32-bit integers are scaled from the 16-bit range (x / 257), floats from [0, 1]
    when all values lie in it and are clipped to [0, 255] otherwise. Alpha is dropped without
    compositing, as torchvision's ImageFolder and open_clip's preprocessing do, so the
    student and the teacher see the pixels they would see in PyTorch.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_INT_MODES or img.mode == "F":
        x = np.asarray(img, np.float64)
        if img.mode in _WIDE_INT_MODES:
            x = x / 257.0
        elif x.size and x.min() >= 0.0 and x.max() <= 1.0:
            x = x * 255.0
        grey = np.clip(np.round(x), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
    return img.convert("RGB")
