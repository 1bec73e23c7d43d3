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


def find_imagenet_file(arch: str, need_top: bool) -> Path:
    """Path of the ImageNet weights for `arch`, fetched through Keras when absent."""
    names = [imagenet_filename(arch, True)]
    if not need_top:
        names.append(imagenet_filename(arch, False))

    for folder in weight_folders():
        for name in names:
            if (folder / name).is_file():
                return folder / name

    return fetch_imagenet_file(arch, names[-1])


def fetch_imagenet_file(arch: str, name: str) -> Path:
    """Download an ImageNet file with Keras, or say exactly how to provide it."""
    looked = ", ".join(str(folder / name) for folder in weight_folders())
    how = (
        f"Download {KERAS_ORIGIN}/{arch}/{name} on a machine that is online and put it "
        f"in one of those folders (or in a folder named by ${WEIGHTS_DIR_ENV}), or set "
        f"model.weights to the path of a Keras weights file."
    )
    if os.environ.get(OFFLINE_ENV):
        raise FileNotFoundError(f"ImageNet weights not found: looked for {looked}. "
                                f"${OFFLINE_ENV} is set, so nothing was downloaded. {how}")
    try:
        from keras.utils import get_file
    except ImportError:
        raise FileNotFoundError(f"ImageNet weights not found: looked for {looked}, and "
                                f"Keras is not installed to fetch them. {how}") from None

    try:
        return Path(get_file(name, f"{KERAS_ORIGIN}/{arch}/{name}", cache_subdir="models"))
    except Exception as error:
        raise FileNotFoundError(f"ImageNet weights not found: looked for {looked}, and "
                                f"fetching them failed ({error}). {how}") from None


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
        raise FileNotFoundError(f"{path}: weights file does not exist")
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path}: not an HDF5 file; expected Keras weights (.h5)")

    with h5py.File(path, "r") as file:
        root = file["model_weights"] if "model_weights" in file else file
        if "layer_names" in root.attrs:
            return read_legacy_layout(root)
        if "layers" in root and isinstance(root["layers"], h5py.Group):
            return read_keras3_layout(root["layers"])
    raise ValueError(f"{path}: HDF5 file holds no Keras weights "
                     f"(no 'layer_names' attribute and no 'layers' group)")


def read_legacy_layout(root: h5py.Group) -> dict[str, list[np.ndarray]]:
    layers = {}
    for name in map(text, root.attrs["layer_names"]):
        group = root[name]
        weight_names = [text(w) for w in group.attrs.get("weight_names", [])]
        if weight_names:
            layers[name] = [np.asarray(group[w]) for w in weight_names]
    return layers


def read_keras3_layout(root: h5py.Group) -> dict[str, list[np.ndarray]]:
    layers = {}
    for name, group in root.items():
        variables = group.get("vars")
        if variables is not None and len(variables):
            layers[name] = [np.asarray(variables[k]) for k in sorted(variables, key=int)]
    return layers


def other_arch(arch: str) -> str:
    return "vgg16" if arch == "vgg19" else "vgg19"


def check_architecture(layers: dict, arch: str, source: str) -> None:
    """Refuse a file of the other VGG before any shape is compared."""
    ours = set(model.weighted_layers(arch))
    theirs = set(model.weighted_layers(other_arch(arch)))
    foreign = sorted((theirs - ours) & set(layers))
    lacking = sorted((ours - theirs) - set(layers))
    convs_present = any(name.startswith("block") for name in layers)
    if foreign or (lacking and convs_present):
        raise ValueError(
            f"{source}: this is a {other_arch(arch).upper()} file but model.name is "
            f"{arch!r} (file has {foreign or 'no'} {arch}-foreign layers, lacks "
            f"{lacking}); set model.name={other_arch(arch)} or use {arch} weights"
        )


def assign(params: dict, layers: dict, arch: str, source: str,
           replace: tuple[str, ...] = (), optional: tuple[str, ...] = ()):
    """Copy file weights into the Flax `params` tree, strictly.

    Layers in `replace` keep their fresh initialisation; layers in `optional` do so
    when the file lacks them. Every other layer of `params` must be in the file with
    the same shapes. Returns the new tree and the names that were initialised.
    """
    check_architecture(layers, arch, source)
    loaded, fresh, problems = {}, [], []

    for name, leaves in params.items():
        if name in replace or (name in optional and name not in layers):
            loaded[name], _ = leaves, fresh.append(name)
            continue
        if name not in layers:
            problems.append(f"{name}: missing from the file")
            continue
        arrays = layers[name]
        expected = [leaves["kernel"].shape, leaves["bias"].shape]
        found = [a.shape for a in arrays]
        if found != [tuple(s) for s in expected]:
            problems.append(f"{name}: expected kernel and bias {expected}, found {found}")
            continue
        loaded[name] = {"kernel": arrays[0], "bias": arrays[1]}

    if problems:
        raise ValueError(f"{source}: weights do not fit {arch}:\n  " + "\n  ".join(problems))
    for name in fresh:
        log.info("layer %s: freshly initialised, not loaded from %s", name, source)
    return loaded, fresh
