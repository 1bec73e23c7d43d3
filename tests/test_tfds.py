"""Datasets from tensorflow-datasets: mocked tf_flowers end to end, offline errors."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.images import write_class_folders
from vtl import config as configs
from vtl import data, tfds_source, train

EXPERIMENT = str(Path(__file__).with_name("tiny_experiment.py"))
FLOWERS = ["dandelion", "daisy", "tulips", "sunflowers", "roses"]
MOCKED = 12
TRAIN, TEST = "train[:90%]", "train[90%:]"


def prepare_metadata(tfds, data_dir: Path, examples: int) -> None:
    """tf_flowers' metadata files, as `tfds build` leaves them, with no examples."""
    builder = tfds.builder("tf_flowers", data_dir=str(data_dir))
    split = tfds.core.SplitInfo(
        name="train", shard_lengths=[examples], num_bytes=0, filename_template=None
    )
    builder.info.set_splits(tfds.core.SplitDict([split]))
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)


def overrides(tmp: Path, *more: str) -> list[str]:
    return [
        "data.source=tfds:tf_flowers",
        f"data.tfds_dir={tmp / 'tensorflow_datasets'}",
        f"data.root={tmp / 'images'}",
        f"features.dir={tmp / 'store'}",
        f"workdir={tmp / 'run'}",
        *more,
    ]


@pytest.fixture(scope="module")
def tfds():
    return pytest.importorskip("tensorflow_datasets")


def mocked(tfds, tmp: Path):
    """tfds reading MOCKED random examples of the right spec, never real files."""
    folder = str(tmp / "tensorflow_datasets")
    return tfds.testing.mock_data(num_examples=MOCKED, data_dir=folder)


@pytest.fixture(scope="module")
def flowers(tfds, tmp_path_factory):
    """A tfds folder where tf_flowers is prepared, and the examples mock_data gives."""
    tmp = tmp_path_factory.mktemp("flowers")
    prepare_metadata(tfds, tmp / "tensorflow_datasets", MOCKED)
    with mocked(tfds, tmp):
        builder = tfds.builder("tf_flowers")
        examples = list(tfds.as_numpy(builder.as_dataset(split="train")))
    return tmp, examples


@pytest.fixture(scope="module")
def head_run(tfds, flowers):
    tmp, _ = flowers
    more = [f"data.tfds_train_split={TRAIN}", f"data.tfds_test_split={TEST}"]
    with mocked(tfds, tmp):
        summary = train.main(EXPERIMENT, overrides(tmp, *more, "train.epochs=2"))
    return summary, tmp


@pytest.mark.keras
def test_head_mode_runs_from_tfds(head_run, flowers):
    summary, tmp = head_run
    _, examples = flowers
    # mock_data gives every split (and slice) the same MOCKED examples.
    assert summary["classes"] == FLOWERS
    assert summary["counts"] == {"train": MOCKED, "test": MOCKED, "skipped": 0}
    assert np.array(summary["confusion_matrix"]).sum() == MOCKED

    predictions = json.loads((tmp / "run" / "test_predictions.json").read_text())
    assert predictions["classes"] == FLOWERS
    true = [FLOWERS[int(example["label"])] for example in examples]
    assert [image["true"] for image in predictions["images"]] == true
    assert [image["file"] for image in predictions["images"]] == [
        f"{TEST}/{name}/{i:06d}.png" for i, name in enumerate(true)
    ]
    assert json.loads((tmp / "run" / "classes.json").read_text()) == FLOWERS


@pytest.mark.keras
def test_written_images_keep_the_pixels(head_run, flowers):
    _, tmp = head_run
    _, examples = flowers
    folder = tmp / "images" / "tf_flowers" / "3.0.1" / TRAIN
    for i, example in enumerate(examples):
        path = folder / FLOWERS[int(example["label"])] / f"{i:06d}.png"
        pixels = example["image"]
        np.testing.assert_array_equal(cv2.imread(str(path))[:, :, ::-1], pixels)
        expected = data.preprocess(data.resize(pixels.astype(np.float32), 32))
        np.testing.assert_array_equal(data.load_image(path, 32), expected)


@pytest.mark.keras
def test_fingerprint_names_the_tfds_source(head_run):
    summary, tmp = head_run
    store = tmp / "store" / summary["feature_store"]["fingerprint"]
    key = json.loads((store / "record.json").read_text())["key"]
    assert key["source"] == {"tfds": "tf_flowers/3.0.1", "splits": [TRAIN, TEST]}
    split = json.loads((tmp / "run" / "split.json").read_text())
    assert split["source"] == key["source"]
    assert len(split["train"]) == len(split["test"]) == MOCKED


@pytest.mark.keras
def test_second_run_reuses_images_and_features(tfds, head_run):
    summary, tmp = head_run
    first = tmp / "images" / "tf_flowers" / "3.0.1" / TRAIN / tfds_source.RECORD
    written = first.stat().st_mtime_ns
    more = [f"data.tfds_train_split={TRAIN}", f"data.tfds_test_split={TEST}"]
    with mocked(tfds, tmp):
        again = train.main(
            EXPERIMENT,
            overrides(tmp, *more, "train.epochs=2", f"workdir={tmp / 'again'}"),
        )
    assert again["feature_store"]["status"] == "reused"
    assert (
        again["feature_store"]["fingerprint"] == summary["feature_store"]["fingerprint"]
    )
    assert first.stat().st_mtime_ns == written


@pytest.mark.keras
def test_empty_test_split_holds_out_a_fraction(tfds, flowers):
    tmp, examples = flowers
    config = configs.resolve(EXPERIMENT, overrides(tmp, "data.tfds_train_split=train"))
    with mocked(tfds, tmp):
        dataset = tfds_source.load_dataset(config)

    labels = np.array([int(example["label"]) for example in examples])
    train_index, test_index = data.stratified_split(labels, 0.25, 0)
    np.testing.assert_array_equal(dataset.labels, labels)
    np.testing.assert_array_equal(dataset.test, test_index)
    np.testing.assert_array_equal(dataset.train, train_index)
    assert dataset.files[0] == f"train/{FLOWERS[labels[0]]}/000000.png"
    assert dataset.root == tmp / "images" / "tf_flowers" / "3.0.1"


@pytest.mark.keras
def test_unknown_split_names_the_field(tfds, flowers):
    tmp, _ = flowers
    config = configs.resolve(
        EXPERIMENT, overrides(tmp, "data.tfds_test_split=validation")
    )
    with mocked(tfds, tmp), pytest.raises(tfds_source.SourceError) as error:
        tfds_source.load_dataset(config)
    message = str(error.value)
    assert message.startswith("data.tfds_test_split: tf_flowers/3.0.1 has no split")
    assert message.endswith("it has ['train']")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach another host fails at once, loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.keras
def test_unprepared_dataset_fails_before_any_download(tfds, tmp_path, no_network):
    empty = tmp_path / "tensorflow_datasets"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as error:
        train.main(EXPERIMENT, overrides(tmp_path))
    message = str(error.value)
    assert message.startswith(
        f"data.source=tfds:tf_flowers: tf_flowers/3.0.1 is not prepared in {empty}"
    )
    assert "`tfds build tf_flowers --data_dir=DIR`" in message
    assert list(empty.iterdir()) == []
    assert not (tmp_path / "images").exists()


@pytest.mark.keras
def test_unknown_dataset_is_refused(tfds, tmp_path, no_network):
    config = configs.resolve(
        EXPERIMENT, overrides(tmp_path, "data.source=tfds:no_such_flowers")
    )
    with pytest.raises(tfds_source.SourceError, match="no dataset 'no_such_flowers'"):
        tfds_source.load_dataset(config)


@pytest.mark.keras
def test_image_folder_reads_what_the_folder_path_reads(tfds, tmp_path):
    write_class_folders(tmp_path / "train", per_class=3, seed=1)
    write_class_folders(tmp_path / "test", per_class=2, seed=2)
    dataset = data.load_folder_dataset(tmp_path)

    for split, indices in (("train", dataset.train), ("test", dataset.test)):
        read, classes = tfds_source.read_image_folder(tmp_path, split, 32)
        assert classes == dataset.classes == ["dark", "grey", "light"]
        assert sorted(read) == sorted(dataset.files[i] for i in indices)
        for i in indices:
            image, label = read[dataset.files[i]]
            assert label == dataset.labels[i]
            expected = data.load_image(dataset.root / dataset.files[i], 32)
            np.testing.assert_array_equal(image, expected)


def test_missing_tensorflow_datasets_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    config = configs.resolve(EXPERIMENT, overrides(tmp_path))
    with pytest.raises(tfds_source.SourceError) as error:
        tfds_source.load_dataset(config)
    assert str(error.value) == (
        "data.source: a tfds: source needs tensorflow-datasets, which is not "
        "installed; pip install 'vtl[tfds]' (or pip install tensorflow-datasets)"
    )


def test_unknown_source_is_refused(tmp_path):
    with pytest.raises(ValueError) as error:
        train.main(EXPERIMENT, overrides(tmp_path, "data.source=tfds"))
    assert str(error.value) == "data.source: expected folder or tfds:NAME, found 'tfds'"


def test_importing_vtl_loads_no_tensorflow():
    code = (
        "import sys, vtl.train, vtl.predict, vtl.tfds_source\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'tensorflow', 'tensorflow_datasets', 'keras'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.stdout.strip() == "[]", result.stderr


def test_gray_and_transparent_examples_decode_as_photos_do(tmp_path):
    gray = np.array([[0, 64], [128, 255]], np.uint8)[:, :, None]
    rgba = np.array([[[200, 100, 50, 0], [200, 100, 50, 255]]], np.uint8)
    for name, image in (("gray", gray), ("rgba", rgba)):
        tfds_source.write_png(tmp_path / f"{name}.png", tfds_source.to_bgr(image, name))

    decoded = data.decode((tmp_path / "gray.png").read_bytes())
    np.testing.assert_array_equal(decoded, np.repeat(gray, 3, axis=2))
    decoded = data.decode((tmp_path / "rgba.png").read_bytes())
    # Transparent pixels come out white, as from a transparent photo.
    np.testing.assert_array_equal(decoded, [[[255, 255, 255], [200, 100, 50]]])
