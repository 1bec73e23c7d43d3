"""Run an experiment: `python -m vtl.train EXPERIMENT.py [dotted.field=value ...]`.

Stages: data, weights, trunk pass (or the feature store), tail training, evaluation.
Everything the run produces goes to one run folder, `config.workdir`.
"""

import logging
import sys
import time

import numpy as np

from vtl import build, data, features, run, tail
from vtl import config as configs

log = logging.getLogger("vtl.train")


def feature_key(config, dataset: data.Dataset, split: build.Split) -> dict:
    """Everything that changes the trunk's outputs, for the store's fingerprint."""
    return {
        "weights": split.weights_key,
        "arch": config.model.name,
        "width": config.model.width,
        "cuts": [config.model.cut],
        "image_size": config.data.image_size,
        "preprocessing": data.PREPROCESSING,
        "dtype": "float32",
        "files": features.dataset_digest(dataset.paths(), dataset.files),
    }


def cached_features(config, dataset: data.Dataset, split: build.Split):
    """Trunk outputs at the cut for every image, from the store or a fresh pass."""
    cut = config.model.cut

    def trunk_fn(params, images):
        return split.trunk.apply({"params": params}, images)

    arrays, valid, record = features.features(
        config.features.dir,
        feature_key(config, dataset, split),
        trunk_fn,
        split.trunk_params,
        dataset.paths(),
        [cut],
        config.data.image_size,
        config.features.batch_size,
    )
    return arrays[cut], valid, record


def subset(indices, valid, features_at_cut, labels):
    """Rows of a split whose image decoded, as arrays ready for training."""
    kept = indices[valid[indices]]
    return np.asarray(features_at_cut[kept]), np.asarray(labels[kept])


def main(experiment: str, overrides: list[str]) -> dict:
    """Run one experiment end to end and return its summary."""
    config = configs.resolve(experiment, overrides)
    folder = run.start(config.workdir, config)
    stages, started = {}, time.perf_counter()

    def stage(name, since):
        stages[name] = round(time.perf_counter() - since, 2)
        return time.perf_counter()

    clock = time.perf_counter()
    dataset = data.load_folder_dataset(
        config.data.root, config.data.test_fraction, config.seed
    )
    if len(dataset.test) == 0:
        raise ValueError(
            "data.test_fraction is 0 and there is no ROOT/test folder: "
            "nothing to evaluate on"
        )
    run.write_json(folder / "classes.json", dataset.classes)
    data.save_split(dataset, folder / "split.json")
    clock = stage("data", clock)

    split = build.split_network(config, len(dataset.classes))
    clock = stage("weights", clock)

    cut_features, valid, record = cached_features(config, dataset, split)
    skipped = [dataset.files[i] for i in np.flatnonzero(~valid)]
    if skipped:
        log.warning(
            "%d files could not be decoded and were skipped: %s", len(skipped), skipped
        )
    clock = stage("trunk", clock)

    train_set = subset(dataset.train, valid, cut_features, dataset.labels)
    test_set = subset(dataset.test, valid, cut_features, dataset.labels)
    params, history, probabilities = tail.train(
        split.tail.apply,
        split.tail_params,
        train_set,
        test_set,
        config,
        on_epoch=lambda row: run.append_metrics(folder, row),
    )
    clock = stage("train", clock)

    run.save_params(folder, params)
    run.plot_history(folder, history)
    predicted = probabilities.argmax(-1)
    summary = {
        "test_accuracy": float((predicted == test_set[1]).mean()),
        "test_loss": history[-1]["test_loss"],
        "train_accuracy": history[-1]["accuracy"],
        "classes": dataset.classes,
        "confusion_matrix": run.confusion_matrix(
            test_set[1], predicted, len(dataset.classes)
        ),
        "counts": {
            "train": len(train_set[1]),
            "test": len(test_set[1]),
            "skipped": len(skipped),
        },
        "skipped_files": skipped,
        "fresh_layers": split.fresh_layers,
        "feature_store": {
            "status": record["status"],
            "fingerprint": record["fingerprint"],
        },
        "seconds_per_epoch": round(float(np.mean([r["seconds"] for r in history])), 3),
    }
    stage("save", clock)
    summary["stages"] = {**stages, "total": round(time.perf_counter() - started, 2)}
    run.write_json(folder / "summary.json", summary)
    log.info(
        "test accuracy %.4f (%d/%d); run folder %s",
        summary["test_accuracy"],
        int((predicted == test_set[1]).sum()),
        len(predicted),
        folder,
    )
    return summary


def cli(argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # Orbax and JAX report every checkpoint step at INFO; the run's own lines matter.
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    try:
        main(argv[0], argv[1:])
    except (FileNotFoundError, ValueError, KeyError, AttributeError) as error:
        log.error("%s", error.args[0] if error.args else error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
