"""Keras weight files read onto the Flax VGG: every layout, strictness, real weights.

Files are written here in the layouts Keras uses; the Keras comparisons build models
with `weights=None` and give them seeded random weights.
"""

import warnings
from pathlib import Path

import h5py
import jax
import numpy as np
import pytest

from vtl import data, model, weights

SIZE = 32
CLASSES = 10
TOLERANCE = 1e-5
TINY_WIDTH = 1 / 16
# The range of caffe-preprocessed pixels: 0..255 minus the ImageNet means.
PIXEL_RANGE = (-120.0, 150.0)


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
    path: Path, layers: list, weight_name=applications_name, as_bytes: bool = True
) -> Path:
    """Write `[(layer name, {"kernel": array, "bias": array} or {}), ...]` in the
    legacy layout: root attribute `layer_names`, one group per layer with its
    `weight_names`, and the datasets under those names."""
    with h5py.File(path, "w") as file:
        file.attrs["layer_names"] = names_attribute([n for n, _ in layers], as_bytes)
        file.attrs["backend"] = "tensorflow"
        file.attrs["keras_version"] = "2.2.4"
        for layer, arrays in layers:
            group = file.create_group(layer)
            names = [weight_name(layer, variable) for variable in arrays]
            group.attrs["weight_names"] = names_attribute(names, as_bytes)
            for name, array in zip(names, arrays.values()):
                group.create_dataset(name, data=array)
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


# Full-width VGG16 and VGG19 against Keras.


@pytest.fixture(scope="module", params=["vgg16", "vgg19"])
def keras_vgg(request, tmp_path_factory):
    """A seeded random Keras VGG, its outputs on one input, and its legacy file."""
    keras = import_keras()
    arch = request.param
    build = {"vgg16": keras.applications.VGG16, "vgg19": keras.applications.VGG19}[arch]
    net = build(
        weights=None,
        include_top=True,
        input_shape=(SIZE, SIZE, 3),
        classes=CLASSES,
        classifier_activation=None,
    )
    rng = np.random.default_rng(1)
    for layer in net.layers:
        if layer.weights:
            randomise(layer, rng)

    image = rng.uniform(*PIXEL_RANGE, (2, SIZE, SIZE, 3)).astype(np.float32)
    probe = keras.Model(net.input, [net.get_layer("block5_pool").output, net.output])
    pool, logits = (np.asarray(y) for y in probe(image, training=False))
    path = write_legacy(tmp_path_factory.mktemp(arch) / "legacy.h5", keras_layers(net))
    return {
        "arch": arch,
        "keras": net,
        "image": image,
        "path": path,
        "block5_pool": pool,
        "predictions": logits,
    }


def flax_outputs(arch: str, layers: dict, image: np.ndarray) -> dict:
    """block5_pool and logits of the full Flax VGG with the file's weights."""
    vgg = model.VGG(arch, 1.0, CLASSES, capture=("block5_pool", "predictions"))
    params, fresh = weights.assign(init_shapes(vgg, image.shape), layers, arch, "test")
    assert fresh == []
    return jax.jit(vgg.apply)({"params": params}, image)


@pytest.mark.keras
def test_legacy_layout_matches_keras(keras_vgg):
    layers = weights.read_keras_h5(keras_vgg["path"])
    outputs = flax_outputs(keras_vgg["arch"], layers, keras_vgg["image"])

    for name in ("block5_pool", "predictions"):
        error = relative_error(outputs[name], keras_vgg[name])
        print(f"{keras_vgg['arch']} legacy {name}: relative error {error:.2e}")
        assert error <= TOLERANCE, name
    # Logits far from zero: the comparison is not between two near-zero arrays.
    assert np.max(np.abs(keras_vgg["predictions"])) > 1.0


@pytest.mark.keras
def test_keras2_and_keras3_layouts_read_the_same(keras_vgg, tmp_path):
    net = keras_vgg["keras"]
    keras2 = write_legacy(tmp_path / "keras2.h5", keras_layers(net), keras2_name)
    keras3 = tmp_path / "model.weights.h5"
    net.save_weights(keras3)
    whole_model = tmp_path / "model.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras calls .h5 models legacy; they are.
        net.save(whole_model)
    reference = weights.read_keras_h5(keras_vgg["path"])

    assert sorted(reference) == sorted(model.weighted_layers(keras_vgg["arch"]))
    for path in (keras2, keras3, whole_model):
        layers = weights.read_keras_h5(path)
        assert sorted(layers) == sorted(reference), path.name
        for name, arrays in reference.items():
            assert [a.shape for a in layers[name]] == [a.shape for a in arrays], name
            assert all(np.array_equal(a, b) for a, b in zip(layers[name], arrays)), name


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
