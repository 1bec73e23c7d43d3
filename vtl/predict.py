"""Predict with a trained run: `python -m vtl.predict RUN_FOLDER PATH [PATH ...]`.

Rebuilds the run's trunk from its config, restores the trained tail from its
checkpoint, and prints the top classes of every image (files or folders of them).
"""

import argparse
import csv
import dataclasses
import io
import json
import logging
import os
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from vtl import build, data, features, model, run
from vtl import config as configs

log = logging.getLogger("vtl.predict")

FORMATS = ("text", "json", "csv")
STAGES = ("last", "first")
# The cut of a stage that trains every layer: there is no trunk (vtl.finetune).
INPUT_CUT = "input"


@dataclasses.dataclass
class Run:
    """What prediction needs from a run folder: classes, trunk and trained tail.

    `stage` is the folder whose checkpoint the tail comes from: the run folder, or
    its `finetune/` folder after a second stage; `trunk` is None when the cut is
    the input.
    """

    folder: Path
    stage: Path
    config: configs.Config
    classes: list[str]
    cut: str
    trunk: model.VGG | None
    trunk_params: dict | None
    tail: model.VGG
    tail_params: dict


def read_json(path: Path, what: str):
    """A JSON file of the run folder, with an error that says which and why."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing; a run folder written by vtl.train holds its {what}"
        )
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def merged(base: dict, saved: dict) -> dict:
    """`saved` over `base`, section by section, so that newer defaults fill gaps."""
    result = dict(base)
    for key, value in saved.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            result[key] = merged(base[key], value)
        else:
            result[key] = value
    return result


def read_config(folder: Path, weights: str | None) -> configs.Config:
    """The run's resolved config; `weights` replaces model.weights when given."""
    saved = read_json(folder / "config.json", "resolved config")
    config = configs.Config(merged(configs.defaults().to_dict(), saved))
    if weights is not None:
        config.model.weights = weights
    return config


def check_weights_readable(config, folder: Path) -> None:
    """The trunk is rebuilt from model.weights, so that file must still be there."""
    try:
        build.weights_file(config)
    except FileNotFoundError as error:
        source = config.model.weights
        relative = source not in ("imagenet", "none") and not Path(source).is_absolute()
        where = f" (a relative path, read from {Path.cwd()})" if relative else ""
        raise FileNotFoundError(
            f"{folder / 'config.json'}: the run's trunk is rebuilt from the weights "
            f"it was trained with, and model.weights={source}{where} cannot be read "
            f"now; pass --weights PATH to where that file is now. "
            f"{error.args[0] if error.args else error}"
        ) from None


def leaf_shapes(tree) -> dict:
    """Every array of a parameter tree by its path, as a shape."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(key): tuple(leaf.shape) for key, leaf in leaves}


def restore_tail(folder: Path, like: dict) -> dict:
    """The trained tail parameters, checked against the tail the config builds."""
    path = folder / "checkpoint"
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: missing; a run folder written by vtl.train holds the tail's "
            f"orbax checkpoint there"
        )
    checkpointer = ocp.StandardCheckpointer()
    found = leaf_shapes(checkpointer.metadata(path).item_metadata.tree)
    expected = leaf_shapes(like)
    differences = [
        f"{name}: expected {expected.get(name)}, found {found.get(name)}"
        for name in sorted(set(expected) | set(found))
        if expected.get(name) != found.get(name)
    ]
    if differences:
        raise ValueError(
            f"{path}: the checkpoint does not fit the tail that config.json and "
            f"classes.json build; " + "; ".join(differences)
        )

    # Restored onto one device whatever devices the run was trained on.
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), like
    )
    return checkpointer.restore(path, target)


def check_same_trunk(folder: Path, config, split: build.Split) -> None:
    """Warn when the weights differ from those the run's features were made with."""
    # The run folder does not keep the weights' digest; its feature store does.
    summary = folder / "summary.json"
    if not summary.is_file():
        return
    store = json.loads(summary.read_text()).get("feature_store") or {}
    fingerprint = store.get("fingerprint", "")
    record = Path(config.features.dir).expanduser() / fingerprint / features.RECORD
    if not fingerprint or not record.is_file():
        return

    used = json.loads(record.read_text()).get("key", {}).get("weights")
    if used is not None and used != split.weights_key:
        log.warning(
            "the trunk weights differ from those the run was trained on: %s now, "
            "%s in %s; predictions will not match the run's",
            split.weights_key,
            used,
            record,
        )


def stage_of(folder: Path, which: str) -> tuple[Path, str | None]:
    """The folder whose checkpoint to use and its cut (None: the config's cut)."""
    finetuned = folder / "finetune"
    chosen = folder
    if which == "last" and (finetuned / "checkpoint").is_dir():
        chosen = finetuned
    record = chosen / "stage.json"
    if not record.is_file():
        return chosen, None
    return chosen, read_json(record, "stage's cut and layers")["cut"]


def whole_network(config, num_classes: int):
    """With the cut at the input, the tail is the whole network and no trunk."""
    tail = model.VGG(
        config.model.name,
        config.model.width,
        num_classes,
        dropout=config.train.dropout,
    )
    size = config.data.image_size
    image = jax.ShapeDtypeStruct((1, size, size, 3), np.float32)
    shapes = jax.eval_shape(tail.init, jax.random.key(0), image)["params"]
    return tail, shapes


def load_run(folder: str | Path, weights: str | None = None, stage="last") -> Run:
    """Classes, trunk and trained tail of a run folder, from its first or last stage."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"run folder {folder} does not exist")
    config = read_config(folder, weights)
    classes = read_json(folder / "classes.json", "class list")
    chosen, cut = stage_of(folder, stage)
    config.model.cut = cut or config.model.cut

    if config.model.cut == INPUT_CUT:
        trunk, trunk_params = None, None
        tail, like = whole_network(config, len(classes))
    else:
        check_weights_readable(config, folder)
        split = build.split_network(config, len(classes))
        check_same_trunk(folder, config, split)
        trunk, trunk_params = split.trunk, split.trunk_params
        tail, like = split.tail, split.tail_params

    tail_params = restore_tail(chosen, like)
    log.info("predicting with %s (cut %s)", chosen / "checkpoint", config.model.cut)
    return Run(
        folder,
        chosen,
        config,
        classes,
        config.model.cut,
        trunk,
        trunk_params,
        tail,
        tail_params,
    )


def visible(name: str) -> bool:
    return not data.is_hidden(Path(name))


def walk(folder: Path) -> list[Path]:
    """Image files under `folder` at any depth, by vtl.data's rules, sorted."""
    found = []
    for parent, folders, files in os.walk(folder):
        folders[:] = sorted(f for f in folders if visible(f))
        found += [
            Path(parent) / f
            for f in sorted(files)
            if visible(f) and Path(f).suffix.lower() in data.IMAGE_SUFFIXES
        ]
    return found


def image_paths(inputs: list[str]) -> list[Path]:
    """Files named on the command line as they are, folders walked for images."""
    paths = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            images = walk(path)
            if not images:
                log.warning(
                    "%s: folder holds no image files (looked for %s)",
                    path,
                    sorted(data.IMAGE_SUFFIXES),
                )
            paths += images
        else:
            # A file named explicitly is tried whatever its suffix: decoding goes by
            # content, and one that is missing or unreadable is reported by name.
            paths.append(path)
    return paths


def make_steps(run: Run, batch_size: int):
    """The jitted trunk (sharded as in the trunk pass) and tail, and the batch size."""
    n_devices = jax.device_count()
    batch_size = -(-batch_size // n_devices) * n_devices

    @jax.jit
    def tail_step(params, inputs):
        return jax.nn.softmax(run.tail.apply({"params": params}, inputs))

    if run.trunk is None:
        return lambda images: np.asarray(tail_step(run.tail_params, images)), batch_size

    def trunk_fn(params, images):
        return run.trunk.apply({"params": params}, images)[run.cut]

    trunk_step, trunk_params, sharded = features.compile_trunk(
        trunk_fn, run.trunk_params, batch_size
    )

    def step(images):
        cut_features = trunk_step(trunk_params, jax.device_put(images, sharded))
        # Like training, the tail reads the features back from the host.
        return np.asarray(tail_step(run.tail_params, np.asarray(cut_features)))

    return step, batch_size


def predict(run: Run, paths: list[Path], batch_size: int | None = None):
    """Class probabilities of every path, and which ones could be read."""
    step, batch_size = make_steps(run, batch_size or run.config.features.batch_size)
    size = run.config.data.image_size
    probabilities = np.zeros((len(paths), len(run.classes)), np.float32)
    valid = np.zeros(len(paths), bool)

    progress = tqdm(total=len(paths), desc="predict", unit="img", smoothing=0.1)
    batches = features.batch_loader(paths, size, batch_size)
    for start, (images, ok) in zip(range(0, len(paths), batch_size), batches):
        count = min(batch_size, len(paths) - start)
        probabilities[start : start + count] = step(images)[:count]
        valid[start : start + count] = ok[:count]
        progress.update(count)
    progress.close()
    return probabilities, valid


def top_k(probabilities: np.ndarray, classes: list[str], k: int):
    """The `k` most probable (class, probability) pairs, most probable first."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(classes[i], float(probabilities[i])) for i in order]


def format_text(rows) -> str:
    return "".join(
        f"{name}  " + "  ".join(f"{label} {p:.4f}" for label, p in top) + "\n"
        for name, top in rows
    )


def format_json(rows, run: Run, unreadable: list[str]) -> str:
    predictions = [
        {"file": name, "top": [{"class": c, "probability": p} for c, p in top]}
        for name, top in rows
    ]
    document = {
        "run": str(run.folder),
        "checkpoint": str(run.stage / "checkpoint"),
        "classes": run.classes,
        "predictions": predictions,
        "unreadable": unreadable,
    }
    return json.dumps(document, indent=1) + "\n"


def format_csv(rows, k: int) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["file"]
    for rank in range(1, k + 1):
        header += [f"class_{rank}", f"probability_{rank}"]
    writer.writerow(header)
    for name, top in rows:
        writer.writerow([name] + [item for pair in top for item in pair])
    return buffer.getvalue()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vtl.predict", description=__doc__.strip().splitlines()[0]
    )
    parser.add_argument("run", help="run folder written by vtl.train")
    parser.add_argument("paths", nargs="+", help="image files or folders of them")
    parser.add_argument("--top-k", type=int, default=3, help="classes shown per image")
    parser.add_argument("--format", choices=FORMATS, default="text")
    parser.add_argument(
        "--batch-size", type=int, help="images per batch (default: features.batch_size)"
    )
    parser.add_argument(
        "--weights", help="the trunk's weights file, when it moved since training"
    )
    parser.add_argument(
        "--stage",
        choices=STAGES,
        default="last",
        help="with a fine-tuning stage, the tail of the last stage or of the first",
    )
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top-k: expected at least 1, got {args.top_k}")
    return args


def main(argv: list[str]) -> int:
    """Predict the images named in `argv`; 0 when at least one was predicted."""
    args = parse_args(argv)
    run = load_run(args.run, args.weights, args.stage)
    paths = image_paths(args.paths)
    probabilities, valid = predict(run, paths, args.batch_size)

    k = min(args.top_k, len(run.classes))
    rows = [
        (str(path), top_k(probabilities[i], run.classes, k))
        for i, path in enumerate(paths)
        if valid[i]
    ]
    unreadable = [str(path) for path, ok in zip(paths, valid) if not ok]
    if args.format == "json":
        sys.stdout.write(format_json(rows, run, unreadable))
    elif args.format == "csv":
        sys.stdout.write(format_csv(rows, k))
    else:
        sys.stdout.write(format_text(rows))

    if unreadable:
        log.warning("%d of %d files could not be read", len(unreadable), len(paths))
    if not rows:
        log.error("no image was predicted (%d inputs)", len(paths))
        return 1
    return 0


def cli(argv: list[str]) -> int:
    run.configure_logging()
    try:
        return main(argv)
    except (FileNotFoundError, ValueError, KeyError) as error:
        log.error("%s", error.args[0] if error.args else error)
        return 1


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
