"""Class-folder datasets: discovery, seeded splits, decoding and VGG preprocessing.

Images are decoded from their bytes, whatever their file name says, and always come
out as 3 channels in RGB order before `preprocess` turns them into what VGG expects.
"""

import dataclasses
import json
import logging
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The type and CRC of the IEND chunk, which closes every complete PNG.
PNG_END = b"IEND\xaeB`\x82"
JPEG_START, JPEG_END, JPEG_SCAN = b"\xff\xd8", b"\xff\xd9", 0xDA
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*")

# keras.applications.vgg19.preprocess_input ("caffe" mode): BGR order, the ImageNet
# mean of each channel subtracted, no scaling. The converted weights expect exactly it.
IMAGENET_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
PREPROCESSING = "caffe: RGB to BGR, minus ImageNet mean [103.939, 116.779, 123.68]"


class ImageError(ValueError):
    """An image file that cannot be turned into pixels."""


@dataclasses.dataclass
class Dataset:
    """Every image of a run, its label, and which ones are held out for testing.

    `files` are relative to `root`, grouped by class in the order of `classes` and
    sorted by file name within a class (with `ROOT/train` and `ROOT/test`, all the
    training files come first), so the same folder always gives the same order;
    `train` and `test` index into them.
    """

    root: Path
    classes: list[str]
    files: list[str]
    labels: np.ndarray
    train: np.ndarray
    test: np.ndarray

    def paths(self) -> list[Path]:
        return [self.root / f for f in self.files]

    def split_record(self) -> dict:
        return {
            "root": str(self.root),
            "train": [self.files[i] for i in self.train],
            "test": [self.files[i] for i in self.test],
        }


def is_hidden(path: Path) -> bool:
    # Covers .DS_Store, .ipynb_checkpoints/ and the ._name.jpg files macOS leaves,
    # and the __MACOSX/ folder of resource forks that unzipping a Mac archive leaves.
    return path.name.startswith(".") or path.name == "__MACOSX"


def is_broken_link(path: Path) -> bool:
    """Whether `path` is a symbolic link that dangles or loops; each one is logged."""
    if not path.is_symlink():
        return False
    try:
        path.stat()
    except OSError as error:
        log.warning(
            "%s: skipped, a symbolic link that cannot be followed (%s)",
            path,
            error.strerror,
        )
        return True
    return False


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, by suffix (any case), hidden ones skipped.

    Symbolic links are followed; one that dangles or loops is logged and skipped.
    """
    return sorted(
        p
        for p in folder.iterdir()
        if not is_hidden(p)
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not is_broken_link(p)
        and p.is_file()
    )


def list_class_folders(root: Path) -> list[Path]:
    """Non-hidden folders of `root`, sorted by name as Keras does.

    The sort is by code point, so upper case comes before lower case:
    ['Bus', 'Car', 'Truck', 'motorcycle']. A class's label is its index in this order.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: {root} is not a folder")
    folders = sorted(
        p
        for p in root.iterdir()
        if not is_hidden(p) and not is_broken_link(p) and p.is_dir()
    )
    if not folders:
        raise ValueError(
            f"data.root: {root} has no class folders; expected ROOT/<class>/<image>"
        )
    return folders


def scan(root: Path, classes: list[str] | None = None):
    """Relative image paths and labels under `root`; an empty class is an error.

    With `classes` given, the class folders must be exactly those (as for ROOT/test).
    """
    folders = list_class_folders(root)
    names = [f.name for f in folders]
    if classes is not None and names != classes:
        missing = sorted(set(classes) - set(names))
        extra = sorted(set(names) - set(classes))
        raise ValueError(
            f"{root}: class folders differ from the training classes "
            f"{classes}: missing {missing}, extra {extra}"
        )

    files, labels = [], []
    for label, folder in enumerate(folders):
        images = list_images(folder)
        if not images:
            raise ValueError(
                f"{folder}: class folder {folder.name!r} holds no images "
                f"(looked for {sorted(IMAGE_SUFFIXES)})"
            )
        files += [str(p.relative_to(root)) for p in images]
        labels += [label] * len(images)
    return names, files, labels


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int):
    """Seeded split that holds out `test_fraction` of every class (at least one).

    A class of one image stays in training. Returns sorted train and test indices.
    """
    if not 0 <= test_fraction < 1:
        raise ValueError(
            f"data.test_fraction: expected a fraction in [0, 1), found {test_fraction}"
        )
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(members) * test_fraction))
        if test_fraction > 0 and len(members) > 1:
            n_test = min(max(n_test, 1), len(members) - 1)
        test += members[:n_test].tolist()
        train += members[n_test:].tolist()
    return np.sort(np.array(train, int)), np.sort(np.array(test, int))


def load_folder_dataset(root: str | Path, test_fraction: float = 0.1, seed: int = 0):
    """`ROOT/<class>/<image>` split by seed, or `ROOT/train` and `ROOT/test` as is."""
    root = Path(root).expanduser().resolve()
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes, train_files, train_labels = scan(root / "train")
        _, test_files, test_labels = scan(root / "test", classes)
        files = [f"train/{f}" for f in train_files] + [f"test/{f}" for f in test_files]
        labels = np.array(train_labels + test_labels, int)
        train = np.arange(len(train_files))
        test = np.arange(len(train_files), len(files))
    else:
        classes, files, labels = scan(root)
        labels = np.array(labels, int)
        train, test = stratified_split(labels, test_fraction, seed)

    log.info(
        "data: %d images in %d classes %s, %d train / %d test",
        len(files),
        len(classes),
        classes,
        len(train),
        len(test),
    )
    return Dataset(root, classes, files, labels, train, test)


def save_split(dataset: Dataset, path: Path) -> None:
    """Write which files were trained on and which were held out, as JSON."""
    path.write_text(json.dumps(dataset.split_record(), indent=1))


def may_have_alpha(data: bytes) -> bool:
    """Whether the bytes are a PNG, WebP or TIFF: formats that can carry alpha."""
    webp = data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    return webp or data.startswith((PNG_SIGNATURE, *TIFF_SIGNATURES))


def jpeg_reaches_its_end(data: bytes) -> bool:
    """Whether a JPEG's end marker follows its first scan (the image data).

    The segments before the scan are skipped by their lengths, so the end marker of
    a thumbnail inside the Exif segment does not count.
    """
    position = 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # Fill bytes may pad a marker.
            position += 1
            continue
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == JPEG_SCAN:
            return data.find(JPEG_END, position) >= 0
    # Stopping at a byte that is not a marker is damage, not an early end: the
    # decoder judges it.
    return position + 4 <= len(data)


def truncation(data: bytes) -> str | None:
    """Why the bytes of a JPEG or PNG look cut short, or None when they do not."""
    # Checked here, not left to OpenCV: some of its versions fill the missing part
    # of a JPEG with grey and return it with only a warning on stderr.
    if data.startswith(PNG_SIGNATURE) and PNG_END not in data:
        return f"truncated PNG: its {len(data)} bytes end before the IEND chunk"
    if data.startswith(JPEG_START) and not jpeg_reaches_its_end(data):
        return f"truncated JPEG: its {len(data)} bytes end before the end marker"
    return None


def opencv_failure(error: cv2.error) -> str:
    """What an exception from cv2.imdecode means, in words."""
    if "CV_IO_MAX_IMAGE_PIXELS" in error.err:
        return (
            "the image has more pixels than OpenCV decodes (2^30 by default; the "
            "environment variable CV_IO_MAX_IMAGE_PIXELS raises the limit)"
        )
    return f"OpenCV failed to decode it ({error.err})"


def decode(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Bytes of a JPEG, PNG, … -> float32 RGB in [0, 255], scaled by their bit depth.

    The format is told by content, not by file name. Transparent pixels are composited
    over white; gray is repeated into 3 channels.
    """
    if not data:
        raise ImageError(f"{source}: file is empty (0 bytes)")
    cut = truncation(data)
    if cut:
        raise ImageError(f"{source}: {cut}; was a copy or download interrupted?")

    # Formats that can carry alpha are read unchanged, which also keeps 16-bit depth;
    # the rest (JPEG above all) as colour, so that OpenCV applies EXIF orientation.
    # NOTE: reading unchanged skips the orientation of PNG and WebP; those rarely
    # have one, and dropping their alpha would turn transparent areas black.
    if may_have_alpha(data):
        flags = cv2.IMREAD_UNCHANGED
    else:
        flags = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as error:
        raise ImageError(f"{source}: {opencv_failure(error)}") from None
    if image is None:
        raise ImageError(
            f"{source}: not a readable image (OpenCV could not decode "
            f"{len(data)} bytes starting {data[:8]!r})"
        )
    return to_rgb(image, source)


def to_float(image: np.ndarray) -> np.ndarray:
    """Pixels -> a new C-ordered float32 array; unsigned ones scaled to [0, 255]."""
    pixels = image.astype(np.float32, order="C")
    # 8-bit values are already in range. Multiplying before dividing keeps 16-bit
    # multiples of 257 exact (257 * k -> k); in place, a large photo is not copied.
    if image.dtype.kind == "u" and image.dtype != np.uint8:
        pixels *= 255.0
        pixels /= np.iinfo(image.dtype).max
    return pixels


def to_rgb(image: np.ndarray, source: str) -> np.ndarray:
    """OpenCV's gray, gray+alpha, BGR or BGRA -> float32 RGB, alpha over white."""
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2]
    if channels not in (1, 2, 3, 4):
        raise ImageError(f"{source}: expected 1 to 4 channels, found {channels}")

    # Channels are put in RGB order before widening to float32, so that a large photo
    # costs a single float copy (648 MB at 9000×6000).
    if channels == 3:
        return to_float(image[:, :, ::-1])
    order = {1: [0, 0, 0], 2: [0, 0, 0, 1], 4: [2, 1, 0, 3]}[channels]
    pixels = to_float(image[:, :, order])
    if pixels.shape[2] == 4:
        alpha = pixels[:, :, 3:] / 255.0
        pixels = pixels[:, :, :3] * alpha + 255.0 * (1.0 - alpha)
    return pixels


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Stretch to size×size, as Keras's `target_size` does, with area averaging."""
    if image.shape[:2] == (size, size):
        return image
    shrinking = image.shape[0] > size and image.shape[1] > size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def preprocess(rgb: np.ndarray) -> np.ndarray:
    """RGB in [0, 255] -> what Keras's VGG preprocess_input returns."""
    return rgb[..., ::-1] - IMAGENET_MEAN_BGR


def load_image(path: Path, size: int) -> np.ndarray:
    """One file, ready for the trunk: size×size×3, preprocessed, float32."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ImageError(f"{path}: cannot be read ({error.strerror})") from None
    return preprocess(resize(decode(data, str(path)), size)).astype(np.float32)
