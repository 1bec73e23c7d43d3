"""Convert Keras VGG weights once into an orbax checkpoint that runs read directly.

python -m vtl.convert SOURCE OUT [--arch vgg16|vgg19]
"""

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from vtl import features, model, weights

RECORD = "vtl_weights.json"
PARAMS = "params"
FORMAT_VERSION = 1


def convert(
    source: str | os.PathLike, out: str | os.PathLike, arch: str | None = None
) -> dict:
    """Write the weights of a Keras file to `out` and return the folder's record.

    `arch` is taken from the file when not given. A folder at `out` that holds an
    earlier conversion is replaced; any other existing `out` is refused.
    """
    source, out = keras_file(source), Path(out).expanduser().resolve()
    layers = weights.read_keras_file(source)
    arch = check_arch_option(layers, arch, str(source))
    check_layers(layers, arch, str(source))
    check_destination(out)

    record = {
        "format": FORMAT_VERSION,
        "architecture": arch,
        "source": {"file": source.name, "sha256": features.file_digest(source)},
        "layers": {
            name: [list(array.shape) for array in arrays]
            for name, arrays in layers.items()
        },
        "absent": [name for name in model.weighted_layers(arch) if name not in layers],
    }
    write(out, params_tree(layers), record)
    return record


def check_arch_option(layers: dict, arch: str | None, source: str) -> str:
    """The architecture to convert as: `arch` if the file agrees, else the file's."""
    found = weights.file_architecture(layers)
    if arch is None and found is None:
        raise ValueError(
            f"{source}: cannot tell VGG16 from VGG19 (the file has no conv layer of "
            f"block 4 or 5; it has {sorted(layers)}); pass --arch vgg16 or vgg19"
        )
    if arch is not None and found not in (None, arch):
        raise ValueError(
            f"{source}: expected {arch.upper()} weights, found a {found.upper()} file; "
            f"pass --arch {found} or leave --arch out"
        )
    return arch or found


def check_layers(layers: dict, arch: str, source: str) -> None:
    """Refuse a file that is not a whole VGG trunk of `arch`, naming every layer."""
    expected = model.weighted_layers(arch)
    convs = [name for name in expected if "_conv" in name]
    problems = weights.unexpected_layers(layers, arch)
    problems += [
        f"{name}: missing from the file" for name in convs if name not in layers
    ]
    problems += [
        f"{name}: {problem}"
        for name in expected
        if name in layers and (problem := array_problem(name, layers[name]))
    ]
    if problems:
        listing = "\n  ".join(problems)
        raise ValueError(f"{source}: not convertible as {arch}:\n  {listing}")


def array_problem(name: str, arrays: list) -> str | None:
    """Why a layer's arrays are not a kernel and its bias, or None."""
    shapes = [tuple(array.shape) for array in arrays]
    rank = 4 if "_conv" in name else 2
    if len(shapes) != 2 or len(shapes[0]) != rank or shapes[1] != shapes[0][-1:]:
        return (
            f"expected a rank-{rank} kernel and a bias of its last dimension, "
            f"found shapes {shapes}"
        )
    return None


def params_tree(layers: dict) -> dict:
    """The Flax params tree of the file's layers: name -> {kernel, bias}."""
    return {
        name: {"kernel": np.asarray(kernel), "bias": np.asarray(bias)}
        for name, (kernel, bias) in layers.items()
    }


def check_destination(out: Path) -> None:
    """Only a missing path, an empty folder or an earlier conversion may be written."""
    if not out.exists() or is_converted(out):
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    raise FileExistsError(
        f"{out}: exists and is not a folder written by vtl.convert (no {RECORD}); "
        f"expected a new path for the conversion"
    )


def write(out: Path, params: dict, record: dict) -> None:
    """Checkpoint and record into a temporary folder, renamed into place when whole."""
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging / PARAMS, params)
        checkpointer.wait_until_finished()
        (staging / RECORD).write_text(record_json(record))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def record_json(record: dict) -> str:
    """The record as JSON with one line per field and per layer, to be read by eye."""
    fields = [
        f' "{key}": {json.dumps(value)}'
        for key, value in record.items()
        if key != "layers"
    ]
    layers = [
        f'  "{name}": {json.dumps(shapes)}' for name, shapes in record["layers"].items()
    ]
    fields.append(' "layers": {\n' + ",\n".join(layers) + "\n }")
    return "{\n" + ",\n".join(fields) + "\n}\n"


def is_converted(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by `convert`."""
    return (Path(path) / RECORD).is_file()


def read_converted(folder: str | os.PathLike) -> tuple[dict, dict]:
    """Layer name -> [kernel, bias] of a converted folder, and its record.

    The layers are those of the source file, exactly as `weights.read_keras_file`
    returns them.
    """
    folder = Path(folder).expanduser().resolve()
    record = read_record(folder)
    if not (folder / PARAMS).is_dir():
        raise ValueError(
            f"{folder}: has {RECORD} but no {PARAMS}/ checkpoint beside it; convert "
            f"the Keras file again"
        )
    params = ocp.StandardCheckpointer().restore(folder / PARAMS)
    layers = {
        name: [np.asarray(params[name]["kernel"]), np.asarray(params[name]["bias"])]
        for name in params
    }

    found = {name: [list(a.shape) for a in arrays] for name, arrays in layers.items()}
    if found != record["layers"]:
        raise ValueError(
            f"{folder}: the checkpoint does not hold the layers {RECORD} lists; "
            f"expected {record['layers']}, found {found}"
        )
    return layers, record


def read_record(folder: Path) -> dict:
    """The folder's `vtl_weights.json`, checked for the fields a run needs."""
    if not is_converted(folder):
        raise ValueError(
            f"{folder}: a folder without {RECORD}; expected a Keras weights file or "
            f"a folder written by python -m vtl.convert"
        )
    record = json.loads((folder / RECORD).read_text())
    if record.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{folder / RECORD}: format {record.get('format')!r}, expected "
            f"{FORMAT_VERSION}; convert the Keras file again"
        )
    missing = [key for key in ("architecture", "source", "layers") if key not in record]
    if missing or "sha256" not in record.get("source", {}):
        raise ValueError(
            f"{folder / RECORD}: lacks {missing or ['source.sha256']}; convert the "
            f"Keras file again"
        )
    return record


def read_source(path: str | os.PathLike, arch: str) -> tuple[dict, str]:
    """The layers of a Keras weights file or converted folder, and the sha256 of the
    Keras file they came from, which keys the feature store."""
    path = keras_file(path)
    if not path.is_dir():
        return weights.read_keras_file(path), features.file_digest(path)

    layers, record = read_converted(path)
    if record["architecture"] != arch:
        raise ValueError(
            f"{path}: expected {arch.upper()} weights, found a conversion of "
            f"{record['architecture'].upper()} weights. To use it, set "
            f"model.name={record['architecture']}; to keep {arch}, convert a "
            f"{arch.upper()} file."
        )
    return layers, record["source"]["sha256"]


def keras_file(path: str | os.PathLike) -> Path:
    """The weights file inside an unzipped `.keras` folder, else `path` itself."""
    path = Path(path).expanduser()
    # Keras's `save(..., zipped=False)` writes a .keras archive as a folder.
    unzipped = path / weights.KERAS_ARCHIVE_WEIGHTS
    if path.is_dir() and not is_converted(path) and unzipped.is_file():
        return unzipped
    return path


def main(argv: list[str]) -> int:
    """The command line: convert one file, print what was written."""
    parser = argparse.ArgumentParser(
        prog="python -m vtl.convert", description=__doc__.splitlines()[0]
    )
    parser.add_argument("source", help="Keras weights: .h5, .weights.h5 or .keras")
    parser.add_argument("out", help="folder to write (checkpoint and vtl_weights.json)")
    parser.add_argument(
        "--arch", choices=["vgg16", "vgg19"], help="default: the file's"
    )
    args = parser.parse_args(argv)

    try:
        record = convert(args.source, args.out, args.arch)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"{args.source} -> {args.out}: {record['architecture']}, "
        f"{len(record['layers'])} layers from the file, absent "
        f"{record['absent'] or 'none'}, source sha256 {record['source']['sha256']}"
    )
    return 0


if __name__ == "__main__":
    # Orbax reports every checkpoint step at INFO; the one line printed matters.
    logging.getLogger("absl").setLevel(logging.WARNING)
    sys.exit(main(sys.argv[1:]))
