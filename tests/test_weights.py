"""Keras weight files read onto the Flax VGG: every layout, strictness, conversion.

Files are written here in the layouts Keras uses; the Keras comparisons build models
with `weights=None` and give them seeded random weights.
"""

import hashlib
import shutil
import warnings
import zipfile
from pathlib import Path

import h5py
import jax
import numpy as np
import pytest

from vtl import build, convert, data, model, weights
from vtl import config as configs

SIZE = 32
CLASSES = 10
TOLERANCE = 1e-5
TINY_WIDTH = 1 / 16
# The range of caffe-preprocessed pixels: 0..255 minus the ImageNet means.
PIXEL_RANGE = (-120.0, 150.0)
FC = ("fc1", "fc2", "predictions")


def relative_error(found, reference) -> float:
    """Largest absolute difference over the largest absolute reference value."""
    found = np.asarray(found, np.float64)
    reference = np.asarray(reference, np.float64)
    return float(np.max(np.abs(found - reference)) / np.max(np.abs(reference)))


def applications_name(layer: str, variable: str) -> str:
    """Dataset name in the `keras.applications` downloads: block1_conv1_W_1:0."""
    return f"{layer}_{'W' if variable == 'kernel' else 'b'}_1:0"


def keras2_name(layer: str, variable: str) -> str:
    """Dataset path Keras 2's `save_weights` uses: block1_conv1/kernel:0."""
    return f"{layer}/{variable}:0"


def names_attribute(names: list[str], as_bytes: bool) -> np.ndarray:
    """A list of names the way the file writer stores it: fixed bytes or UTF-8 text."""
    if not as_bytes:
        return np.array(names, dtype=h5py.string_dtype())
    width = max((len(name) for name in names), default=1)
    return np.array([name.encode() for name in names], dtype=f"S{width}")


def write_legacy(
    path: Path,
    layers: list,
    weight_name=applications_name,
    as_bytes: bool = True,
    root: str = "/",
) -> Path:
    """Write `[(layer name, {"kernel": array, "bias": array} or {}), ...]` in the
    legacy layout: attribute `layer_names` on `root` (`/model_weights` in whole-model
    files), one group per layer with its `weight_names`, the datasets under those."""
    with h5py.File(path, "w") as file:
        group = file.require_group(root)
        group.attrs["layer_names"] = names_attribute([n for n, _ in layers], as_bytes)
        group.attrs["backend"] = "tensorflow"
        group.attrs["keras_version"] = "2.2.4"
        for layer, arrays in layers:
            layer_group = group.create_group(layer)
            names = [weight_name(layer, variable) for variable in arrays]
            layer_group.attrs["weight_names"] = names_attribute(names, as_bytes)
            for name, array in zip(names, arrays.values()):
                layer_group.create_dataset(name, data=array)
    return path


def write_keras3(path: Path, layers: list, named: bool = True) -> Path:
    """Write weighted layers in the Keras 3 `.weights.h5` layout: groups named after
    the layer class (`conv2d_3`), arrays under `vars/0` and `vars/1`."""
    counts = {}
    with h5py.File(path, "w") as file:
        for layer, arrays in layers:
            if not arrays:
                continue
            kind = "conv2d" if "_conv" in layer else "dense"
            index = counts[kind] = counts.get(kind, -1) + 1
            key = f"{kind}_{index}" if index else kind
            variables = file.create_group(f"layers/{key}/vars")
            if named:
                variables.attrs["name"] = layer
            for i, array in enumerate(arrays.values()):
                variables.create_dataset(str(i), data=array)
    return path


def keras_layers(keras_model, names=None) -> list:
    """The layers of a Keras model (or those in `names`) with their weights."""
    chosen = [
        layer for layer in keras_model.layers if names is None or layer.name in names
    ]
    return [
        (layer.name, {w.name: np.asarray(w.numpy()) for w in layer.weights})
        for layer in chosen
    ]


def flax_layers(arch: str, params: dict) -> list:
    """Every layer of `arch`, input first, with the arrays of a Flax params tree in
    Keras's order (kernel, then bias; Flax sorts them the other way)."""
    names = ["input_1"] + model.layer_names(arch)
    return [
        (
            name,
            {key: params[name][key] for key in ("kernel", "bias")}
            if name in params
            else {},
        )
        for name in names
    ]


def randomise(keras_layer, rng: np.random.Generator) -> None:
    """He-scaled kernel and biases in [-1, 1], so that a lost or swapped bias shows."""
    kernel, bias = keras_layer.get_weights()
    std = np.sqrt(2.0 / np.prod(kernel.shape[:-1]))
    keras_layer.set_weights(
        [
            rng.normal(0.0, std, kernel.shape).astype(np.float32),
            rng.uniform(-1.0, 1.0, bias.shape).astype(np.float32),
        ]
    )


def import_keras():
    pytest.importorskip("tensorflow")
    return pytest.importorskip("keras")


def keras_vgg_model(keras, arch: str, top: bool, size: int, classes: int, seed: int):
    """A `keras.applications` VGG with seeded random weights and logits out."""
    build_fn = {"vgg16": keras.applications.VGG16, "vgg19": keras.applications.VGG19}
    net = build_fn[arch](
        weights=None,
        include_top=top,
        input_shape=(size, size, 3),
        classes=classes,
        classifier_activation=None,
    )
    return randomise_all(net, seed)


def keras_narrow_vgg(keras, arch: str, top: bool, seed: int):
    """The network `keras.applications` builds for `arch`, layer for layer and name
    for name, with every width divided by 16, and seeded random weights."""
    depths = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}[arch]
    x = inputs = keras.Input((SIZE, SIZE, 3))
    for block, (depth, width) in enumerate(zip(depths, (64, 128, 256, 512, 512)), 1):
        for i in range(1, depth + 1):
            x = keras.layers.Conv2D(
                width // 16,
                (3, 3),
                activation="relu",
                padding="same",
                name=f"block{block}_conv{i}",
            )(x)
        x = keras.layers.MaxPooling2D(
            (2, 2), strides=(2, 2), name=f"block{block}_pool"
        )(x)
    if top:
        x = keras.layers.Flatten(name="flatten")(x)
        x = keras.layers.Dense(4096 // 16, activation="relu", name="fc1")(x)
        x = keras.layers.Dense(4096 // 16, activation="relu", name="fc2")(x)
        x = keras.layers.Dense(CLASSES, name="predictions")(x)
    return randomise_all(keras.Model(inputs, x, name=arch), seed)


def randomise_all(net, seed: int):
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        if layer.weights:
            randomise(layer, rng)
    return net


def layer_outputs(keras, net, names: list[str], image: np.ndarray) -> dict:
    """The output of every named layer of a Keras model."""
    probe = keras.Model(net.input, [net.get_layer(name).output for name in names])
    return dict(zip(names, (np.asarray(y) for y in probe(image, training=False))))


def largest_error(found: dict, expected: dict) -> tuple[str, float]:
    """The layer with the largest relative error, and that error."""
    errors = {name: relative_error(found[name], ref) for name, ref in expected.items()}
    worst = max(errors, key=errors.get)
    return worst, errors[worst]


def random_image(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(*PIXEL_RANGE, (2, size, size, 3)).astype(np.float32)


def init_shapes(vgg: model.VGG, image_shape: tuple) -> dict:
    image = jax.ShapeDtypeStruct(image_shape, np.float32)
    return jax.eval_shape(vgg.init, jax.random.key(0), image)["params"]


def random_file_weights(arch: str, width: float = TINY_WIDTH, seed: int = 0) -> dict:
    """Numpy params of every layer of a narrow `arch`, as a weight file would hold."""
    vgg = model.VGG(arch, width, CLASSES)
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: rng.normal(size=s.shape).astype(np.float32),
        init_shapes(vgg, (1, SIZE, SIZE, 3)),
    )


def assert_same_layers(layers: dict, expected: dict, what: str) -> None:
    """Same layer names, and every array bit for bit the same."""
    assert sorted(layers) == sorted(expected), what
    for name, arrays in expected.items():
        assert len(layers[name]) == len(arrays), f"{what} {name}"
        for found, array in zip(layers[name], arrays):
            assert found.shape == array.shape, f"{what} {name}"
            assert np.array_equal(found, array), f"{what} {name}"


@pytest.fixture
def scratch(tmp_path):
    """A folder emptied after the test: full-width files are tens of megabytes."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


# keras.applications at full width, 32x32: every layer, and the narrow twin below.


@pytest.mark.keras
@pytest.mark.parametrize("arch", ["vgg16", "vgg19"])
def test_applications_vgg_matches_keras_at_every_layer(arch, scratch):
    keras = import_keras()
    net = keras_vgg_model(keras, arch, True, SIZE, CLASSES, seed=1)
    names = model.layer_names(arch)
    image = random_image(SIZE, seed=2)
    expected = layer_outputs(keras, net, names, image)

    path = write_legacy(scratch / "legacy.h5", keras_layers(net))
    vgg = model.VGG(arch, 1.0, CLASSES, capture=tuple(names))
    params, fresh = weights.assign(
        init_shapes(vgg, image.shape), weights.read_keras_h5(path), arch, str(path)
    )
    assert fresh == []
    worst, error = largest_error(
        jax.jit(vgg.apply)({"params": params}, image), expected
    )
    print(
        f"{arch} keras.applications 32x32: largest relative error {error:.2e} ({worst})"
    )
    assert error <= TOLERANCE, worst
    # Logits far from zero: the comparison is not between two near-zero arrays.
    assert np.max(np.abs(expected["predictions"])) > 1.0

    # The narrow network the layout tests use is this one, layer for layer.
    narrow = keras_narrow_vgg(keras, arch, True, seed=1)
    # (The input layers differ only in the name Keras numbers them with.)
    assert [layer_signature(x) for x in narrow.layers[1:]] == [
        layer_signature(x) for x in net.layers[1:]
    ]


def layer_signature(layer) -> tuple:
    """A Keras layer's name, class and settings, without its width."""
    config = layer.get_config()
    settings = ("kernel_size", "strides", "padding", "activation", "pool_size")
    return (layer.name, type(layer).__name__, [config.get(key) for key in settings])


# Every layout Keras writes, for VGG16 and VGG19 with and without the top, narrow.


@pytest.fixture(
    scope="module",
    params=[("vgg16", True), ("vgg16", False), ("vgg19", True), ("vgg19", False)],
    ids=["vgg16", "vgg16-notop", "vgg19", "vgg19-notop"],
)
def keras_vgg(request):
    """A seeded random narrow Keras VGG, its output at every layer, a Flax twin."""
    keras = import_keras()
    arch, top = request.param
    net = keras_narrow_vgg(keras, arch, top, seed=1)
    names = model.layer_range(arch, None, "predictions" if top else "block5_pool")
    image = random_image(SIZE, seed=2)
    vgg = model.VGG(arch, TINY_WIDTH, CLASSES, stop=names[-1], capture=tuple(names))
    return {
        "arch": arch,
        "top": top,
        "keras": net,
        "image": image,
        "outputs": layer_outputs(keras, net, names, image),
        "shapes": init_shapes(vgg, image.shape),
        "apply": jax.jit(vgg.apply),
        "weights": {n: list(a.values()) for n, a in keras_layers(net) if a},
    }


def save_quietly(net, path: Path, **options) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras calls .h5 models legacy; they are.
        net.save(path, **options)
    return path


def keras3_legacy_writer(net, folder: Path) -> Path:
    """Keras 3's own writer of the legacy layout (`<layer>/<layer>/kernel`)."""
    legacy = pytest.importorskip("keras.src.legacy.saving.legacy_h5_format")
    path = folder / "keras3_legacy.h5"
    with h5py.File(path, "w") as file:
        legacy.save_weights_to_hdf5_group(file, net)
    return path


def unnamed_weights_h5(net, folder: Path, group: str = "layers") -> Path:
    """A `.weights.h5` without layer names, as earlier Keras 3 releases wrote, with
    the layers under `group` (`_layer_checkpoint_dependencies` in tf.keras 2.13)."""
    path = folder / "unnamed.weights.h5"
    net.save_weights(path)
    with h5py.File(path, "a") as file:
        groups = []
        file.visititems(lambda _, node: groups.append(node))
        for node in groups:
            node.attrs.pop("name", None)
        assert not any("name" in node.attrs for node in groups)
        if group != "layers":
            file.move("layers", group)
    return path


def keras3_weights_h5(net, folder: Path) -> Path:
    net.save_weights(folder / "m.weights.h5")
    return folder / "m.weights.h5"


def converted_folder(net, folder: Path) -> Path:
    source = write_legacy(folder / "c.h5", keras_layers(net))
    convert.convert(source, folder / "converted")
    source.unlink()
    return folder / "converted"


LAYOUTS = {
    # The keras.applications downloads: <layer>/<layer>_W_1:0, names as bytes.
    "applications": lambda net, d: write_legacy(d / "a.h5", keras_layers(net)),
    # Keras 2 save_weights: <layer>/<layer>/kernel:0.
    "keras2 save_weights": lambda net, d: write_legacy(
        d / "k2.h5", keras_layers(net), keras2_name
    ),
    "keras2 whole model": lambda net, d: write_legacy(
        d / "k2m.h5", keras_layers(net), keras2_name, root="model_weights"
    ),
    "keras3 legacy writer": keras3_legacy_writer,
    "keras3 whole model .h5": lambda net, d: save_quietly(net, d / "m.h5"),
    "keras3 .weights.h5": keras3_weights_h5,
    "unnamed .weights.h5": unnamed_weights_h5,
    "tf.keras 2.13 .weights.h5": lambda net, d: unnamed_weights_h5(
        net, d, "_layer_checkpoint_dependencies"
    ),
    ".keras archive": lambda net, d: save_quietly(net, d / "m.keras"),
    ".keras unzipped folder": lambda net, d: save_quietly(
        net, d / "unzipped", zipped=False
    ),
    "vtl.convert folder": converted_folder,
}


def layout_layers(layout: str, net, folder: Path, arch: str) -> dict:
    """Write `net` in `layout` and read it back the way a run does."""
    if layout == "live keras.Model":
        return weights.layers_from_keras_model(net)
    path = LAYOUTS[layout](net, folder)
    layers, _ = convert.read_source(path, arch)
    return layers


@pytest.mark.keras
@pytest.mark.parametrize("layout", [*LAYOUTS, "live keras.Model"])
def test_every_layout_computes_what_keras_computes(keras_vgg, layout, scratch):
    arch, net = keras_vgg["arch"], keras_vgg["keras"]
    layers = layout_layers(layout, net, scratch, arch)

    expected = model.weighted_layers(arch)[: -3 if not keras_vgg["top"] else None]
    assert sorted(keras_vgg["weights"]) == sorted(expected)
    assert_same_layers(layers, keras_vgg["weights"], layout)

    params, fresh = weights.assign(keras_vgg["shapes"], layers, arch, layout)
    assert fresh == []
    outputs = keras_vgg["apply"]({"params": params}, keras_vgg["image"])
    worst, error = largest_error(outputs, keras_vgg["outputs"])
    top = "" if keras_vgg["top"] else " notop"
    print(f"{arch}{top} {layout}: largest relative error {error:.2e} ({worst})")
    assert error <= TOLERANCE, worst
    last = keras_vgg["outputs"][list(keras_vgg["outputs"])[-1]]
    assert np.max(np.abs(last)) > 1.0


@pytest.mark.keras
def test_vgg_nested_in_a_keras_model_gives_its_layers(scratch):
    keras = import_keras()
    base = keras_narrow_vgg(keras, "vgg16", False, seed=3)
    net = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            base,
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    expected = {n: list(a.values()) for n, a in keras_layers(base) if a}
    head = net.layers[-1]
    expected[head.name] = [np.asarray(w.numpy()) for w in head.weights]

    net.save_weights(scratch / "nested.weights.h5")
    sources = {
        "whole model .h5": weights.read_keras_h5(save_quietly(net, scratch / "n.h5")),
        ".weights.h5": weights.read_keras_h5(scratch / "nested.weights.h5"),
        "live": weights.layers_from_keras_model(net),
    }
    for what, layers in sources.items():
        assert_same_layers(layers, expected, what)

    trunk = model.VGG("vgg16", TINY_WIDTH, stop="block5_pool")
    with pytest.raises(ValueError) as error:
        weights.assign(init_shapes(trunk, (1, SIZE, SIZE, 3)), layers, "vgg16", "n")
    # The head is not a VGG layer: strict reading names it with its shapes.
    assert f"{head.name}: not a layer of vgg16" in str(error.value)
    assert "[(32, 3), (3,)]" in str(error.value)
    assert "block1_conv1" not in str(error.value)


@pytest.mark.keras
def test_fc1_rows_follow_keras_flatten_order(tmp_path):
    keras = import_keras()
    net = keras.applications.VGG16(
        weights=None,
        include_top=True,
        classes=CLASSES,
        input_shape=(64, 64, 3),
        classifier_activation=None,
    )
    randomise(net.get_layer("fc1"), np.random.default_rng(2))
    path = write_legacy(tmp_path / "fc1.h5", keras_layers(net, ("flatten", "fc1")))
    kernel, bias = net.get_layer("fc1").get_weights()

    # block5_pool is 2x2x512 at 64x64; a one-hot feature selects one row of fc1.
    h, w, c = 1, 0, 7
    features = np.zeros((1, 2, 2, 512), np.float32)
    features[0, h, w, c] = 1.0
    vgg = model.VGG("vgg16", 1.0, CLASSES, start="flatten", stop="fc1")
    params, _ = weights.assign(
        init_shapes(vgg, features.shape),
        weights.read_keras_h5(path),
        "vgg16",
        str(path),
    )
    found = np.asarray(vgg.apply({"params": params}, features))[0]

    row = (h * 2 + w) * 512 + c
    np.testing.assert_allclose(found, np.maximum(kernel[row] + bias, 0.0), rtol=1e-6)
    expected = net.get_layer("fc1")(net.get_layer("flatten")(features))
    np.testing.assert_allclose(found, np.asarray(expected)[0], rtol=1e-6, atol=1e-6)
    channels_first_row = c * 4 + h * 2 + w
    assert not np.allclose(found, np.maximum(kernel[channels_first_row] + bias, 0.0))


@pytest.mark.keras
def test_real_vgg16_trunk_matches_keras(vgg16_notop, vehicles):
    keras = import_keras()
    image_path = sorted((vehicles / "Car").glob("*.jpg"))[0]
    image = data.load_image(image_path, 224)[None]
    net = keras.applications.VGG16(
        weights=str(vgg16_notop), include_top=False, input_shape=(224, 224, 3)
    )
    expected = np.asarray(net(image, training=False))

    trunk = model.VGG("vgg16", 1.0, stop="block5_pool")
    layers = weights.read_keras_h5(vgg16_notop)
    params, _ = weights.assign(
        init_shapes(trunk, image.shape), layers, "vgg16", str(vgg16_notop)
    )
    found = jax.jit(trunk.apply)({"params": params}, image)

    error = relative_error(found, expected)
    print(f"vgg16 ImageNet block5_pool, {image_path.name}: relative error {error:.2e}")
    assert error <= TOLERANCE
    assert expected.shape == (1, 7, 7, 512) and np.max(expected) > 1.0


# Full size: 224x224, 1000 classes, every layer and the top-5 classes.


@pytest.mark.slow
@pytest.mark.keras
@pytest.mark.parametrize("arch", ["vgg16", "vgg19"])
def test_full_size_every_layer_and_top5_match_keras(arch, scratch):
    keras = import_keras()
    net = keras_vgg_model(keras, arch, True, 224, 1000, seed=4)
    names = model.layer_names(arch)
    image = random_image(224, seed=5)
    expected = layer_outputs(keras, net, names, image)

    # Through the file users download: the keras.applications layout.
    path = write_legacy(scratch / f"{arch}.h5", keras_layers(net))
    del net
    layers = weights.read_keras_h5(path)
    vgg = model.VGG(arch, 1.0, 1000, capture=tuple(names))
    params, fresh = weights.assign(init_shapes(vgg, image.shape), layers, arch, "full")
    assert fresh == []
    found = jax.jit(vgg.apply)({"params": params}, image)

    worst, error = largest_error(found, expected)
    print(f"{arch} 224x224: largest relative error {error:.2e} ({worst})")
    assert error <= TOLERANCE, worst

    # Keras's decode_predictions would name these classes; its index file needs a
    # download, so the indices themselves are compared.
    logits, reference = np.asarray(found["predictions"]), expected["predictions"]
    top5 = np.argsort(-logits, axis=1)[:, :5]
    np.testing.assert_array_equal(top5, np.argsort(-reference, axis=1)[:, :5])
    gaps = -np.diff(np.sort(reference, axis=1)[:, ::-1][:, :6], axis=1)
    print(f"{arch} top-5 {top5.tolist()}, smallest logit gap {gaps.min():.3g}")


# Strictness, on narrow networks written from Flax shapes; no TensorFlow needed.


def test_names_as_bytes_or_text_read_alike(tmp_path):
    params = random_file_weights("vgg19")
    layers = flax_layers("vgg19", params)
    as_bytes = weights.read_keras_h5(write_legacy(tmp_path / "b.h5", layers))
    as_text = weights.read_keras_h5(
        write_legacy(tmp_path / "t.h5", layers, as_bytes=False)
    )
    with h5py.File(tmp_path / "t.h5") as file:
        assert isinstance(file.attrs["layer_names"][0], str)

    assert sorted(as_bytes) == sorted(as_text) == sorted(params)
    for name, (kernel, bias) in as_text.items():
        assert np.array_equal(kernel, params[name]["kernel"])
        assert np.array_equal(bias, params[name]["bias"])
        assert all(np.array_equal(a, b) for a, b in zip(as_bytes[name], (kernel, bias)))


@pytest.mark.parametrize("file_arch, arch", [("vgg16", "vgg19"), ("vgg19", "vgg16")])
def test_other_vgg_is_refused(tmp_path, file_arch, arch):
    path = write_legacy(
        tmp_path / f"{file_arch}.h5",
        flax_layers(file_arch, random_file_weights(file_arch)),
    )
    layers = weights.read_keras_h5(path)
    # Even a trunk that only needs the first two blocks refuses the wrong file.
    trunk = model.VGG(arch, TINY_WIDTH, stop="block2_pool")

    with pytest.raises(ValueError) as error:
        weights.assign(init_shapes(trunk, (1, SIZE, SIZE, 3)), layers, arch, str(path))
    message = str(error.value)
    assert str(path) in message
    assert f"expected {arch.upper()}" in message
    assert f"a {file_arch.upper()} file" in message
    assert f"model.name={file_arch}" in message
    assert f"set model.weights to a {arch.upper()} file" in message


@pytest.mark.parametrize(
    "arch, dropped", [("vgg16", "block3_conv2"), ("vgg19", "block4_conv4")]
)
def test_missing_conv_layer_is_named(tmp_path, arch, dropped):
    params = random_file_weights(arch)
    layers = [(n, a) for n, a in flax_layers(arch, params) if n != dropped]
    path = write_legacy(tmp_path / "missing.h5", layers)

    with pytest.raises(ValueError, match=f"{dropped}: missing from the file") as error:
        weights.assign(params, weights.read_keras_h5(path), arch, str(path))
    assert str(path) in str(error.value)
    assert "VGG16 file" not in str(error.value)


def test_misshaped_layer_names_both_shapes(tmp_path):
    params = random_file_weights("vgg16")
    wrong = dict(
        params,
        block2_conv1={
            "kernel": np.zeros((3, 3, 4, 9), np.float32),
            "bias": np.zeros(9, np.float32),
        },
    )
    path = write_legacy(tmp_path / "wrong.h5", flax_layers("vgg16", wrong))

    with pytest.raises(ValueError) as error:
        weights.assign(params, weights.read_keras_h5(path), "vgg16", str(path))
    message = str(error.value)
    assert str(path) in message and "block2_conv1" in message
    assert "[(3, 3, 4, 8), (8,)]" in message and "[(3, 3, 4, 9), (9,)]" in message
    assert "block1_conv1" not in message


def test_fc_layers_may_be_fresh_when_the_file_has_none(tmp_path):
    params = random_file_weights("vgg16")
    notop = [
        (n, a)
        for n, a in flax_layers("vgg16", params)
        if n not in ("fc1", "fc2", "predictions")
    ]
    layers = weights.read_keras_h5(write_legacy(tmp_path / "notop.h5", notop))
    tail = {name: params[name] for name in ("fc1", "fc2", "predictions")}

    loaded, fresh = weights.assign(
        tail,
        layers,
        "vgg16",
        "notop.h5",
        replace=("predictions",),
        optional=("fc1", "fc2"),
    )
    assert fresh == ["fc1", "fc2", "predictions"]
    assert loaded["fc1"] is tail["fc1"]
    with pytest.raises(ValueError, match="fc1: missing from the file"):
        weights.assign(tail, layers, "vgg16", "notop.h5", replace=("predictions",))


def test_loaded_arrays_take_the_params_dtype(tmp_path):
    params = random_file_weights("vgg16")
    as_double = jax.tree.map(lambda a: a.astype(np.float64), params)
    path = write_legacy(tmp_path / "double.h5", flax_layers("vgg16", as_double))

    loaded, _ = weights.assign(params, weights.read_keras_h5(path), "vgg16", str(path))
    assert {leaf.dtype for leaf in jax.tree.leaves(loaded)} == {np.dtype(np.float32)}


def test_text_file_is_refused_by_name(tmp_path):
    path = tmp_path / "vgg16_weights.h5"
    path.write_text("<html>403 Forbidden</html>\n")
    with pytest.raises(ValueError, match="not an HDF5 file") as error:
        weights.read_keras_h5(path)
    assert str(path) in str(error.value)


def test_hdf5_without_keras_weights_is_refused(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("x", data=np.zeros(3))
    with pytest.raises(ValueError, match="holds no Keras weights") as error:
        weights.read_keras_h5(path)
    assert str(path) in str(error.value)


def test_listed_layer_without_group_is_named(tmp_path):
    path = write_legacy(
        tmp_path / "broken.h5", flax_layers("vgg16", random_file_weights("vgg16"))
    )
    with h5py.File(path, "a") as file:
        del file["block5_conv3"]
    with pytest.raises(ValueError, match="layer block5_conv3 is listed") as error:
        weights.read_keras_h5(path)
    assert str(path) in str(error.value)


def test_absent_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.h5"):
        weights.read_keras_h5(tmp_path / "nothing.h5")


def test_unexpected_layer_is_named_with_its_shapes(tmp_path):
    params = random_file_weights("vgg16")
    extra = {"kernel": np.zeros((8, 5), np.float32), "bias": np.zeros(5, np.float32)}
    layers = flax_layers("vgg16", params) + [("dense_7", extra)]
    layers = [(n, a) for n, a in layers if n != "block1_conv2"]
    path = write_legacy(tmp_path / "extra.h5", layers)

    with pytest.raises(ValueError) as error:
        weights.assign(params, weights.read_keras_h5(path), "vgg16", str(path))
    message = str(error.value)
    assert "dense_7: not a layer of vgg16; the file holds it with shapes " in message
    assert "[(8, 5), (5,)]" in message
    # Every problem in one message, not only the first.
    assert "block1_conv2: missing from the file" in message


def test_layer_names_split_over_several_attributes_read_whole(tmp_path):
    params = random_file_weights("vgg16")
    layers = flax_layers("vgg16", params)
    path = write_legacy(tmp_path / "chunked.h5", layers)
    # Keras splits attributes longer than an HDF5 header into name0, name1, ...
    with h5py.File(path, "a") as file:
        names = file.attrs.pop("layer_names")
        file.attrs["layer_names0"] = names[:7]
        file.attrs["layer_names1"] = names[7:]

    assert_same_layers(
        weights.read_keras_h5(path),
        {n: [params[n]["kernel"], params[n]["bias"]] for n in params},
        "chunked",
    )


@pytest.mark.parametrize("named", [True, False], ids=["named", "by-position"])
@pytest.mark.parametrize("arch", ["vgg16", "vgg19"])
def test_keras3_layout_reads_by_name_or_position(tmp_path, arch, named):
    params = random_file_weights(arch)
    layers = flax_layers(arch, params)
    path = write_keras3(tmp_path / "m.weights.h5", layers, named=named)

    expected = {n: [params[n]["kernel"], params[n]["bias"]] for n in params}
    assert_same_layers(weights.read_keras_h5(path), expected, "keras3")
    with h5py.File(path) as file:
        # h5py lists conv2d_10 before conv2d_2; the reader must not take that order.
        assert list(file["layers"])[:3] == ["conv2d", "conv2d_1", "conv2d_10"]


def test_unnamed_keras3_file_of_another_model_is_refused(tmp_path):
    params = random_file_weights("vgg16")
    layers = flax_layers("vgg16", params)[:6]  # blocks 1 and 2: four conv layers
    path = write_keras3(tmp_path / "small.weights.h5", layers, named=False)

    with pytest.raises(ValueError) as error:
        weights.read_keras_h5(path)
    message = str(error.value)
    assert str(path) in message and "does not name its layers" in message
    assert "found 4 conv2d, 0 dense" in message
    assert "layers_from_keras_model" in message


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_keras_archive_reads_its_weights_file(tmp_path, compression):
    params = random_file_weights("vgg19")
    inner = write_keras3(tmp_path / "inner.h5", flax_layers("vgg19", params))
    path = tmp_path / "model.keras"
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("metadata.json", '{"keras_version": "3.5.0"}')
        archive.writestr("config.json", "{}")
        archive.write(inner, "model.weights.h5")

    expected = {n: [params[n]["kernel"], params[n]["bias"]] for n in params}
    assert_same_layers(weights.read_keras_file(path), expected, "archive")


def test_zip_without_weights_is_refused(tmp_path):
    path = tmp_path / "photos.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("cat.jpg", b"\xff\xd8")
    with pytest.raises(ValueError) as error:
        weights.read_keras_file(path)
    assert str(path) in str(error.value)
    assert "without model.weights.h5" in str(error.value)
    assert "cat.jpg" in str(error.value)


class FakeLayer:
    """What `layers_from_keras_model` uses of a Keras layer: a name and weights."""

    def __init__(self, name, arrays=()):
        self.name, self.arrays = name, list(arrays)

    def get_weights(self):
        return self.arrays


class FakeModel(FakeLayer):
    def __init__(self, name, layers):
        super().__init__(name)
        self.layers = layers


def test_live_model_layers_without_importing_keras():
    params = random_file_weights("vgg16")
    convs = [
        FakeLayer(n, [params[n]["kernel"], params[n]["bias"]])
        for n in model.weighted_layers("vgg16", stop="block5_pool")
    ]
    base = FakeModel("vgg16", [FakeLayer("input_1")] + convs + [FakeLayer("flatten")])
    head = FakeLayer("dense", [np.ones((4, 2), np.float32), np.zeros(2, np.float32)])
    net = FakeModel("sequential", [base, head])

    layers = weights.layers_from_keras_model(net)
    assert list(layers) == [c.name for c in convs] + ["dense"]
    for conv in convs:
        assert all(np.array_equal(a, b) for a, b in zip(layers[conv.name], conv.arrays))
    assert np.array_equal(layers["dense"][0], head.arrays[0])

    twice = FakeModel("twice", [base, FakeLayer("block1_conv1", convs[0].arrays)])
    with pytest.raises(ValueError, match="two layers are named block1_conv1"):
        weights.layers_from_keras_model(twice)


# vtl.convert: a Keras file once into an orbax checkpoint.


def narrow_file(tmp_path: Path, arch: str, top: bool = True, name: str = "") -> Path:
    params = random_file_weights(arch)
    layers = [(n, a) for n, a in flax_layers(arch, params) if top or n not in FC]
    return write_legacy(tmp_path / (name or f"{arch}.h5"), layers)


@pytest.mark.parametrize("top", [True, False], ids=["top", "notop"])
def test_convert_round_trip_records_the_source(tmp_path, capsys, top):
    source = narrow_file(tmp_path, "vgg19", top)
    out = tmp_path / "converted"
    assert convert.main([str(source), str(out)]) == 0
    assert "vgg19" in capsys.readouterr().out

    layers, record = convert.read_converted(out)
    assert_same_layers(layers, weights.read_keras_h5(source), "converted")
    assert record["architecture"] == "vgg19"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert record["source"] == {"file": source.name, "sha256": digest}
    assert record["absent"] == ([] if top else list(FC))
    assert record["layers"]["block4_conv4"] == [[3, 3, 32, 32], [32]]
    assert convert.read_source(out, "vgg19")[1] == digest

    # A second conversion replaces the first.
    other = narrow_file(tmp_path, "vgg19", top, name="other.h5")
    with h5py.File(other, "a") as file:
        file["block1_conv1/block1_conv1_b_1:0"][0] = 7.0
    assert convert.main([str(other), str(out)]) == 0
    assert convert.read_converted(out)[0]["block1_conv1"][1][0] == 7.0


def test_convert_refuses_to_overwrite_other_folders(tmp_path, capsys):
    source = narrow_file(tmp_path, "vgg16")
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")

    assert convert.main([str(source), str(out)]) == 1
    assert f"{out}: exists and is not a folder written by vtl.convert" in (
        capsys.readouterr().err
    )
    assert (out / "notes.txt").read_text() == "keep me"


def test_convert_refuses_the_other_vgg_and_asks_when_unclear(tmp_path, capsys):
    source = narrow_file(tmp_path, "vgg16")
    assert convert.main([str(source), str(tmp_path / "o"), "--arch", "vgg19"]) == 1
    message = capsys.readouterr().err
    assert "expected VGG19 weights, found a VGG16 file; pass --arch vgg16" in message
    assert not (tmp_path / "o").exists()

    params = random_file_weights("vgg16")
    early = [(n, a) for n, a in flax_layers("vgg16", params) if n.startswith("block1")]
    path = write_legacy(tmp_path / "early.h5", early)
    assert convert.main([str(path), str(tmp_path / "o")]) == 1
    assert "cannot tell VGG16 from VGG19" in capsys.readouterr().err

    assert convert.main([str(path), str(tmp_path / "o"), "--arch", "vgg16"]) == 1
    message = capsys.readouterr().err
    assert "block2_conv1: missing from the file" in message
    assert "block5_conv3: missing from the file" in message


def test_convert_names_every_bad_layer(tmp_path):
    params = random_file_weights("vgg16")
    bad_bias = {"kernel": params["fc2"]["kernel"], "bias": np.zeros(3, np.float32)}
    extra = {"kernel": np.zeros((8, 5), np.float32), "bias": np.zeros(5, np.float32)}
    layers = [
        (n, bad_bias if n == "fc2" else a)
        for n, a in flax_layers("vgg16", params)
        if n != "block3_conv1"
    ] + [("dense", extra)]
    path = write_legacy(tmp_path / "bad.h5", layers)

    with pytest.raises(ValueError) as error:
        convert.convert(path, tmp_path / "out")
    message = str(error.value)
    assert "dense: not a layer of vgg16" in message
    assert "block3_conv1: missing from the file" in message
    assert "fc2: expected a rank-2 kernel and a bias of its last dimension, " in message
    assert "[(256, 256), (3,)]" in message


def test_converted_folder_is_checked_against_its_record(tmp_path):
    out = tmp_path / "converted"
    convert.convert(narrow_file(tmp_path, "vgg16"), out)

    with pytest.raises(ValueError) as error:
        convert.read_source(out, "vgg19")
    assert "expected VGG19 weights, found a conversion of VGG16" in str(error.value)
    assert "model.name=vgg16" in str(error.value)

    record = (out / convert.RECORD).read_text()
    (out / convert.RECORD).write_text(record.replace('"block1_conv1"', '"block1_x"'))
    with pytest.raises(ValueError, match="does not hold the layers"):
        convert.read_source(out, "vgg16")

    (out / convert.RECORD).unlink()
    with pytest.raises(ValueError, match="a folder without vtl_weights.json"):
        convert.read_source(out, "vgg16")


# What a run builds from model.weights.


def tiny_config(weights_source: str, **model_fields):
    config = configs.defaults()
    config.model.name = "vgg16"
    config.model.weights = weights_source
    config.model.width = TINY_WIDTH
    config.data.image_size = SIZE
    config.model.update(model_fields)
    return config


def test_converted_folder_builds_what_its_file_builds(tmp_path):
    source = narrow_file(tmp_path, "vgg16", top=False)
    out = tmp_path / "converted"
    convert.convert(source, out)

    from_file = build.split_network(tiny_config(str(source)), 3)
    from_folder = build.split_network(tiny_config(str(out)), 3)
    # Same key: the run with the folder reuses the feature store of the file's run.
    assert from_file.weights_key == from_folder.weights_key
    assert (
        from_file.weights_key["sha256"]
        == hashlib.sha256(source.read_bytes()).hexdigest()
    )
    assert from_file.fresh_layers == from_folder.fresh_layers == list(FC)
    for name, leaves in from_file.trunk_params.items():
        for key, array in leaves.items():
            assert np.array_equal(array, from_folder.trunk_params[name][key]), name


@pytest.mark.parametrize("fields", [{"fc_weights": "file"}, {"cut": "fc1"}])
def test_notop_file_where_fc_must_load_says_what_to_do(tmp_path, fields):
    source = narrow_file(tmp_path, "vgg16", top=False)
    with pytest.raises(ValueError) as error:
        build.split_network(tiny_config(str(source), **fields), 3)
    message = str(error.value)
    assert str(source) in message and "fc1: missing from the file" in message
    assert "Use the full weights file (the name without _notop)" in message
    assert "set model.fc_weights=auto or fresh" in message


def test_missing_weights_path_names_the_field(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        build.split_network(tiny_config(str(tmp_path / "gone.h5")), 3)
    assert f"model.weights: {tmp_path / 'gone.h5'} does not exist" in str(error.value)


# Finding the ImageNet files without a network.


@pytest.fixture
def empty_folders(tmp_path, monkeypatch):
    ours, keras_home = tmp_path / "weights", tmp_path / "keras"
    ours.mkdir()
    keras_home.mkdir()
    monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(ours))
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    monkeypatch.setenv(weights.OFFLINE_ENV, "1")
    return ours, keras_home


def test_offline_absent_file_says_what_and_how(empty_folders):
    ours, keras_home = empty_folders
    name = "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"

    with pytest.raises(FileNotFoundError) as error:
        weights.find_imagenet_file("vgg19", need_top=False)
    message = str(error.value)
    assert name in message
    assert str(ours) in message and str(keras_home / "models") in message
    assert f"{weights.KERAS_ORIGIN}/vgg19/{name}" in message
    assert "$VTL_WEIGHTS_DIR" in message and "model.weights" in message
    assert "VTL_OFFLINE" in message

    with pytest.raises(FileNotFoundError) as error:
        weights.find_imagenet_file("vgg19", need_top=True)
    assert "_notop" not in str(error.value)
    assert "vgg19_weights_tf_dim_ordering_tf_kernels.h5" in str(error.value)


def test_file_in_weights_dir_is_found(empty_folders):
    ours, keras_home = empty_folders
    notop = ours / weights.imagenet_filename("vgg16", include_top=False)
    notop.write_bytes(b"")

    assert weights.find_imagenet_file("vgg16", need_top=False) == notop
    with pytest.raises(FileNotFoundError):
        weights.find_imagenet_file("vgg16", need_top=True)

    full = keras_home / "models" / weights.imagenet_filename("vgg16", include_top=True)
    full.parent.mkdir()
    full.write_bytes(b"")
    assert weights.find_imagenet_file("vgg16", need_top=True) == full
    # Folders are searched in order: ours first, whatever file the next one holds.
    assert weights.find_imagenet_file("vgg16", need_top=False) == notop
    full_here = ours / full.name
    full_here.write_bytes(b"")
    # Within a folder the full file is taken first: it has the conv layers too.
    assert weights.find_imagenet_file("vgg16", need_top=False) == full_here


@pytest.mark.parametrize(
    "value, expected",
    [
        ("1", True),
        ("yes", True),
        ("0", False),
        ("false", False),
        ("", False),
    ],
)
def test_offline_switch(monkeypatch, value, expected):
    monkeypatch.setenv(weights.OFFLINE_ENV, value)
    assert weights.offline() is expected


def test_imagenet_cut_at_fc1_asks_for_the_full_file(empty_folders):
    config = tiny_config("imagenet", cut="fc1")
    with pytest.raises(FileNotFoundError) as error:
        build.weights_file(config)
    assert "vgg16_weights_tf_dim_ordering_tf_kernels.h5" in str(error.value)
    assert "_notop" not in str(error.value)
