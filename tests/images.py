"""Checks that a file is a real PNG image (decodable, not just named .png), and its size in pixels."""

from __future__ import annotations

from pathlib import Path


def png_size(path: Path) -> tuple[int, int]:
    import matplotlib.image

    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    image = matplotlib.image.imread(path)  # decodes the whole image: a truncated file fails here
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert image.shape[:2] == (height, width)
    return width, height
