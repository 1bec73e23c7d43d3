"""Copy a class-folder dataset with every photo shrunk, to carry it to another machine.

    python scripts/shrink_photos.py SOURCE DEST [--size 256]

The longest side becomes at most --size pixels; images are decoded by vtl's own rules
(so RGBA, palette and mislabelled files come out as plain RGB) and written as JPEG.
"""

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from vtl import data


def shrink(image: np.ndarray, size: int) -> np.ndarray:
    scale = size / max(image.shape[:2])
    if scale >= 1:
        return image
    shape = (round(image.shape[1] * scale), round(image.shape[0] * scale))
    return cv2.resize(image, shape, interpolation=cv2.INTER_AREA)


def main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("dest")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)

    source, dest = Path(args.source), Path(args.dest)
    written = 0
    for folder in data.list_class_folders(source):
        (dest / folder.name).mkdir(parents=True, exist_ok=True)
        for path in data.list_images(folder):
            try:
                rgb = data.decode(path.read_bytes(), str(path))
            except data.ImageError as error:
                print(f"skipped: {error}", file=sys.stderr)
                continue
            bgr = np.clip(np.rint(shrink(rgb, args.size)), 0, 255).astype(np.uint8)
            target = dest / folder.name / f"{path.stem}.jpg"
            cv2.imwrite(str(target), bgr[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
            written += 1
    print(f"{written} photos written to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
