"""Small generated photo folders for tests: each class is a shade, so it is learnable.

Shades far apart survive even a randomly initialised trunk, whose ReLU layers keep
the overall brightness but blur finer colour differences."""

from pathlib import Path

import cv2
import numpy as np

SHADES_BGR = {"dark": (30, 20, 25), "grey": (120, 130, 125), "light": (230, 240, 220)}


def write_class_folders(root: Path, per_class: int = 8, size: int = 40, seed: int = 0):
    """ROOT/<shade>/<n>.png with noisy images of that shade; returns ROOT."""
    rng = np.random.default_rng(seed)
    for name, shade in SHADES_BGR.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(-20, 20, (size, size, 3))
            image = np.clip(np.array(shade) + noise, 0, 255).astype(np.uint8)
            cv2.imwrite(str(folder / f"{i:02d}.png"), image)
    return root


def encode(suffix: str, image: np.ndarray, *params: int) -> bytes:
    """OpenCV-encoded bytes of a BGR(A) or gray image."""
    ok, buffer = cv2.imencode(suffix, image, list(params))
    assert ok, f"OpenCV could not encode {suffix}"
    return buffer.tobytes()


def write(path: Path, content: bytes) -> Path:
    """Write `content` to `path`, making its folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


# One opaque, one clear and one half-transparent pixel, and the RGB they must decode
# to over white.
ALPHA_PIXELS_BGRA = np.array(
    [[[10, 20, 30, 255], [10, 20, 30, 0], [10, 20, 30, 128]]], np.uint8
)
ALPHA_PIXELS_OVER_WHITE = [
    [30, 20, 10],
    [255, 255, 255],
    [c * 128 / 255 + 255 * (1 - 128 / 255) for c in (30, 20, 10)],
]
