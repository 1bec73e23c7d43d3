"""End-to-end training: frozen means frozen, augmentation is reproducible."""

import jax
import jax.numpy as jnp
import numpy as np

from vtl import config as configs
from vtl import finetune, model


def tiny_config(optimizer="adamw"):
    config = configs.defaults()
    config.model.width = 1 / 16
    config.data.image_size = 32
    config.train.optimizer = optimizer
    config.train.learning_rate = 1e-2
    config.train.epochs = 2
    config.train.batch_size = 4
    return config


def whole_params(config, num_classes=3):
    network = model.VGG(config.model.name, config.model.width, num_classes)
    image = jnp.zeros((1, 32, 32, 3))
    return network.init(jax.random.key(0), image)["params"]


def shade_images(count=12, size=32):
    rng = np.random.default_rng(0)
    labels = np.arange(count) % 3
    base = np.array([20, 120, 230])[labels][:, None, None, None]
    noise = rng.integers(-15, 15, (count, size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8), labels


def train_from(config, params, cut):
    """Nine shade images to train on, three to test on, end to end from `cut`."""
    images, labels = shade_images()
    test_set = finetune.to_inputs(images[9:]), labels[9:]
    return finetune.train(
        config,
        params,
        cut,
        config.train,
        images,
        labels,
        np.arange(9),
        test_set,
        on_epoch=None,
    )


def test_frozen_layers_are_bit_identical_and_trainable_ones_move():
    config = tiny_config("adamw")  # weight decay would move anything it saw
    params = whole_params(config)
    before = jax.tree.map(np.array, params)

    trained, history, probabilities = train_from(config, params, "block4_pool")

    for name in model.weighted_layers("vgg19", None, "block4_pool"):
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(trained[name][leaf], before[name][leaf])
    for name in ("block5_conv1", "fc1", "predictions"):
        assert not np.array_equal(trained[name]["kernel"], before[name]["kernel"]), name
    assert len(history) == 2 and probabilities.shape == (3, 3)


def test_cut_at_input_trains_every_layer():
    config = tiny_config("sgd")
    params = whole_params(config)
    trained, _, _ = train_from(config, params, "input")
    assert not np.array_equal(
        trained["block1_conv1"]["kernel"], params["block1_conv1"]["kernel"]
    )


def settings(flip=True, crop_min_scale=0.5):
    return configs.Config({"flip": flip, "crop_min_scale": crop_min_scale})


def test_augmentation_is_reproducible_from_the_seed():
    image = np.random.default_rng(1).integers(0, 255, (32, 32, 3)).astype(np.uint8)
    first = finetune.augment(image, 7, 3, 11, settings())
    again = finetune.augment(image, 7, 3, 11, settings())
    np.testing.assert_array_equal(first, again)

    other_epochs = [finetune.augment(image, 7, e, 11, settings()) for e in range(4, 8)]
    assert any(not np.array_equal(first, other) for other in other_epochs)
    assert first.shape == image.shape and first.dtype == np.uint8


def test_flip_alone_mirrors_or_keeps():
    image = np.random.default_rng(2).integers(0, 255, (8, 8, 3)).astype(np.uint8)
    outcomes = [
        finetune.augment(image, 0, e, 0, settings(True, 1.0)) for e in range(12)
    ]
    for out in outcomes:
        assert np.array_equal(out, image) or np.array_equal(out, image[:, ::-1])
    assert any(np.array_equal(out, image[:, ::-1]) for out in outcomes)


def test_no_augmentation_returns_the_image():
    image = np.random.default_rng(3).integers(0, 255, (8, 8, 3)).astype(np.uint8)
    out = finetune.augment(image, 0, 1, 0, settings(False, 1.0))
    np.testing.assert_array_equal(out, image)
