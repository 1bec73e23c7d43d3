"""Keras VGG weight files: where they are, how they read, how they map onto Flax.

The reader needs only h5py. TensorFlow is imported only to fetch the ImageNet files
when they are not on disk yet.
"""

import logging
import os
from pathlib import Path

import h5py
import numpy as np

from vtl import model

log = logging.getLogger(__name__)

KERAS_ORIGIN = "https://storage.googleapis.com/tensorflow/keras-applications"
WEIGHTS_DIR_ENV = "VTL_WEIGHTS_DIR"
OFFLINE_ENV = "VTL_OFFLINE"
FALSE_WORDS = ("", "0", "false", "no", "off")


def imagenet_filename(arch: str, include_top: bool) -> str:
    """The file name `keras.applications` gives the ImageNet weights of `arch`."""
    suffix = "" if include_top else "_notop"
    return f"{arch}_weights_tf_dim_ordering_tf_kernels{suffix}.h5"


def weight_folders() -> list[Path]:
    """Folders searched for ImageNet files: ours, then the Keras cache."""
    folders = []
    if os.environ.get(WEIGHTS_DIR_ENV):
        folders.append(Path(os.environ[WEIGHTS_DIR_ENV]).expanduser())
    keras_home = os.environ.get("KERAS_HOME", "~/.keras")
    folders.append(Path(keras_home).expanduser() / "models")
    return folders


def offline() -> bool:
    """Whether $VTL_OFFLINE forbids downloads; "0", "false", "no" leave them allowed."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in FALSE_WORDS


def find_imagenet_file(arch: str, need_top: bool) -> Path:
    """Path of the ImageNet weights for `arch`, fetched through Keras when absent.

    Folders are searched in the order of `weight_folders`. In each, the full file is
    taken first (it has the conv layers too); the `_notop` file is enough only when
    `need_top` is false.
    """
    names = [imagenet_filename(arch, True)]
    if not need_top:
        names.append(imagenet_filename(arch, False))

    for folder in weight_folders():
        for name in names:
            if (folder / name).is_file():
                return folder / name

    return fetch_imagenet_file(arch, names)


def fetch_imagenet_file(arch: str, names: list[str]) -> Path:
    """Download an ImageNet file with Keras, or say exactly how to provide it.

    `names` are the acceptable files, best first; the last one is downloaded.
    """
    name = names[-1]
    folders = " and ".join(str(folder) for folder in weight_folders())
    looked = f"looked for {' or '.join(names)} in {folders}"
    how = (
        f"Download {KERAS_ORIGIN}/{arch}/{name} on a machine that is online and put "
        f"it in one of those folders (or in a folder named by ${WEIGHTS_DIR_ENV}), or "
        f"set model.weights to the path of a Keras weights file."
    )
    if offline():
        raise FileNotFoundError(
            f"ImageNet weights not found: {looked}. ${OFFLINE_ENV} "
            f"is set, so nothing was downloaded. {how}"
        )
    try:
        from keras.utils import get_file
    except ImportError:
        raise FileNotFoundError(
            f"ImageNet weights not found: {looked}, and Keras is "
            f"not installed to fetch them. {how}"
        ) from None

    try:
        origin = f"{KERAS_ORIGIN}/{arch}/{name}"
        return Path(get_file(name, origin, cache_subdir="models"))
    except Exception as error:
        raise FileNotFoundError(
            f"ImageNet weights not found: {looked}, and fetching "
            f"them failed ({error}). {how}"
        ) from None


def text(value) -> str:
    """h5py returns names as bytes or str depending on how the file was written."""
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def read_keras_h5(path: str | os.PathLike) -> dict[str, list[np.ndarray]]:
    """Layer name -> weight arrays in the order Keras stores them (kernel, bias).

    Reads the legacy layout that `keras.applications` downloads and Keras 2's
    `save_weights` writes (`layer_names` and `weight_names` attributes), whole-model
    files (the same under `model_weights`), and Keras 3 `.weights.h5` files.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file does not exist or is not a file")
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path}: not an HDF5 file; expected Keras weights (.h5)")

    try:
        with h5py.File(path, "r") as file:
            root = file["model_weights"] if "model_weights" in file else file
            if "layer_names" in root.attrs:
                return read_legacy_layout(root, str(path))
            if isinstance(root.get("layers"), h5py.Group):
                return read_keras3_layout(root["layers"], str(path))
    except OSError as error:
        raise ValueError(f"{path}: HDF5 file cannot be read ({error})") from None
    raise ValueError(
        f"{path}: HDF5 file holds no Keras weights "
        f"(no 'layer_names' attribute and no 'layers' group)"
    )


def read_legacy_layout(root: h5py.Group, source: str) -> dict[str, list[np.ndarray]]:
    """Layers listed by `layer_names`, each group listing its `weight_names`."""
    layers = {}
    for name in map(text, root.attrs["layer_names"]):
        group = root.get(name)
        if not isinstance(group, h5py.Group):
            raise ValueError(
                f"{source}: layer {name} is listed in layer_names but the "
                f"file has no group {root.name.rstrip('/')}/{name}"
            )
        weight_names = [text(w) for w in group.attrs.get("weight_names", [])]
        missing = [
            w for w in weight_names if not isinstance(group.get(w), h5py.Dataset)
        ]
        if missing:
            raise ValueError(
                f"{source}: layer {name} lists weights {weight_names} but "
                f"the file lacks the datasets {missing}"
            )
        if weight_names:
            layers[name] = [np.asarray(group[w]) for w in weight_names]
    return layers


def read_keras3_layout(root: h5py.Group, source: str) -> dict[str, list[np.ndarray]]:
    """Layers of a Keras 3 `.weights.h5` file, by their Keras layer names.

    Keras 3 names each group after the layer's class (`conv2d_3`) and keeps the layer
    name in the `name` attribute of its `vars` group, so the attribute wins.
    """
    layers = {}
    for key, group in root.items():
        variables = group.get("vars") if isinstance(group, h5py.Group) else None
        if variables is None or not len(variables):
            continue
        name = text(variables.attrs.get("name", key))
        if name in layers:
            raise ValueError(
                f"{source}: two groups under 'layers' hold weights of "
                f"a layer named {name}; expected one"
            )
        layers[name] = [np.asarray(variables[k]) for k in sorted(variables, key=int)]
    return layers


def file_architecture(layers: dict) -> str | None:
    """The VGG a file's layers belong to ("vgg16", "vgg19"), or None if unclear.

    Only VGG19 has the `blockN_conv4` layers. A file that has a conv layer of block 4
    or 5 but none of them is a VGG16; a file cut before block 4 is ambiguous.
    """
    vgg16 = set(model.weighted_layers("vgg16"))
    only_vgg19 = set(model.weighted_layers("vgg19")) - vgg16
    if only_vgg19 & set(layers):
        return "vgg19"
    late_convs = {name for name in vgg16 if name.startswith(("block4", "block5"))}
    if late_convs & set(layers):
        return "vgg16"
    return None


def check_architecture(layers: dict, arch: str, source: str) -> None:
    """Refuse a file of the other VGG before any shape is compared."""
    found = file_architecture(layers)
    if found is None or found == arch:
        return
    vgg16 = set(model.weighted_layers("vgg16"))
    conv4 = sorted(set(model.weighted_layers("vgg19")) - vgg16)
    evidence = (
        f"it has {sorted(set(conv4) & set(layers))}"
        if found == "vgg19"
        else f"it has block4/block5 convs but none of {conv4}"
    )
    raise ValueError(
        f"{source}: expected {arch.upper()} weights, found a {found.upper()} file "
        f"({evidence}); set model.name={found} or use {arch} weights"
    )


def assign(
    params: dict,
    layers: dict,
    arch: str,
    source: str,
    replace: tuple[str, ...] = (),
    optional: tuple[str, ...] = (),
):
    """Copy file weights into the Flax `params` tree, strictly.

    Layers in `replace` keep their fresh initialisation; layers in `optional` do so
    when the file lacks them or holds another shape (fc1 at another image size). Every
    other layer of `params` must be in the file with the same shapes. Returns the new
    tree and the names that were initialised.
    """
    check_architecture(layers, arch, source)
    loaded, fresh, problems = {}, [], []

    for name, leaves in params.items():
        problem = (
            shape_problem(leaves, layers[name])
            if name in layers
            else "missing from the file"
        )
        if name in replace or (name in optional and problem):
            loaded[name] = leaves
            fresh.append(name)
            if name in optional:
                log.info("layer %s: %s, so it starts fresh", name, problem)
            continue
        if problem:
            problems.append(f"{name}: {problem}")
            continue
        loaded[name] = {
            key: np.asarray(array, leaves[key].dtype)
            for key, array in zip(("kernel", "bias"), layers[name])
        }

    if problems:
        listing = "\n  ".join(problems)
        raise ValueError(f"{source}: weights do not fit {arch}:\n  {listing}")
    for name in fresh:
        log.info("layer %s: freshly initialised, not loaded from %s", name, source)
    return loaded, fresh


def shape_problem(leaves: dict, arrays: list) -> str | None:
    """Why the file's arrays of a layer do not fit its kernel and bias, or None."""
    expected = [tuple(leaves["kernel"].shape), tuple(leaves["bias"].shape)]
    found = [tuple(array.shape) for array in arrays]
    if found == expected:
        return None
    return f"expected kernel and bias of shapes {expected}, found {found}"
