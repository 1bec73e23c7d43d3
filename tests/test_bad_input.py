"""Bad input gets the right pixels or an error that names the file and the cause.

Photos, weights files and folders are generated here, in pytest's tmp_path.
"""

import ast
import io
import json
import logging
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from tests.images import ALPHA_PIXELS_BGRA, ALPHA_PIXELS_OVER_WHITE, encode, write
from vtl import data, predict, train

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = str(Path(__file__).with_name("tiny_experiment.py"))
# BGR, as OpenCV writes it.
ORANGE_BGR = (40, 120, 200)


def noisy_jpeg(seed: int = 0, shape=(24, 32)) -> bytes:
    bgr = np.random.default_rng(seed).integers(0, 256, (*shape, 3), np.uint8)
    return encode(".jpg", bgr, cv2.IMWRITE_JPEG_QUALITY, 90)


def tiny_png(value: int) -> bytes:
    return encode(".png", np.full((4, 4, 3), value, np.uint8))


# Truncated and oversized files.


@pytest.mark.parametrize("suffix, kind", [(".jpg", "JPEG"), (".png", "PNG")])
def test_half_a_file_is_named_as_truncated(tmp_path, suffix, kind):
    bgr = np.random.default_rng(1).integers(0, 256, (24, 32, 3), np.uint8)
    whole = encode(suffix, bgr)
    path = write(tmp_path / f"half{suffix}", whole[: len(whole) // 2])

    with pytest.raises(data.ImageError) as error:
        data.load_image(path, 8)
    assert str(error.value) == (
        f"{path}: truncated {kind}: its {len(whole) // 2} bytes end before "
        f"{'the end marker' if kind == 'JPEG' else 'the IEND chunk'}; "
        "was a copy or download interrupted?"
    )


def test_jpeg_missing_only_its_end_marker_is_truncated():
    jpeg = noisy_jpeg()
    assert jpeg.endswith(data.JPEG_END)
    with pytest.raises(data.ImageError, match="cut.jpg: truncated JPEG"):
        data.decode(jpeg[:-2], "cut.jpg")


def with_segment(jpeg: bytes, marker: int, payload: bytes) -> bytes:
    """The JPEG with one more segment right after its start marker."""
    segment = bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload
    return jpeg[:2] + segment + jpeg[2:]


def test_thumbnail_end_marker_does_not_hide_a_cut_photo():
    # A complete JPEG inside an application segment, as Exif thumbnails are.
    photo = with_segment(noisy_jpeg(2), 0xEF, noisy_jpeg(3, (8, 8)))
    np.testing.assert_array_equal(data.decode(photo), data.decode(noisy_jpeg(2)))

    with pytest.raises(data.ImageError, match="truncated JPEG"):
        data.decode(photo[: len(photo) - 200], "cut.jpg")


def test_bytes_after_the_end_marker_keep_the_pixels():
    # Motion photos append a video after the JPEG's end marker.
    jpeg = noisy_jpeg(4)
    trailed = jpeg + b"\x00\x00\x00\x18ftypmp42" + bytes(100)
    np.testing.assert_array_equal(data.decode(trailed), data.decode(jpeg))


def test_image_over_opencv_pixel_limit_names_the_limit(tmp_path):
    jpeg = bytearray(encode(".jpg", np.full((8, 8, 3), 100, np.uint8)))
    frame = jpeg.find(b"\xff\xc0")
    struct.pack_into(">HH", jpeg, frame + 5, 40000, 40000)  # 1.6e9 pixels > 2^30.
    path = write(tmp_path / "huge.jpg", bytes(jpeg))

    with pytest.raises(data.ImageError) as error:
        data.load_image(path, 8)
    message = str(error.value)
    assert message.startswith(f"{path}: the image has more pixels than OpenCV decodes")
    assert "CV_IO_MAX_IMAGE_PIXELS" in message


def test_9000_by_6000_jpeg_decodes_in_one_float_copy(tmp_path):
    height, width = 6000, 9000
    bgr = np.empty((height, width, 3), np.uint8)
    bgr[:] = ORANGE_BGR
    jpeg = encode(".jpg", bgr, cv2.IMWRITE_JPEG_QUALITY, 95)
    path = write(tmp_path / "big.jpg", jpeg)
    del bgr, jpeg

    tracemalloc.start()
    try:
        rgb = data.decode(path.read_bytes(), str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # OpenCV's 8-bit BGR (3 bytes a pixel) and one float32 RGB copy (12), no more.
    assert peak < 16 * height * width
    assert rgb.shape == (height, width, 3) and rgb.flags.c_contiguous

    small = data.resize(rgb, 224)
    corner = rgb[0, 0]
    np.testing.assert_allclose(corner, ORANGE_BGR[::-1], atol=2)
    np.testing.assert_allclose(small, np.broadcast_to(corner, small.shape), atol=1e-3)


# Colour kinds that test_data.py does not cover.


def test_cmyk_jpeg_gives_rgb():
    pil_image = pytest.importorskip("PIL.Image")
    # Ink per pixel: (C, M, Y, K). RGB = (255 - ink) * (255 - K) / 255.
    inks = [(0, 100, 200, 50), (0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)]
    cmyk = np.repeat(np.array(inks, np.uint8)[None], 8, 0).repeat(8, 1)
    buffer = io.BytesIO()
    picture = pil_image.frombytes("CMYK", (32, 8), cmyk.tobytes())
    picture.save(buffer, "JPEG", quality=100, subsampling=0)

    decoded = data.decode(buffer.getvalue(), "cmyk.jpg")
    centres = decoded[4, [4, 12, 20, 28]]
    expected = [(205, 124.6, 44.2), (255, 255, 255), (0, 255, 255), (0, 0, 0)]
    np.testing.assert_allclose(centres, expected, atol=3)


def test_16_bit_png_with_alpha_is_composited_by_its_depth():
    bgra = ALPHA_PIXELS_BGRA.astype(np.uint16) * 257
    decoded = data.decode(encode(".png", bgra))

    np.testing.assert_allclose(decoded[0], ALPHA_PIXELS_OVER_WHITE, atol=1e-3)


# Names and folders.


def test_non_ascii_names_load_end_to_end(tmp_path):
    red = np.zeros((6, 6, 3), np.uint8)
    red[..., 2] = 255
    write(tmp_path / "Straßenbahn" / "çar_ü.jpg", encode(".png", red))
    write(tmp_path / "Zug" / "日本.png", tiny_png(10))
    write(tmp_path / "Ärzte" / "a.png", tiny_png(20))

    dataset = data.load_folder_dataset(tmp_path, test_fraction=0.0)
    # Code-point order, as Keras sorts: 'Z' (U+005A) comes before 'Ä' (U+00C4).
    assert dataset.classes == ["Straßenbahn", "Zug", "Ärzte"]
    assert dataset.files == ["Straßenbahn/çar_ü.jpg", "Zug/日本.png", "Ärzte/a.png"]
    first, second, third = (data.load_image(p, 6) for p in dataset.paths())
    np.testing.assert_array_equal(first, data.preprocess(np.float32(red[..., ::-1])))
    np.testing.assert_allclose(second, data.preprocess(np.full((6, 6, 3), 10.0)), 1e-5)
    np.testing.assert_allclose(third, data.preprocess(np.full((6, 6, 3), 20.0)), 1e-5)

    data.save_split(dataset, tmp_path / "split.json")
    record = json.loads((tmp_path / "split.json").read_text())
    assert record["train"] == dataset.files


def test_macosx_folders_are_skipped_like_hidden_ones(tmp_path):
    write(tmp_path / "train" / "Car" / "0.png", tiny_png(0))
    write(tmp_path / "train" / "__MACOSX" / "Car" / "._0.png", b"resource fork")
    write(tmp_path / "test" / "Car" / "0.png", tiny_png(0))
    write(tmp_path / "test" / "__MACOSX" / "Car" / "0.png", tiny_png(0))
    write(tmp_path / "__MACOSX" / "train" / "Car" / "._0.png", b"resource fork")

    dataset = data.load_folder_dataset(tmp_path)
    assert dataset.classes == ["Car"]
    assert dataset.files == ["train/Car/0.png", "test/Car/0.png"]
    found = predict.walk(tmp_path)
    assert found == [tmp_path / "test/Car/0.png", tmp_path / "train/Car/0.png"]


def test_symlinks_are_followed_and_broken_ones_logged(tmp_path, caplog):
    outside = write(tmp_path / "elsewhere" / "photo.png", tiny_png(7))
    root = (tmp_path / "root").resolve()
    write(root / "Car" / "0.png", tiny_png(0))
    (root / "Car" / "linked.png").symlink_to(outside)
    (root / "Car" / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (root / "Car" / "loop.jpg").symlink_to(root / "Car" / "loop.jpg")
    (root / "Bus").symlink_to(outside.parent, target_is_directory=True)
    (root / "Truck").symlink_to(tmp_path / "no such folder")

    with caplog.at_level(logging.WARNING, logger="vtl.data"):
        dataset = data.load_folder_dataset(root, test_fraction=0.0)
    assert dataset.classes == ["Bus", "Car"]
    assert dataset.files == ["Bus/photo.png", "Car/0.png", "Car/linked.png"]
    linked = data.load_image(dataset.paths()[2], 4)
    np.testing.assert_array_equal(linked, data.load_image(outside, 4))

    assert sorted(caplog.messages) == [
        f"{root / 'Car' / 'dangling.jpg'}: skipped, a symbolic link that cannot be "
        "followed (No such file or directory)",
        f"{root / 'Car' / 'loop.jpg'}: skipped, a symbolic link that cannot be "
        "followed (Too many levels of symbolic links)",
        f"{root / 'Truck'}: skipped, a symbolic link that cannot be followed "
        "(No such file or directory)",
    ]


def test_numeric_class_names_sort_as_strings(tmp_path):
    for name in ("2", "10", "9"):
        write(tmp_path / name / "0.png", tiny_png(int(name)))
    dataset = data.load_folder_dataset(tmp_path, test_fraction=0.0)
    assert dataset.classes == ["10", "2", "9"]
    np.testing.assert_array_equal(dataset.labels, [0, 1, 2])
    assert dataset.files == ["10/0.png", "2/0.png", "9/0.png"]


def write_messy_photos(root: Path) -> None:
    """Classes '2' and '10' of shades, with the kinds of clutter photo folders hold."""
    rng = np.random.default_rng(0)
    for name, shade in (("2", 40), ("10", 220)):
        for i in range(4):
            noise = rng.integers(-20, 20, (40, 40, 3))
            image = np.clip(shade + noise, 0, 255).astype(np.uint8)
            write(root / name / f"{i}.png", encode(".png", image))
    light = np.full((40, 40, 3), 220, np.uint8)
    write(root / "10" / "çar_ü.JPG", encode(".jpg", light))
    write(root / "10" / "cut.jpg", noisy_jpeg()[:300])
    write(root / "2" / "notes.jpg", b"not a photo\n")
    write(root / "2" / ".DS_Store", b"\x00\x00\x00\x01Bud1")
    write(root / "__MACOSX" / "2" / "._0.png", b"resource fork")


def test_run_on_messy_folder_stores_classes_and_skips_bad_files(tmp_path):
    root = tmp_path / "photos"
    write_messy_photos(root)
    summary = train.main(
        EXPERIMENT,
        [
            f"data.root={root}",
            f"workdir={tmp_path / 'run'}",
            f"features.dir={tmp_path / 'store'}",
            "train.epochs=2",
        ],
    )

    folder = tmp_path / "run"
    assert json.loads((folder / "classes.json").read_text()) == ["10", "2"]
    assert summary["classes"] == ["10", "2"]
    assert summary["skipped_files"] == ["10/cut.jpg", "2/notes.jpg"]
    split = json.loads((folder / "split.json").read_text())
    assert len(split["train"]) + len(split["test"]) == 11
    assert "10/çar_ü.JPG" in split["train"] + split["test"]
    assert summary["counts"]["train"] + summary["counts"]["test"] == 9


# Weights files through the command line.


def write_small_keras_h5(path: Path) -> Path:
    """A legacy-layout Keras weights file of two layers, as h5py writes it."""
    rng = np.random.default_rng(0)
    layers = {"block1_conv1": (3, 3, 3, 64), "block1_conv2": (3, 3, 64, 64)}
    with h5py.File(path, "w") as file:
        file.attrs["layer_names"] = np.array([n.encode() for n in layers])
        for name, shape in layers.items():
            group = file.create_group(name)
            names = [f"{name}_W_1:0".encode(), f"{name}_b_1:0".encode()]
            group.attrs["weight_names"] = np.array(names)
            group.create_dataset(names[0].decode(), data=rng.normal(size=shape))
            group.create_dataset(names[1].decode(), data=np.zeros(shape[-1]))
    return path


def broken_weights(folder: Path, kind: str) -> Path:
    if kind == "truncated":
        whole = write_small_keras_h5(folder / "whole.h5").read_bytes()
        return write(folder / "truncated.h5", whole[: len(whole) // 2])
    return write(folder / "page.h5", b"<html><body>403 Forbidden</body></html>\n")


@pytest.mark.parametrize(
    "kind, cause, detail",
    [
        # The detail is HDF5's own words, which every h5py release passes on.
        ("truncated", "HDF5 file cannot be read (", "truncated file: eof = "),
        ("text", "not an HDF5 file nor a .keras archive", "expected Keras weights"),
    ],
)
def test_bad_weights_file_is_one_sentence_naming_it(tmp_path, kind, cause, detail):
    root = tmp_path / "photos"
    for name in ("a", "b"):
        for i in range(2):
            write(root / name / f"{i}.png", tiny_png(i))
    weights = broken_weights(tmp_path, kind)

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vtl.train",
            EXPERIMENT,
            f"data.root={root}",
            f"model.weights={weights}",
            f"workdir={tmp_path / 'run'}",
            f"features.dir={tmp_path / 'store'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert f"{weights}: {cause}" in last and detail in last


# Nothing in vtl unpickles.


def vtl_sources() -> dict[str, ast.Module]:
    return {
        path.name: ast.parse(path.read_text(), str(path))
        for path in sorted((ROOT / "vtl").glob("*.py"))
    }


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def test_no_module_of_vtl_unpickles():
    unpicklers = {"pickle", "cPickle", "dill", "joblib", "torch", "cloudpickle"}
    imported, numpy_loads, found = set(), [], []
    for name, tree in vtl_sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
            elif isinstance(node, ast.Call):
                call = dotted(node.func)
                if call in ("np.load", "numpy.load"):
                    numpy_loads.append(name)
                    keywords = {k.arg: k.value for k in node.keywords}
                    allow = keywords.get("allow_pickle", ast.Constant(False))
                    if not (isinstance(allow, ast.Constant) and allow.value is False):
                        found.append(f"{name}:{node.lineno} {call} allow_pickle")
                if call.endswith(("pickle.load", "pickle.loads", "torch.load")):
                    found.append(f"{name}:{node.lineno} {call}")

    assert not imported & unpicklers
    assert found == []
    # The scan sees the feature store's reads, so it is looking at the right code.
    assert "features.py" in numpy_loads
