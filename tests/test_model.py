"""The Flax VGG: layer names, ranges, and a trunk/tail split that composes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtl import model


def test_layer_names_follow_keras():
    names = model.layer_names("vgg19")
    assert names[:3] == ["block1_conv1", "block1_conv2", "block1_pool"]
    assert "block3_conv4" in names and "block3_conv4" not in model.layer_names("vgg16")
    assert names[-4:] == ["flatten", "fc1", "fc2", "predictions"]
    assert len(model.weighted_layers("vgg16")) == 16
    assert len(model.weighted_layers("vgg19")) == 19


def test_unknown_cut_lists_valid_names():
    with pytest.raises(ValueError, match="block6_pool.*block5_pool"):
        model.layer_after("vgg16", "block6_pool")


def test_trunk_then_tail_equals_whole_network():
    whole = model.VGG("vgg16", width=1 / 16, num_classes=5)
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3)) * 50
    params = whole.init(jax.random.key(0), images)["params"]

    cut = "block4_pool"
    trunk = model.VGG("vgg16", 1 / 16, 5, stop=cut, capture=(cut, "block3_pool"))
    tail = model.VGG("vgg16", 1 / 16, 5, start=model.layer_after("vgg16", cut))
    trunk_names = model.weighted_layers("vgg16", None, cut)
    outputs = trunk.apply({"params": {n: params[n] for n in trunk_names}}, images)
    tail_params = {n: v for n, v in params.items() if n not in trunk_names}
    logits = tail.apply({"params": tail_params}, outputs[cut])

    expected = whole.apply({"params": params}, images)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert outputs["block3_pool"].shape == (2, 4, 4, 16)
    assert outputs[cut].shape == (2, 2, 2, 32)


def test_width_scales_every_layer():
    params = jax.eval_shape(
        model.VGG("vgg19", width=0.25, num_classes=3).init,
        jax.random.key(0),
        jnp.zeros((1, 32, 32, 3)),
    )["params"]
    assert params["block1_conv1"]["kernel"].shape == (3, 3, 3, 16)
    assert params["block5_conv4"]["kernel"].shape == (3, 3, 128, 128)
    assert params["fc1"]["kernel"].shape == (128, 1024)
    assert params["predictions"]["kernel"].shape == (1024, 3)
