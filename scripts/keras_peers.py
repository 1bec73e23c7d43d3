"""The Keras side of the vtl benchmark: a frozen VGG16 trunk and a trained head.

    python scripts/keras_peers.py --photos ../shared/data/vehicles4 --size 224 \
        --epochs 2 --precision float32,bfloat16 \
        --weights ../shared/weights/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5

Without --photos it trains on random images. Prints one JSON line per result:
`recipe_way` (the whole model fitted on images), `features_first` (trunk once, head
fitted on stored features) and `trunk_rate` (trunk images per second).
"""

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import cv2
import keras
import numpy as np
import tensorflow as tf

log = logging.getLogger("keras_peers")

BATCH = 32
LEARNING_RATE = 1e-4
JOB_EPOCHS = 100
# keras.applications.vgg16.preprocess_input ("caffe"): BGR order, these means
# subtracted, no scaling.
IMAGENET_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
SYNTHETIC_CLASSES = 4
SYNTHETIC_IMAGES = 256
TEST_SHARE = 0.1

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"keras_peers measures Keras on TensorFlow; KERAS_BACKEND is "
        f"{keras.backend.backend()!r}"
    )


class EpochTimer(keras.callbacks.Callback):
    """Wall-clock seconds of every epoch, the first one (graph building) included."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._started)


def prepare_tensorflow(precision: str) -> None:
    """Fresh Keras state, seed 0, and the dtype policy of `precision`."""
    if precision not in POLICIES:
        raise ValueError(f"precision must be one of {sorted(POLICIES)}: {precision!r}")

    # By default TensorFlow reserves almost all GPU memory at its first op, which
    # would hide the real peak from the caller and starve JAX in the same process.
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass  # TensorFlow has used the GPU already; the first call set it.

    # Earlier models stay in the graph and in memory until the session is cleared.
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy(POLICIES[precision])


def build_trunk(size: int, weights: str | None) -> keras.Model:
    """The frozen VGG16 convolutional trunk, pretrained when `weights` is a path."""
    trunk = keras.applications.VGG16(
        include_top=False, weights=None, input_shape=(size, size, 3)
    )
    if weights is not None:
        trunk.load_weights(weights)
    for layer in trunk.layers:
        layer.trainable = False
    return trunk


def add_head(features, num_classes: int):
    """Flatten, fc1, fc2 and softmax predictions on top of `features`."""
    x = keras.layers.Flatten(name="flatten")(features)
    x = keras.layers.Dense(4096, activation="relu", name="fc1")(x)
    x = keras.layers.Dense(4096, activation="relu", name="fc2")(x)
    # Kept in float32 under mixed precision so the softmax and the loss are stable.
    return keras.layers.Dense(
        num_classes, activation="softmax", dtype="float32", name="predictions"
    )(x)


def compile_for_training(model: keras.Model) -> keras.Model:
    model.compile(
        optimizer=keras.optimizers.RMSprop(learning_rate=LEARNING_RATE),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def fit_timed(model, train_x, train_y, test_x, test_y, epochs, setup_seconds=0.0):
    """Fit for `epochs`, timing each epoch, then evaluate on the test split.

    `setup_seconds` is work done before the first epoch that every job repeats.
    """
    timer = EpochTimer()
    history = model.fit(
        train_x, train_y, batch_size=BATCH, epochs=epochs, callbacks=[timer], verbose=0
    )

    scores = model.evaluate(
        test_x, test_y, batch_size=BATCH, verbose=0, return_dict=True
    )
    return {
        **job_times(timer.seconds, setup_seconds),
        "train_loss": float(history.history["loss"][-1]),
        "test_loss": float(scores["loss"]),
        "test_accuracy": float(scores["accuracy"]),
        "jit_compile": bool(model.jit_compile),
    }


def job_times(seconds: list[float], setup_seconds: float = 0.0) -> dict:
    """Typical epoch time and the time of a 100-epoch job, from the epochs run."""
    # The first epoch builds (and under XLA compiles) the graphs: it is no sample
    # of a steady epoch, but it is part of every job.
    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
    extrapolated = len(seconds) < JOB_EPOCHS
    if extrapolated:
        job = seconds[0] + (JOB_EPOCHS - 1) * steady
    else:
        job = sum(seconds[:JOB_EPOCHS])
    return {
        "epoch_seconds": steady,
        "first_epoch_seconds": seconds[0],
        "job_seconds_100": setup_seconds + job,
        "extrapolated": extrapolated,
        "epochs_run": len(seconds),
    }


def describe(method: str, precision: str, train_x, test_x) -> dict:
    return {
        "method": method,
        "precision": precision,
        "size": int(train_x.shape[1]),
        "train_images": len(train_x),
        "test_images": len(test_x),
    }


def recipe_way(
    train_x, train_y, test_x, test_y, num_classes, weights, precision, epochs
) -> dict:
    """The usual recipe: one model fitted on images, the frozen trunk run anew on
    every image in every epoch."""
    prepare_tensorflow(precision)
    try:
        trunk = build_trunk(train_x.shape[1], weights)
        model = keras.Model(trunk.input, add_head(trunk.output, num_classes))
        compile_for_training(model)

        result = fit_timed(model, train_x, train_y, test_x, test_y, epochs)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return {**describe("recipe_way", precision, train_x, test_x), **result}


def warmup_images(images: np.ndarray) -> np.ndarray:
    """The fewest images whose batches have every shape a full pass will meet."""
    # Each new batch shape is traced again (and compiled again under XLA), so a
    # warm-up of one shape would leave the full batch or the last one to be built
    # inside the timed pass.
    full = min(len(images), BATCH)
    last = len(images) % BATCH if len(images) > BATCH else 0
    return images[: full + last]


def features_first(
    train_x, train_y, test_x, test_y, num_classes, weights, precision, epochs
) -> dict:
    """Keras done well: the trunk runs once, the head trains on stored features."""
    prepare_tensorflow(precision)
    try:
        trunk = build_trunk(train_x.shape[1], weights)
        images = np.concatenate([train_x, test_x])

        warmup = warmup_images(images)
        started = time.perf_counter()
        trunk.predict(warmup, batch_size=BATCH, verbose=0)
        warmup_seconds = time.perf_counter() - started

        started = time.perf_counter()
        features = trunk.predict(images, batch_size=BATCH, verbose=0)
        trunk_seconds = time.perf_counter() - started

        # Under mixed precision the trunk gives bfloat16; the head's input is float32.
        features = np.asarray(features, np.float32)

        inputs = keras.Input(features.shape[1:])
        head = compile_for_training(keras.Model(inputs, add_head(inputs, num_classes)))
        result = fit_timed(
            head,
            features[: len(train_x)],
            train_y,
            features[len(train_x) :],
            test_y,
            epochs,
            setup_seconds=trunk_seconds,
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")

    return {
        **describe("features_first", precision, train_x, test_x),
        **result,
        "trunk_seconds": trunk_seconds,
        "trunk_images_per_s": len(images) / trunk_seconds,
        "trunk_warmup_seconds": warmup_seconds,
        "trunk_warmup_images": len(warmup),
        "feature_shape": list(features.shape[1:]),
    }


def trunk_rate(size: int, batch: int, precision: str, seconds: float) -> dict:
    """Images per second of the VGG16 trunk on random images, after a warm-up."""
    prepare_tensorflow(precision)
    try:
        trunk = build_trunk(size, weights=None)
        images = np.random.default_rng(0).normal(0, 60, (batch, size, size, 3))
        images = images.astype(np.float32)

        # predict_on_batch runs Keras's own predict graph (XLA where Keras picks it)
        # and copies the result to the host, so each call is a finished batch.
        started = time.perf_counter()
        trunk.predict_on_batch(images)
        warmup_seconds = time.perf_counter() - started

        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or calls < 2:
            trunk.predict_on_batch(images)
            calls += 1
        elapsed = time.perf_counter() - started
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return {
        "method": "trunk_rate",
        "precision": precision,
        "size": size,
        "batch": batch,
        "images_per_s": calls * batch / elapsed,
        "calls": calls,
        "seconds": elapsed,
        "warmup_seconds": warmup_seconds,
        "jit_compile": bool(trunk.jit_compile),
    }


def class_files(root: Path, limit: int | None) -> tuple[list[str], list[tuple]]:
    """Class names (sorted folder names) and (path, label) pairs, `limit` at most."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    pairs = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).iterdir())
        if path.is_file() and not path.name.startswith(".")
    ]
    if not pairs:
        raise ValueError(f"{root}: expected class folders of images, found none")

    # A seeded shuffle, so that a small limit still draws from every class.
    order = np.random.default_rng(0).permutation(len(pairs))
    return classes, [pairs[i] for i in order[:limit]]


def read_image(path: Path, size: int) -> np.ndarray | None:
    """One photo as keras.applications.vgg16.preprocess_input gives it, or None."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)  # BGR, 8 bits, 3 channels
    if image is None:
        return None
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return image.astype(np.float32) - IMAGENET_MEAN_BGR


def load_photos(root: Path, size: int, limit: int | None):
    """Preprocessed images, labels and class names from a folder of class folders."""
    classes, pairs = class_files(root, limit)

    images, labels = [], []
    for path, label in pairs:
        image = read_image(path, size)
        if image is None:
            log.warning("%s: OpenCV cannot decode it; skipped", path)
            continue
        images.append(image)
        labels.append(label)
    return np.stack(images), np.array(labels, np.int32), classes


def synthetic_images(size: int, count: int):
    """Random images in the caffe value range and random labels."""
    rng = np.random.default_rng(0)
    images = rng.normal(0, 60, (count, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, SYNTHETIC_CLASSES, count).astype(np.int32)
    return images, labels, [f"class{i}" for i in range(SYNTHETIC_CLASSES)]


def split(images, labels):
    """A seeded 90/10 split: (train_x, train_y, test_x, test_y)."""
    if len(images) < 2:
        raise ValueError(f"need at least 2 images to split, found {len(images)}")
    order = np.random.default_rng(0).permutation(len(images))
    test_count = max(1, round(len(images) * TEST_SHARE))
    test, train = order[:test_count], order[test_count:]
    return images[train], labels[train], images[test], labels[test]


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, help="class folders; default random")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--limit", type=int, help="use at most this many images")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--precision", default="float32", help="e.g. float32,bfloat16")
    parser.add_argument("--weights", default="none", help="notop .h5 file, or none")
    parser.add_argument("--seconds", type=float, default=10.0, help="for trunk_rate")
    return parser.parse_args(argv)


def main(argv) -> int:
    args = parse_arguments(argv)
    # A handler of our own: one on the root logger would print TensorFlow's
    # warnings twice, once through its own handler and once through the root.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log.addHandler(handler)
    weights = None if args.weights.lower() == "none" else args.weights

    if args.photos is None:
        count = args.limit or SYNTHETIC_IMAGES
        images, labels, classes = synthetic_images(args.size, count)
    else:
        images, labels, classes = load_photos(args.photos, args.size, args.limit)
    data = split(images, labels)

    for precision in args.precision.split(","):
        for method in (recipe_way, features_first):
            result = method(*data, len(classes), weights, precision, args.epochs)
            print(json.dumps(result), flush=True)
        result = trunk_rate(args.size, BATCH, precision, args.seconds)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
