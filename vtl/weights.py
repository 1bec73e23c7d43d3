"""Keras VGG weights: where the files are, how each layout reads, how they map to Flax.

The readers need only h5py; TensorFlow is imported only to fetch the ImageNet files.
"""

import io
import logging
import os
import zipfile
from pathlib import Path

import h5py
import numpy as np

from vtl import model

log = logging.getLogger(__name__)

KERAS_ORIGIN = "https://storage.googleapis.com/tensorflow/keras-applications"
WEIGHTS_DIR_ENV = "VTL_WEIGHTS_DIR"
OFFLINE_ENV = "VTL_OFFLINE"
FALSE_WORDS = ("", "0", "false", "no", "off")
KERAS_ARCHIVE_WEIGHTS = "model.weights.h5"
# Keras 3 keeps layers under `layers`; tf.keras 2.13-2.15 under the other name.
KERAS3_LAYER_GROUPS = ("layers", "_layer_checkpoint_dependencies")


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


def name_list(node: h5py.HLObject, key: str) -> list[str]:
    """A list of names stored in attribute `key`, as text.

    Keras splits a list too long for one HDF5 attribute into `key0`, `key1`, ...
    """
    if key in node.attrs:
        return [text(name) for name in node.attrs[key]]
    names, chunk = [], 0
    while f"{key}{chunk}" in node.attrs:
        names += [text(name) for name in node.attrs[f"{key}{chunk}"]]
        chunk += 1
    return names


def read_keras_file(path: str | os.PathLike) -> dict[str, list[np.ndarray]]:
    """Layer name -> weight arrays (kernel, bias) of any Keras weights file.

    HDF5 files go to `read_keras_h5`; `.keras` archives (zip files) to
    `read_keras_archive`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file does not exist or is not a file")
    if not h5py.is_hdf5(path) and zipfile.is_zipfile(path):
        return read_keras_archive(path)
    return read_keras_h5(path)


def read_keras_h5(path: str | os.PathLike) -> dict[str, list[np.ndarray]]:
    """Layer name -> weight arrays in the order Keras stores them (kernel, bias).

    Reads the legacy layout that `keras.applications` downloads, Keras 2's
    `save_weights` and Keras 3's legacy writer use (`layer_names` and `weight_names`
    attributes), whole-model `.h5` files (the same under `model_weights`), and Keras 3
    `.weights.h5` files (groups under `layers`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file does not exist or is not a file")
    if not h5py.is_hdf5(path):
        raise ValueError(
            f"{path}: not an HDF5 file nor a .keras archive; expected Keras weights "
            f"(.h5, .weights.h5 or .keras)"
        )

    try:
        with h5py.File(path, "r") as file:
            return read_h5_root(file, str(path))
    except OSError as error:
        raise ValueError(f"{path}: HDF5 file cannot be read ({error})") from None


def read_keras_archive(path: str | os.PathLike) -> dict[str, list[np.ndarray]]:
    """Layers of a whole-model `.keras` archive, read from its `model.weights.h5`."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            if KERAS_ARCHIVE_WEIGHTS not in archive.namelist():
                raise ValueError(
                    f"{path}: zip archive without {KERAS_ARCHIVE_WEIGHTS}; expected a "
                    f".keras model, found {sorted(archive.namelist())[:8]}"
                )
            with archive_member(archive, KERAS_ARCHIVE_WEIGHTS) as member:
                with h5py.File(member, "r") as file:
                    return read_h5_root(file, f"{path}:{KERAS_ARCHIVE_WEIGHTS}")
    except (OSError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: .keras archive cannot be read ({error})") from None


def archive_member(archive: zipfile.ZipFile, name: str):
    """A seekable file object for a zip member, for h5py to read without unpacking.

    Keras stores members uncompressed, so seeking in them is cheap; a compressed
    member would be decompressed again on every backward seek, so it is read whole.
    """
    if archive.getinfo(name).compress_type == zipfile.ZIP_STORED:
        return archive.open(name)
    return io.BytesIO(archive.read(name))


def read_h5_root(file: h5py.File, source: str) -> dict[str, list[np.ndarray]]:
    """The layers of an open HDF5 file in whichever Keras layout it uses."""
    root = file["model_weights"] if "model_weights" in file else file
    if "layer_names" in root.attrs or "layer_names0" in root.attrs:
        return read_legacy_layout(root, source)
    for key in KERAS3_LAYER_GROUPS:
        if isinstance(root.get(key), h5py.Group):
            return read_keras3_layout(root[key], source)
    raise ValueError(
        f"{source}: HDF5 file holds no Keras weights "
        f"(no 'layer_names' attribute and no 'layers' group)"
    )


def read_legacy_layout(root: h5py.Group, source: str) -> dict[str, list[np.ndarray]]:
    """Layers listed by `layer_names`, each group listing its `weight_names`."""
    layers = {}
    for name in name_list(root, "layer_names"):
        group = root.get(name)
        if not isinstance(group, h5py.Group):
            raise ValueError(
                f"{source}: layer {name} is listed in layer_names but the "
                f"file has no group {root.name.rstrip('/')}/{name}"
            )
        weight_names = name_list(group, "weight_names")
        missing = [
            w for w in weight_names if not isinstance(group.get(w), h5py.Dataset)
        ]
        if missing:
            raise ValueError(
                f"{source}: layer {name} lists weights {weight_names} but "
                f"the file lacks the datasets {missing}"
            )
        for owner, names in weight_owners(name, weight_names).items():
            if owner in layers:
                raise ValueError(
                    f"{source}: two groups hold weights of a layer named {owner}; "
                    f"expected one"
                )
            layers[owner] = [np.asarray(group[w]) for w in names]
    return layers


def weight_owners(group: str, weight_names: list[str]) -> dict[str, list[str]]:
    """The layer each weight of a legacy group belongs to, in file order.

    A layer's weights are named `layer/kernel:0` (or `layer_W_1:0`) and belong to
    the group. A model nested as one layer (a VGG inside a Sequential) stores all its
    layers' weights in one group; their names then carry several layer names.
    """
    owners = {w: w.split("/")[-2] if "/" in w else group for w in weight_names}
    if len(set(owners.values())) <= 1:
        return {group: weight_names} if weight_names else {}
    grouped = {}
    for weight, owner in owners.items():
        grouped.setdefault(owner, []).append(weight)
    return grouped


def read_keras3_layout(root: h5py.Group, source: str) -> dict[str, list[np.ndarray]]:
    """Layers of a Keras 3 `.weights.h5` file, by their Keras layer names.

    Keras 3 names each group after the layer's class (`conv2d_3`) and keeps the layer
    name in the `name` attribute of its `vars` group, so the attribute wins. Files
    written before Keras kept that attribute are matched by position, as Keras does.
    """
    found = variable_groups(root, root.name)
    if found and all("name" in variables.attrs for variables in found.values()):
        names = {path: text(found[path].attrs["name"]) for path in found}
    else:
        names = positional_names(list(found), root.name, source)

    layers = {}
    for path, variables in found.items():
        name = names[path]
        if name in layers:
            raise ValueError(
                f"{source}: two groups under '{root.name}' hold weights of "
                f"a layer named {name}; expected one"
            )
        layers[name] = [np.asarray(variables[k]) for k in sorted(variables, key=int)]
    return layers


def variable_groups(group: h5py.Group, path: str) -> dict[str, h5py.Group]:
    """Every non-empty `vars` group below `group`, by the path of its layer.

    A nested model keeps its own layers in a `layers` group of its own.
    """
    found = {}
    for key, child in group.items():
        if not isinstance(child, h5py.Group):
            continue
        variables = child.get("vars")
        if isinstance(variables, h5py.Group) and len(variables):
            found[f"{path}/{key}"] = variables
        for nested in KERAS3_LAYER_GROUPS:
            if isinstance(child.get(nested), h5py.Group):
                found.update(variable_groups(child[nested], f"{path}/{key}/{nested}"))
    return found


def positional_names(paths: list[str], root: str, source: str) -> dict[str, str]:
    """Keras layer names for unnamed Keras 3 groups: the k-th `conv2d` group is the
    k-th conv layer of the VGG, the `dense` groups are fc1, fc2 and predictions."""
    by_kind = {"conv2d": [], "dense": []}
    others = []
    for path in paths:
        parent, key = path.rsplit("/", 1)
        kind, index = group_kind(key)
        if kind in by_kind and parent == root:
            by_kind[kind].append((index, path))
        else:
            others.append(path)

    convs = [path for _, path in sorted(by_kind["conv2d"])]
    dense = [path for _, path in sorted(by_kind["dense"])]
    arch = {13: "vgg16", 16: "vgg19"}.get(len(convs))
    if arch is None or len(dense) not in (0, 3) or others:
        raise ValueError(
            f"{source}: the file does not name its layers, and its groups are not "
            f"those of a VGG16 or VGG19 (expected 13 or 16 conv2d groups and 0 or 3 "
            f"dense groups under {root}, found {len(convs)} conv2d, {len(dense)} "
            f"dense and {len(others)} others such as {others[:3]}); load it in "
            f"Keras and read the live model with layers_from_keras_model"
        )
    names = model.weighted_layers(arch)
    fc = names[len(convs) :][: len(dense)]
    return dict(zip(convs + dense, names[: len(convs)] + fc))


def group_kind(key: str) -> tuple[str, int]:
    """Keras 3 group names are the snake-case class, then `_1`, `_2`: `conv2d_3`."""
    kind, _, index = key.rpartition("_")
    return (kind, int(index)) if kind and index.isdigit() else (key, 0)


def layers_from_keras_model(keras_model) -> dict[str, list[np.ndarray]]:
    """Layer name -> weight arrays of a live Keras model, nested models included.

    Works with any object that has Keras's `layers` and `get_weights()`, so Keras
    itself is never imported here.
    """
    layers = {}
    for layer in keras_model.layers:
        found = (
            layers_from_keras_model(layer)
            if hasattr(layer, "layers")
            else {layer.name: layer.get_weights()}
        )
        for name, arrays in found.items():
            if not arrays:
                continue
            if name in layers:
                raise ValueError(
                    f"Keras model {keras_model.name}: two layers are named {name}; "
                    f"expected one"
                )
            layers[name] = [np.asarray(array) for array in arrays]
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
        f"({evidence}). To use this file, set model.name={found}; to keep "
        f"{arch}, set model.weights to a {arch.upper()} file such as "
        f"{imagenet_filename(arch, False)}, or to imagenet."
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
    loaded, fresh, problems = {}, [], unexpected_layers(layers, arch)

    for name, leaves in params.items():
        problem = (
            shape_problem(leaves, layers[name])
            if name in layers
            else "missing from the file"
        )
        if name in replace or (name in optional and problem):
            loaded[name] = leaves
            fresh.append(name)
            reason = "replaced" if name in replace else problem
            log.info("layer %s: freshly initialised (%s in %s)", name, reason, source)
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
        raise ValueError(
            f"{source}: weights do not fit {arch}:\n  {listing}"
            f"{notop_advice(layers, params, problems)}"
        )
    return loaded, fresh


def unexpected_layers(layers: dict, arch: str) -> list[str]:
    """A problem line for each layer of the file that `arch` does not have."""
    return [
        f"{name}: not a layer of {arch}; the file holds it with shapes "
        f"{[tuple(array.shape) for array in layers[name]]}"
        for name in sorted(set(layers) - set(model.weighted_layers(arch)))
    ]


def notop_advice(layers: dict, params: dict, problems: list[str]) -> str:
    """What to do when fc1 or fc2 must come from a file saved without the top."""
    fc = [name for name in ("fc1", "fc2") if name in params]
    if not fc or {"fc1", "fc2"} & set(layers):
        return ""
    if not any(problem.startswith(f"{fc[0]}: missing") for problem in problems):
        return ""
    return (
        f"\nThe file has no fc1 or fc2 (it was saved without the top, like the "
        f"_notop files), but {' and '.join(fc)} must come from it here "
        f"(model.fc_weights=file, or model.cut at fc1 or fc2). Use the full weights "
        f"file (the name without _notop), or set model.fc_weights=auto or fresh with "
        f"model.cut at block5_pool or before."
    )


def shape_problem(leaves: dict, arrays: list) -> str | None:
    """Why the file's arrays of a layer do not fit its kernel and bias, or None."""
    expected = [tuple(leaves["kernel"].shape), tuple(leaves["bias"].shape)]
    found = [tuple(array.shape) for array in arrays]
    if found == expected:
        return None
    return f"expected kernel and bias of shapes {expected}, found {found}"
