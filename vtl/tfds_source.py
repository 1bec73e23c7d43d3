"""Datasets from tensorflow-datasets, written once as PNG files and read as a folder.

Each split becomes `data.root/<name>/<version>/<split>/<class>/<index>.png` once
(lossless), so decoding, the feature store, prediction and plots work as for photos.
"""

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from vtl import data

log = logging.getLogger(__name__)

PREFIX = "tfds:"
DEFAULT_CACHE = "~/.cache/vtl/tfds"
RECORD = "examples.json"
INSTALL = "pip install 'vtl[tfds]' (or pip install tensorflow-datasets)"


class SourceError(ValueError):
    """A tensorflow-datasets source that cannot be read as asked."""


@dataclasses.dataclass
class TfdsDataset(data.Dataset):
    """A `Dataset` whose files were written from a tfds dataset; `source` names it."""

    source: dict = dataclasses.field(default_factory=dict)

    def split_record(self) -> dict:
        return {"source": self.source, **super().split_record()}


def import_tfds():
    """tensorflow_datasets, imported only when a tfds source is asked for."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise SourceError(
            f"data.source: a tfds: source needs tensorflow-datasets, which is not "
            f"installed; {INSTALL}"
        ) from None
    return tfds


def dataset_name(source: str) -> str:
    """NAME of `tfds:NAME` (with an optional /config and :version)."""
    name = source[len(PREFIX) :].strip()
    if not source.startswith(PREFIX) or not name:
        raise SourceError(
            f"data.source: expected folder or tfds:NAME, found {source!r}"
        )
    return name


def tfds_dir(config) -> Path:
    """Where tfds keeps prepared datasets: data.tfds_dir, else the tfds default."""
    default = os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    return Path(config.data.tfds_dir or default).expanduser().resolve()


def prepared_builder(tfds, name: str, data_dir: Path):
    """The dataset's builder, after checking its files are already on this machine.

    Nothing is ever downloaded: a dataset that is not prepared in `data_dir` stops
    the run at once instead of after a network timeout.
    """
    parsed, _ = tfds.core.naming.parse_builder_name_kwargs(name)
    if parsed.namespace:
        raise SourceError(
            f"data.source: {name!r} is a community dataset (namespace "
            f"{parsed.namespace!r}), which tensorflow-datasets fetches from the "
            "network; expected a dataset of the tensorflow-datasets catalog"
        )
    try:
        builder = tfds.builder(name, data_dir=str(data_dir))
    except tfds.core.registered.DatasetNotFoundError:
        raise SourceError(
            f"data.source: tensorflow-datasets has no dataset {name!r} "
            "(see https://www.tensorflow.org/datasets/catalog)"
        ) from None

    if not builder.is_prepared():
        raise FileNotFoundError(
            f"data.source=tfds:{name}: {builder.info.full_name} is not prepared in "
            f"{data_dir} (no dataset_info.json in {builder.data_path}), and vtl "
            f"never downloads it. On a machine that is online run `tfds build "
            f"{name} --data_dir=DIR`, copy DIR/{builder.name} to {data_dir}, or set "
            "data.tfds_dir to the folder that holds it"
        )
    return builder


def supervised_keys(tfds, builder) -> tuple[str, str]:
    """The image and label features, checked to be an image and a class label."""
    info = builder.info
    keys = info.supervised_keys or ()
    # Some datasets give nested keys (several inputs); those are not one image.
    if len(keys) < 2 or not all(isinstance(key, str) for key in keys[:2]):
        keys = ("image", "label")
    image_key, label_key = keys[:2]
    features = info.features
    image = features[image_key] if image_key in features else None
    label = features[label_key] if label_key in features else None
    if not isinstance(image, tfds.features.Image) or not isinstance(
        label, tfds.features.ClassLabel
    ):
        raise SourceError(
            f"data.source: {info.full_name} must have an image feature "
            f"{image_key!r} and a class label {label_key!r}; found {features}"
        )
    return image_key, label_key


def check_split(builder, split: str, field: str) -> None:
    """Refuse a split name (or slice) the prepared dataset does not have."""
    try:
        examples = builder.info.splits[split].num_examples
    except (KeyError, ValueError, AssertionError) as error:
        raise SourceError(
            f"{field}: {builder.info.full_name} has no split {split!r} "
            f"({error}); it has {sorted(builder.info.splits)}"
        ) from None
    if examples == 0:
        raise SourceError(f"{field}: split {split!r} holds no examples")


def class_folder(label: int, names: list[str]) -> str:
    """The folder of a class: its name when that is a safe file name, else its index."""
    name = names[label]
    unsafe = not name or "/" in name or "\0" in name or name.startswith(".")
    return str(label) if unsafe or name == "__MACOSX" else name


def to_bgr(image: np.ndarray, source: str) -> np.ndarray:
    """A tfds image (RGB, gray or RGBA; uint8 or uint16) in the order OpenCV writes."""
    if image.dtype not in (np.uint8, np.uint16):
        raise SourceError(
            f"{source}: expected uint8 or uint16 pixels, found {image.dtype}"
        )
    channels = image.shape[2] if image.ndim == 3 else 1
    if channels not in (1, 3, 4):
        raise SourceError(f"{source}: expected 1, 3 or 4 channels, found {channels}")
    if channels == 1:
        return image.reshape(image.shape[:2])
    return image[:, :, [2, 1, 0, 3][:channels]]


def write_png(path: Path, image: np.ndarray) -> None:
    """PNG bytes of `image` (BGR), written through Python so any file name works."""
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise SourceError(f"{path}: OpenCV could not encode it as PNG")
    path.write_bytes(encoded.tobytes())


def materialise(tfds, builder, split: str, folder: Path) -> dict:
    """Every example of `split` as `folder/<class>/<index>.png`, once; its record.

    The files are written to a temporary folder that is renamed when complete, so a
    folder with a record is always whole.
    """
    record_path = folder / RECORD
    if record_path.is_file():
        return json.loads(record_path.read_text())

    image_key, label_key = supervised_keys(tfds, builder)
    names = builder.info.features[label_key].names
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    examples = builder.as_dataset(split=split, shuffle_files=False)
    total = builder.info.splits[split].num_examples
    files, labels = [], []
    for index, example in enumerate(
        tqdm(tfds.as_numpy(examples), total=total, desc=f"{split} to PNG", unit="img")
    ):
        label = int(example[label_key])
        name = f"{class_folder(label, names)}/{index:06d}.png"
        (partial / name).parent.mkdir(parents=True, exist_ok=True)
        write_png(partial / name, to_bgr(example[image_key], f"{split} #{index}"))
        files.append(name)
        labels.append(label)

    record = {"dataset": builder.info.full_name, "split": split, "classes": names}
    record.update(files=files, labels=labels)
    (partial / RECORD).write_text(json.dumps(record))
    try:
        os.replace(partial, folder)
    except OSError:
        # Another run finished the same split first; its files are the same.
        shutil.rmtree(partial, ignore_errors=True)
        if not record_path.is_file():
            raise SourceError(
                f"{folder}: expected the examples of {split} with {RECORD}, found a "
                "folder without it; remove the folder to write the split again"
            ) from None
        return json.loads(record_path.read_text())
    log.info("tfds: wrote %d examples of %s to %s", len(files), split, folder)
    return record


def split_folder(split: str) -> str:
    """A folder name for a split such as `train[:90%]`, kept readable."""
    return split.replace("/", "_").replace("\0", "_")


def load_dataset(config) -> TfdsDataset:
    """A tfds dataset as files, its classes from the metadata, split as configured."""
    tfds = import_tfds()
    name = dataset_name(config.data.source)
    train_split, test_split = config.data.tfds_train_split, config.data.tfds_test_split
    if test_split == train_split:
        raise SourceError(
            f"data.tfds_test_split: expected a split other than the training split "
            f"{train_split!r}, or empty to hold out data.test_fraction of it"
        )
    if not test_split and config.data.test_fraction == 0:
        raise SourceError(
            "data.test_fraction is 0 and data.tfds_test_split is empty: "
            "nothing to evaluate on"
        )
    builder = prepared_builder(tfds, name, tfds_dir(config))
    supervised_keys(tfds, builder)
    check_split(builder, train_split, "data.tfds_train_split")
    if test_split:
        check_split(builder, test_split, "data.tfds_test_split")

    root = Path(config.data.root or DEFAULT_CACHE).expanduser().resolve()
    root = root / builder.info.full_name
    records = [
        materialise(tfds, builder, split, root / split_folder(split))
        for split in filter(None, (train_split, test_split))
    ]
    return as_dataset(config, root, records)


def as_dataset(config, root: Path, records: list[dict]) -> TfdsDataset:
    """The Dataset over the written files: the test split, or a held-out fraction."""
    files, labels = [], []
    for record in records:
        files += [f"{split_folder(record['split'])}/{f}" for f in record["files"]]
        labels += record["labels"]
    labels = np.array(labels, int)
    train_count = len(records[0]["files"])
    if len(records) == 2:
        train, test = np.arange(train_count), np.arange(train_count, len(files))
    else:
        train, test = data.stratified_split(
            labels, config.data.test_fraction, config.data.split_seed
        )

    classes = records[0]["classes"]
    missing = sorted(set(range(len(classes))) - set(labels[train].tolist()))
    if missing:
        log.warning("tfds: no training images of %s", [classes[i] for i in missing])
    log.info(
        "data: %s, %d images in %d classes %s, %d train / %d test",
        records[0]["dataset"],
        len(files),
        len(classes),
        classes,
        len(train),
        len(test),
    )
    source = {"tfds": records[0]["dataset"], "splits": [r["split"] for r in records]}
    return TfdsDataset(root, classes, files, labels, train, test, source)


def read_image_folder(root: str | Path, split: str, size: int):
    """`ROOT/<split>/<class>/<image>` read by tfds's ImageFolder, preprocessed as vtl.

    Returns {file relative to ROOT: (image ready for the trunk, label)} and the class
    names: a check that TensorFlow's decoding agrees with vtl's on the same files.
    """
    tfds = import_tfds()
    root = Path(root).expanduser().resolve()
    builder = tfds.folder_dataset.ImageFolder(str(root))
    examples = builder.as_dataset(split=split, shuffle_files=False)
    read = {}
    for example in tfds.as_numpy(examples):
        name = Path(example["image/filename"].decode()).relative_to(root)
        rgb = example["image"].astype(np.float32)
        image = data.preprocess(data.resize(rgb, size)).astype(np.float32)
        read[str(name)] = image, int(example["label"])
    return read, builder.info.features["label"].names
