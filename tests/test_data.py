"""Class-folder data: discovery, seeded splits, decoding by content, VGG preprocessing.

Every image is generated here, a few pixels wide, in pytest's tmp_path.
"""

import json
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.images import ALPHA_PIXELS_BGRA, ALPHA_PIXELS_OVER_WHITE, encode, write
from vtl import data

MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_bytes(rows: list[bytes], width: int, color_type: int, *chunks: bytes) -> bytes:
    """An 8-bit PNG by hand, of the kinds OpenCV cannot write (palette, gray+alpha)."""
    header = struct.pack(">IIBBBBB", width, len(rows), 8, color_type, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\x00" + row for row in rows))
    return (
        data.PNG_SIGNATURE
        + png_chunk(b"IHDR", header)
        + b"".join(chunks)
        + png_chunk(b"IDAT", pixels)
        + png_chunk(b"IEND", b"")
    )


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The JPEG with an APP1 Exif segment that holds only an Orientation tag."""
    entry = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff = b"MM\x00*" + struct.pack(">IH", 8, 1) + entry + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + tiff
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + segment + jpeg[2:]


# Preprocessing.


def random_rgb(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (2, 5, 6, 3)).astype(np.float32)


def test_preprocess_is_bgr_minus_imagenet_mean():
    rgb = random_rgb()
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    blue_green_red = [blue - MEAN_BGR[0], green - MEAN_BGR[1], red - MEAN_BGR[2]]
    expected = np.stack(blue_green_red, -1)
    np.testing.assert_array_equal(data.preprocess(rgb), expected)

    pixel = data.preprocess(np.array([255.0, 0.0, 10.0], np.float32))
    np.testing.assert_allclose(pixel, [-93.939, -116.779, 131.32], rtol=1e-6)


@pytest.mark.keras
def test_preprocess_equals_keras_vgg19():
    pytest.importorskip("tensorflow")
    vgg19 = pytest.importorskip("keras.applications.vgg19")
    rgb = random_rgb(1)
    expected = np.asarray(vgg19.preprocess_input(rgb.copy()))  # Keras edits in place.
    np.testing.assert_allclose(data.preprocess(rgb), expected, rtol=1e-6, atol=1e-5)


# Decoding by content.


def test_png_named_jpg_decodes_to_exact_pixels(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (6, 6, 3), np.uint8)
    path = write(tmp_path / "photo.jpg", encode(".png", rgb[..., ::-1]))

    decoded = data.decode(path.read_bytes(), str(path))
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, rgb)
    np.testing.assert_array_equal(data.load_image(path, 6), data.preprocess(rgb))


def test_bgr_red_comes_out_as_rgb_red(tmp_path):
    red_bgr = np.zeros((8, 8, 3), np.uint8)
    red_bgr[..., 2] = 255
    png = data.decode(encode(".png", red_bgr))
    jpeg = data.decode(encode(".jpg", red_bgr, cv2.IMWRITE_JPEG_QUALITY, 100))

    np.testing.assert_array_equal(png, np.broadcast_to([255.0, 0.0, 0.0], png.shape))
    np.testing.assert_allclose(
        jpeg, np.broadcast_to([255.0, 0.0, 0.0], png.shape), atol=3
    )


def test_jpeg_decodes_like_imread(tmp_path):
    ramp = np.linspace(0, 255, 16, dtype=np.float32)
    bgr = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 128.0), -1)
    bgr = bgr.astype(np.uint8)
    jpeg = encode(".jpg", bgr, cv2.IMWRITE_JPEG_QUALITY, 95)
    path = write(tmp_path / "ramp.JPG", jpeg)

    decoded = data.decode(path.read_bytes(), str(path))
    np.testing.assert_array_equal(decoded, cv2.imread(str(path))[..., ::-1])
    assert np.abs(decoded - bgr[..., ::-1]).mean() < 3


@pytest.mark.parametrize(
    "suffix, params",
    [
        (".png", ()),
        (".webp", (cv2.IMWRITE_WEBP_QUALITY, 101)),  # Above 100 means lossless.
        (".tiff", ()),
    ],
)
def test_alpha_is_composited_over_white(suffix, params):
    decoded = data.decode(encode(suffix, ALPHA_PIXELS_BGRA, *params), f"x{suffix}")

    np.testing.assert_allclose(decoded[0], ALPHA_PIXELS_OVER_WHITE, atol=1e-3)


def test_palette_png_with_transparency():
    palette = png_chunk(b"PLTE", bytes([255, 0, 0, 0, 255, 0, 0, 0, 255]))
    opaque = png_bytes([bytes([0, 1, 2])], 3, 3, palette)
    transparent = png_bytes(
        [bytes([0, 1, 2])], 3, 3, palette, png_chunk(b"tRNS", bytes([255, 0]))
    )

    np.testing.assert_array_equal(
        data.decode(opaque)[0], [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    )
    np.testing.assert_array_equal(
        data.decode(transparent)[0], [[255, 0, 0], [255, 255, 255], [0, 0, 255]]
    )


def test_gray_png_gives_three_equal_channels():
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5) * 12
    decoded = data.decode(encode(".png", gray))
    assert decoded.shape == (4, 5, 3)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[..., channel], gray)


def test_gray_alpha_png():
    rows = [bytes([100, 255, 100, 0])]
    decoded = data.decode(png_bytes(rows, 2, 4))
    np.testing.assert_array_equal(decoded[0], [[100, 100, 100], [255, 255, 255]])


def test_16_bit_png_scales_by_255_over_65535():
    levels = np.arange(0, 256, 15)
    gray = (levels * 257).astype(np.uint16)[None, :]
    decoded = data.decode(encode(".png", gray))
    np.testing.assert_array_equal(decoded[0, :, 0], levels)
    assert decoded[0, -1, 0] == 255.0

    bgr = np.array([[[257 * 10, 257 * 20, 65535]]], np.uint16)
    np.testing.assert_array_equal(data.decode(encode(".png", bgr))[0, 0], [255, 20, 10])


def test_jpeg_exif_orientation_is_applied():
    # Left half red, right half blue; orientation 6 means "turn 90° clockwise to show".
    bgr = np.zeros((16, 32, 3), np.uint8)
    bgr[:, :16, 2] = 255
    bgr[:, 16:, 0] = 255
    jpeg = encode(".jpg", bgr, cv2.IMWRITE_JPEG_QUALITY, 100)

    assert data.decode(jpeg).shape == (16, 32, 3)
    turned = data.decode(with_exif_orientation(jpeg, 6))
    assert turned.shape == (32, 16, 3)
    np.testing.assert_allclose(turned[:12].mean((0, 1)), [255, 0, 0], atol=4)
    np.testing.assert_allclose(turned[20:].mean((0, 1)), [0, 0, 255], atol=4)


# Errors.


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.jpg", b""),
        ("notes.jpg", b"these are notes, not pixels\n"),
        ("cut.png", data.PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR"),
    ],
)
def test_undecodable_file_names_itself(tmp_path, name, content):
    path = write(tmp_path / name, content)
    with pytest.raises(data.ImageError, match=name):
        data.load_image(path, 8)


def test_missing_file_is_an_image_error(tmp_path):
    with pytest.raises(data.ImageError, match="missing.jpg"):
        data.load_image(tmp_path / "missing.jpg", 8)


# Folder scanning.


def tiny_png(value: int = 0) -> bytes:
    return encode(".png", np.full((4, 4, 3), value, np.uint8))


def make_classes(root: Path, counts: dict[str, int]) -> None:
    for name, count in counts.items():
        for i in range(count):
            write(root / name / f"{i:03d}.png", tiny_png(i))


def test_scan_skips_hidden_and_non_images_and_sorts_classes(tmp_path):
    make_classes(tmp_path, {"motorcycle": 1, "Truck": 1, "Car": 1, "Bus": 1})
    junk = b"not an image"
    write(tmp_path / ".DS_Store", junk)
    write(tmp_path / "notes.txt", junk)
    write(tmp_path / ".ipynb_checkpoints" / "a.png", tiny_png())
    write(tmp_path / "Car" / ".DS_Store", junk)
    write(tmp_path / "Car" / "._x.jpg", junk)
    write(tmp_path / "Car" / "notes.txt", junk)
    write(tmp_path / "Car" / ".ipynb_checkpoints" / "b.png", tiny_png())
    write(tmp_path / "Car" / "UPPER.JPG", tiny_png())
    write(tmp_path / "Car" / "mixed.PnG", tiny_png())

    classes, files, labels = data.scan(tmp_path)
    assert classes == ["Bus", "Car", "Truck", "motorcycle"]
    assert files == [
        "Bus/000.png",
        "Car/000.png",
        "Car/UPPER.JPG",
        "Car/mixed.PnG",
        "Truck/000.png",
        "motorcycle/000.png",
    ]
    assert labels == [0, 1, 1, 1, 2, 3]


def test_empty_class_folder_is_named(tmp_path):
    make_classes(tmp_path, {"Car": 2})
    write(tmp_path / "Bus" / ".DS_Store", b"junk")
    write(tmp_path / "Bus" / "notes.txt", b"junk")
    with pytest.raises(ValueError, match="'Bus' holds no images"):
        data.load_folder_dataset(tmp_path)


def test_root_without_class_folders(tmp_path):
    write(tmp_path / "photo.png", tiny_png())
    with pytest.raises(ValueError, match="no class folders"):
        data.load_folder_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="absent"):
        data.load_folder_dataset(tmp_path / "absent")


def test_folder_dataset_is_split_by_seed(tmp_path):
    make_classes(tmp_path, {"b": 4, "a": 6})
    dataset = data.load_folder_dataset(tmp_path, test_fraction=0.5, seed=3)

    assert dataset.classes == ["a", "b"]
    assert dataset.files[:2] == ["a/000.png", "a/001.png"]
    assert dataset.files[6] == "b/000.png"
    np.testing.assert_array_equal(dataset.labels, [0] * 6 + [1] * 4)
    np.testing.assert_array_equal(np.bincount(dataset.labels[dataset.test]), [3, 2])
    assert all(path.is_file() for path in dataset.paths())


def test_train_and_test_folders_are_used_as_given(tmp_path):
    make_classes(tmp_path / "train", {"b": 2, "a": 3})
    make_classes(tmp_path / "test", {"a": 1, "b": 1})
    dataset = data.load_folder_dataset(tmp_path, test_fraction=0.5, seed=0)

    assert dataset.classes == ["a", "b"]
    assert dataset.files == [
        "train/a/000.png",
        "train/a/001.png",
        "train/a/002.png",
        "train/b/000.png",
        "train/b/001.png",
        "test/a/000.png",
        "test/b/000.png",
    ]
    np.testing.assert_array_equal(dataset.labels, [0, 0, 0, 1, 1, 0, 1])
    np.testing.assert_array_equal(dataset.train, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(dataset.test, [5, 6])

    data.save_split(dataset, tmp_path / "split.json")
    record = json.loads((tmp_path / "split.json").read_text())
    assert record["test"] == ["test/a/000.png", "test/b/000.png"]
    assert len(record["train"]) == 5


def test_test_folder_with_other_classes_is_refused(tmp_path):
    make_classes(tmp_path / "train", {"a": 1, "b": 1})
    make_classes(tmp_path / "test", {"a": 1, "c": 1})
    with pytest.raises(ValueError, match=r"missing \['b'\], extra \['c'\]"):
        data.load_folder_dataset(tmp_path)


# Split.


def vehicle_labels() -> np.ndarray:
    return np.repeat(np.arange(4), [97, 98, 98, 99])


def test_split_holds_out_ten_percent_of_every_class():
    labels = vehicle_labels()
    train, test = data.stratified_split(labels, 0.1, seed=0)

    assert (len(train), len(test)) == (352, 40)
    np.testing.assert_array_equal(np.bincount(labels[test]), [10, 10, 10, 10])
    assert not set(train) & set(test)
    everything = np.sort(np.concatenate([train, test]))
    np.testing.assert_array_equal(everything, np.arange(392))
    np.testing.assert_array_equal(test, np.sort(test))


def test_split_keeps_at_least_one_test_image_per_class():
    labels = [0] * 3 + [1] + [2] * 20
    train, test = data.stratified_split(labels, 0.1, seed=0)
    np.testing.assert_array_equal(np.bincount(np.asarray(labels)[test]), [1, 0, 2])
    assert len(train) + len(test) == 24


def test_split_depends_on_seed_only():
    labels = vehicle_labels()
    first = data.stratified_split(labels, 0.1, seed=7)
    again = data.stratified_split(labels, 0.1, seed=7)
    other = data.stratified_split(labels, 0.1, seed=8)

    np.testing.assert_array_equal(first[1], again[1])
    np.testing.assert_array_equal(first[0], again[0])
    assert not np.array_equal(first[1], other[1])


def test_split_fraction_must_be_a_fraction():
    train, test = data.stratified_split(vehicle_labels(), 0.0, seed=0)
    assert (len(train), len(test)) == (392, 0)
    for fraction in (-0.1, 1.0):
        with pytest.raises(ValueError, match="data.test_fraction.*found"):
            data.stratified_split(vehicle_labels(), fraction, seed=0)


# Resizing and loading.


@pytest.mark.parametrize("shape", [(40, 40), (3, 5), (20, 13)])
def test_resize_shape_and_constant_stays_constant(shape):
    image = np.full((*shape, 3), 77.5, np.float32)
    resized = data.resize(image, 8)
    assert resized.shape == (8, 8, 3)
    np.testing.assert_allclose(resized, 77.5, atol=1e-4)


def test_resize_shrinks_by_averaging():
    blocks = np.array([[10.0, 20.0], [30.0, 40.0]], np.float32)
    image = np.repeat(np.repeat(blocks, 4, 0), 4, 1)[..., None].repeat(3, 2)
    image[0, 0] = 26.0  # One pixel moves its block's mean by 1.
    resized = data.resize(image, 2)
    np.testing.assert_allclose(resized[..., 0], [[11, 20], [30, 40]], atol=1e-4)


def test_load_image_is_float32_square_and_preprocessed(tmp_path):
    bgr = np.zeros((10, 14, 3), np.uint8)
    bgr[:] = (50, 100, 200)
    path = write(tmp_path / "car.png", encode(".png", bgr))

    image = data.load_image(path, 8)
    assert image.dtype == np.float32 and image.shape == (8, 8, 3)
    expected = np.float32([50, 100, 200]) - MEAN_BGR
    np.testing.assert_allclose(image, np.broadcast_to(expected, image.shape), atol=1e-4)
