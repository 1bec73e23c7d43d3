"""End-to-end fine-tuning: the tail reads images through the frozen trunk every step.

The trunk is a plain argument of the jitted step and its output passes through
`stop_gradient`, so no gradient is computed for it and the optimizer never sees it.
Images are decoded once and held in memory as uint8; each epoch augments them anew.
"""

import concurrent.futures
import logging
import os

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from vtl import data, model, tail

log = logging.getLogger(__name__)

INPUT = "input"


def hold_images(paths, size: int):
    """Decode and resize every file once: (uint8 RGB images, valid mask)."""

    def load(path):
        try:
            raw = data.decode(path.read_bytes(), str(path))
        except (OSError, data.ImageError) as error:
            log.warning("skipped: %s", error)
            return None
        return np.clip(np.rint(data.resize(raw, size)), 0, 255).astype(np.uint8)

    images = np.zeros((len(paths), size, size, 3), np.uint8)
    valid = np.zeros(len(paths), bool)
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        for i, image in enumerate(pool.map(load, paths)):
            if image is not None:
                images[i], valid[i] = image, True
    return images, valid


def random_resized_crop(image, rng: np.random.Generator, min_scale: float):
    """A crop holding [min_scale, 1] of the area, aspect 3:4 to 4:3, resized back."""
    size = image.shape[0]
    area = size * size * rng.uniform(min_scale, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    height = int(min(size, round(np.sqrt(area / ratio))))
    width = int(min(size, round(np.sqrt(area * ratio))))
    top = rng.integers(0, size - height + 1)
    left = rng.integers(0, size - width + 1)
    crop = image[top : top + height, left : left + width]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)


def augment(image, seed: int, epoch: int, index: int, settings):
    """One training image for one epoch: the same (seed, epoch, index), same pixels."""
    rng = np.random.default_rng([seed, epoch, index])
    if settings.crop_min_scale < 1.0:
        image = random_resized_crop(image, rng, settings.crop_min_scale)
    if settings.flip and rng.random() < 0.5:
        image = image[:, ::-1]
    return image


def to_inputs(images: np.ndarray) -> np.ndarray:
    """uint8 RGB images -> preprocessed float32, as the trunk expects."""
    return data.preprocess(images.astype(np.float32))


def split_params(arch: str, params: dict, cut: str):
    """The whole network's params cut in two: (trunk, tail)."""
    trunk_layers = [] if cut == INPUT else model.weighted_layers(arch, None, cut)
    trunk = {name: params[name] for name in trunk_layers}
    rest = {name: value for name, value in params.items() if name not in trunk}
    return trunk, rest


def make_forward(arch, width, num_classes, cut, dropout):
    """forward(tail params, trunk params, images, key) -> logits, through the cut."""
    start = None if cut == INPUT else model.layer_after(arch, cut)
    tail_module = model.VGG(arch, width, num_classes, start=start, dropout=dropout)
    trunk_module = None
    if cut != INPUT:
        trunk_module = model.VGG(arch, width, num_classes, stop=cut)

    def forward(params, frozen, images, key):
        x = images
        if trunk_module is not None:
            x = jax.lax.stop_gradient(trunk_module.apply({"params": frozen}, images))
        rngs = {"dropout": key} if key is not None else {}
        return tail_module.apply(
            {"params": params}, x, train=key is not None, rngs=rngs
        )

    return forward


def train(
    config,
    params,
    cut,
    hyper,
    images,
    labels,
    train_index,
    test_set,
    on_epoch,
    resume=None,
):
    """Train every layer after `cut` end to end; returns params, history, probabilities.

    `params` is the whole network's tree; the returned one is too, with the trunk's
    part untouched. `images` are the held uint8 photos that `train_index` picks from;
    `test_set` is (preprocessed float32 images, labels), exactly what the trunk pass
    would read, so evaluation matches the cached mode and prediction.
    """
    arch, seed = config.model.name, config.seed
    trunk, trainable = split_params(arch, params, cut)
    num_classes = trainable["predictions"]["kernel"].shape[-1]
    forward = make_forward(
        arch, config.model.width, num_classes, cut, config.train.dropout
    )
    log.info("end to end from cut %s: training %s", cut, sorted(trainable))

    test = jnp.asarray(test_set[0]), jnp.asarray(test_set[1])

    def train_batches(epoch):
        rng = np.random.default_rng([seed, epoch])
        for index, weight in tail.batches(len(train_index), hyper.batch_size, rng):
            rows = train_index[index]
            batch = np.stack(
                [augment(images[r], seed, epoch, int(r), config.augment) for r in rows]
            )
            yield (
                jnp.asarray(to_inputs(batch)),
                jnp.asarray(labels[rows]),
                np.arange(len(rows)),
                weight,
            )

    trained, history, probabilities = tail.fit(
        forward, trainable, trunk, train_batches, test, hyper, seed, on_epoch, resume
    )
    return {**trunk, **trained}, history, probabilities
