"""Run an experiment: `python -m vtl.train EXPERIMENT.py [dotted.field=value ...]`.

Stages: data, weights, trunk pass (or the feature store), tail training, evaluation.
Everything the run produces goes to one run folder, `config.workdir`.
"""

import logging
import sys
import time
from pathlib import Path

import jax
import numpy as np

from vtl import build, data, features, finetune, model, run, tail, tfds_source
from vtl import config as configs

log = logging.getLogger("vtl.train")


def feature_key(config, dataset: data.Dataset, split: build.Split) -> dict:
    """Everything but the cut that changes the trunk's outputs, for the fingerprint."""
    # A tfds source adds its name, version and splits; a folder's key stays as it was.
    source = getattr(dataset, "source", None)
    return {
        **({"source": source} if source else {}),
        "weights": split.weights_key,
        "arch": config.model.name,
        "width": config.model.width,
        "image_size": config.data.image_size,
        "preprocessing": data.PREPROCESSING,
        "compute_dtype": np.dtype(split.trunk.dtype).name,
        "files": features.dataset_digest(dataset.paths(), dataset.files),
    }


def cached_features(config, dataset: data.Dataset, split: build.Split):
    """Trunk outputs at the cut for every image (float32), from the store or a pass."""
    cut = config.model.cut
    extra = [name for name in config.features.extra_cuts if name != cut]
    frozen = model.layer_range(config.model.name, None, cut)
    beyond = [name for name in extra if name not in frozen]
    if beyond:
        raise ValueError(
            f"features.extra_cuts: {beyond} are not in the trunk, which ends at "
            f"model.cut={cut}; expected layers among {frozen}"
        )
    # One pass stores every cut; a later run cut at one of them reuses the store.
    trunk = split.trunk.clone(capture=(cut, *extra))

    def trunk_fn(params, images):
        return trunk.apply({"params": params}, images)

    arrays, valid, record = features.features(
        config.features.dir,
        feature_key(config, dataset, split),
        trunk_fn,
        split.trunk_params,
        dataset.paths(),
        [cut, *extra],
        config.data.image_size,
        config.features.batch_size,
        config.features.dtype,
    )
    return features.as_float32(arrays[cut]), valid, record


def subset(indices, valid, features_at_cut, labels):
    """Rows of a split whose image decoded, as arrays ready for training."""
    kept = indices[valid[indices]]
    return np.asarray(features_at_cut[kept]), np.asarray(labels[kept])


class Clock:
    """Wall time of each named stage of a run."""

    def __init__(self):
        self.started = self.last = time.perf_counter()
        self.stages = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name] = round(now - self.last, 2)
        self.last = now

    def total(self) -> dict:
        return {**self.stages, "total": round(time.perf_counter() - self.started, 2)}


def load_dataset(config, folder) -> data.Dataset:
    """The photos, their classes and split, saved to the run folder."""
    if config.data.source.startswith(tfds_source.PREFIX):
        dataset = tfds_source.load_dataset(config)
    elif config.data.source == "folder":
        if not config.data.root:
            raise ValueError(
                "data.root: not set; expected the photo folder, as in "
                "data.root=PATH/TO/PHOTOS"
            )
        dataset = data.load_folder_dataset(
            config.data.root, config.data.test_fraction, config.data.split_seed
        )
    else:
        raise ValueError(
            f"data.source: expected folder or tfds:NAME, found {config.data.source!r}"
        )
    if len(dataset.test) == 0:
        raise ValueError(
            "data.test_fraction is 0 and there is no ROOT/test folder: "
            "nothing to evaluate on"
        )
    run.write_json(folder / "classes.json", dataset.classes)
    data.save_split(dataset, folder / "split.json")
    return dataset


def report_skipped(dataset: data.Dataset, valid: np.ndarray) -> list[str]:
    skipped = [dataset.files[i] for i in np.flatnonzero(~valid)]
    if skipped:
        log.warning(
            "%d files could not be decoded and were skipped: %s", len(skipped), skipped
        )
    return skipped


def resumable(config, folder, stage: str) -> tail.Resume:
    """Training state in the run folder, tied to this exact config and stage."""
    identity = features.fingerprint({"config": config.to_dict(), "stage": stage})
    return tail.Resume(
        folder / "train_state",
        identity,
        config.train.checkpoint_every,
        config.train.checkpoint_minutes,
    )


def head_stage(config, dataset, split, folder, clock) -> dict:
    """Trunk once (or the feature store), then the tail on the stored features."""
    cut_features, valid, record = cached_features(config, dataset, split)
    skipped = report_skipped(dataset, valid)
    clock.lap("trunk")

    train_set = subset(dataset.train, valid, cut_features, dataset.labels)
    test_set = subset(dataset.test, valid, cut_features, dataset.labels)
    params, history, probabilities = tail.train(
        split.tail.apply,
        split.tail_params,
        train_set,
        test_set,
        config,
        on_epoch=lambda row: run.append_metrics(folder, row),
        resume=resumable(config, folder, config.train.mode),
    )
    clock.lap("train")
    feature_store = {"status": record["status"], "fingerprint": record["fingerprint"]}
    return {
        "params": params,
        "whole": {**split.trunk_params, **params},
        "cut": config.model.cut,
        "history": history,
        "probabilities": probabilities,
        "kept_test": dataset.test[valid[dataset.test]],
        "skipped": skipped,
        "train_count": len(train_set[1]),
        "feature_store": feature_store,
    }


def end_to_end_stage(config, dataset, held, params, cut, hyper, folder, clock, name):
    """Every layer after `cut` trained through the frozen trunk, images augmented."""
    images, valid = held
    skipped = report_skipped(dataset, valid)
    train_index = dataset.train[valid[dataset.train]]
    test_index = dataset.test[valid[dataset.test]]
    folder.mkdir(parents=True, exist_ok=True)

    # Test photos are read exactly as the trunk pass reads them, not from the
    # rounded uint8 copies that augmentation works on.
    paths, size = dataset.paths(), config.data.image_size
    test_images = np.stack([data.load_image(paths[i], size) for i in test_index])
    test_set = test_images, dataset.labels[test_index]
    whole, history, probabilities = finetune.train(
        config,
        params,
        cut,
        hyper,
        images,
        dataset.labels,
        train_index,
        test_set,
        on_epoch=lambda row: run.append_metrics(folder, row),
        resume=resumable(config, folder, name),
    )
    clock.lap(name)
    _, trained = finetune.split_params(config.model.name, whole, cut)
    return {
        "params": trained,
        "whole": whole,
        "cut": cut,
        "history": history,
        "probabilities": probabilities,
        "kept_test": test_index,
        "skipped": skipped,
        "train_count": len(train_index),
    }


def finish_stage(folder, dataset, result) -> dict:
    """Checkpoint, plots and test results of one stage; its part of the summary."""
    run.save_params(folder, result["params"])
    run.write_json(
        folder / "stage.json",
        {"cut": result["cut"], "layers": sorted(result["params"])},
    )
    run.plot_history(folder, result["history"])
    run.save_test_results(folder, dataset, result["kept_test"], result["probabilities"])

    labels = dataset.labels[result["kept_test"]]
    predicted = result["probabilities"].argmax(-1)
    history = result["history"]
    return {
        "test_accuracy": float((predicted == labels).mean()),
        "test_correct": int((predicted == labels).sum()),
        "test_loss": history[-1]["test_loss"],
        "train_accuracy": history[-1]["accuracy"],
        "cut": result["cut"],
        "trainable_parameters": int(
            sum(np.size(leaf) for leaf in jax.tree.leaves(result["params"]))
        ),
        "confusion_matrix": run.confusion_matrix(
            labels, predicted, len(dataset.classes)
        ),
        "seconds_per_epoch": round(float(np.mean([r["seconds"] for r in history])), 3),
    }


def absolute_paths(config) -> None:
    """Make the config's paths absolute, so the saved config works from anywhere."""

    def absolute(text):
        return str(Path(text).expanduser().resolve())

    if config.data.root:
        config.data.root = absolute(config.data.root)
    if config.model.weights not in ("imagenet", "none"):
        config.model.weights = absolute(config.model.weights)
    config.features.dir = absolute(config.features.dir)
    if config.data.get("tfds_dir"):
        config.data.tfds_dir = absolute(config.data.tfds_dir)


def main(experiment: str, overrides: list[str]) -> dict:
    """Run one experiment end to end and return its summary."""
    config = configs.resolve(experiment, overrides)
    if config.train.mode not in ("cached", "end_to_end"):
        raise ValueError(
            f"train.mode: expected cached or end_to_end, got {config.train.mode!r}"
        )
    absolute_paths(config)
    folder = run.start(config.workdir, config)
    clock = Clock()

    dataset = load_dataset(config, folder)
    clock.lap("data")
    split = build.split_network(config, len(dataset.classes))
    clock.lap("weights")

    held = None
    if config.train.mode == "cached":
        first = head_stage(config, dataset, split, folder, clock)
    else:
        held = finetune.hold_images(dataset.paths(), config.data.image_size)
        clock.lap("decode")
        whole = {**split.trunk_params, **split.tail_params}
        first = end_to_end_stage(
            config,
            dataset,
            held,
            whole,
            config.model.cut,
            config.train,
            folder,
            clock,
            "train",
        )
    results = {config.train.mode: finish_stage(folder, dataset, first)}
    final = first

    if config.finetune.cut:
        held = held or finetune.hold_images(dataset.paths(), config.data.image_size)
        final = end_to_end_stage(
            config,
            dataset,
            held,
            first["whole"],
            config.finetune.cut,
            config.finetune,
            folder / "finetune",
            clock,
            "finetune",
        )
        results["finetune"] = finish_stage(folder / "finetune", dataset, final)
    clock.lap("save")

    last = list(results.values())[-1]
    summary = {
        **last,
        "classes": dataset.classes,
        "counts": {
            "train": final["train_count"],
            "test": len(final["kept_test"]),
            "skipped": len(final["skipped"]),
        },
        "skipped_files": final["skipped"],
        "fresh_layers": split.fresh_layers,
        "weights": split.weights_key,
        "feature_store": first.get("feature_store"),
        "stage_results": results,
        "stages": clock.total(),
    }
    run.write_json(folder / "summary.json", summary)
    log.info(
        "test accuracy %.4f (%d/%d); run folder %s",
        last["test_accuracy"],
        last["test_correct"],
        len(final["kept_test"]),
        folder,
    )
    return summary


def cli(argv: list[str]) -> int:
    run.configure_logging()
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
