"""Images out of a generator: [-1, 1] tensors to uint8, one PNG, a grid of them."""

from __future__ import annotations

import io

import numpy as np


def to_uint8(images) -> np.ndarray:
    """[-1, 1] float NCHW (torch or numpy) to uint8 NCHW."""
    arr = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    return ((arr.clip(-1, 1) + 1) * 127.5).round().astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """One uint8 CHW image (1 or 3 channels) as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def grid_png(images, nrow: int, pad: int = 2) -> bytes:
    """PNG bytes of an image grid, `nrow` images per row."""
    from PIL import Image

    u8 = to_uint8(images)
    n, c, h, w = u8.shape
    rows = -(-n // nrow)
    canvas = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        canvas[y:y + h, x:x + w] = u8[i].transpose(1, 2, 0)
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas, mode="L" if c == 1 else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
