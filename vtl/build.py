"""Trunk and tail for a config: modules, parameters and where they came from."""

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp

from vtl import convert, model, weights

log = logging.getLogger(__name__)

FC_LAYERS = ("fc1", "fc2")


@dataclasses.dataclass
class Split:
    """A network cut in two, with the parameters of each side."""

    trunk: model.VGG
    trunk_params: dict
    tail: model.VGG
    tail_params: dict
    feature_shape: tuple
    fresh_layers: list
    weights_key: dict


def weights_file(config) -> Path | None:
    """The Keras weights file or converted folder a config names; None for random."""
    source = config.model.weights
    if source == "none":
        return None
    if source == "imagenet":
        # A cut at fc1 or fc2 freezes that layer, so it must come from the file too.
        need_top = config.model.fc_weights == "file" or config.model.cut in FC_LAYERS
        return weights.find_imagenet_file(config.model.name, need_top)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model.weights: {path} does not exist; expected imagenet, none, a Keras "
            f"weights file (.h5, .weights.h5, .keras) or a folder from vtl.convert"
        )
    return path


def fc_rules(config, tail_layers):
    """Which tail layers are always new (`replace`) and which may be (`optional`)."""
    choice = config.model.fc_weights
    if choice not in ("auto", "file", "fresh"):
        raise ValueError(
            f"model.fc_weights: expected auto, file or fresh, got {choice!r}"
        )
    if choice == "fresh" and config.model.cut in FC_LAYERS:
        raise ValueError(
            f"model.cut={config.model.cut} freezes that layer, so it must "
            f"come from the weights file; set model.fc_weights=auto or file, "
            f"or cut at block5_pool"
        )
    fc = [name for name in FC_LAYERS if name in tail_layers]
    replace = ("predictions",) + (tuple(fc) if choice == "fresh" else ())
    optional = tuple(fc) if choice == "auto" else ()
    return replace, optional


def split_network(config, num_classes: int) -> Split:
    """Build trunk and tail at `config.model.cut`, with weights as the config says."""
    arch, width, cut = config.model.name, config.model.width, config.model.cut
    size = config.data.image_size
    trunk = model.VGG(arch, width, num_classes, stop=cut, capture=(cut,))
    tail = model.VGG(
        arch,
        width,
        num_classes,
        start=model.layer_after(arch, cut),
        dropout=config.train.dropout,
    )

    key_trunk, key_tail = jax.random.split(jax.random.key(config.seed))
    image = jnp.zeros((1, size, size, 3), jnp.float32)
    feature_shape = jax.eval_shape(
        trunk.apply, jax.eval_shape(trunk.init, key_trunk, image), image
    )[cut].shape[1:]
    tail_params = tail.init(key_tail, jnp.zeros((1,) + feature_shape))["params"]

    replace, optional = fc_rules(config, tail_params)
    path = weights_file(config)
    if path is None:
        log.info(
            "weights: none; every layer is randomly initialised (seed %d)", config.seed
        )
        trunk_params = trunk.init(key_trunk, image)["params"]
        return Split(
            trunk,
            trunk_params,
            tail,
            tail_params,
            feature_shape,
            sorted(tail_params),
            {"source": "none", "seed": config.seed},
        )

    layers, source_digest = convert.read_source(path, arch)
    trunk_shapes = jax.eval_shape(trunk.init, key_trunk, image)["params"]
    trunk_params, _ = weights.assign(trunk_shapes, layers, arch, str(path))
    tail_params, fresh = weights.assign(
        tail_params, layers, arch, str(path), replace=replace, optional=optional
    )
    log.info(
        "weights: %s (%d layers loaded, fresh: %s)",
        path,
        len(trunk_params) + len(tail_params) - len(fresh),
        fresh,
    )
    # A converted folder keys the store by its Keras file, so the two share a store.
    key = {"source": "file", "sha256": source_digest}
    return Split(trunk, trunk_params, tail, tail_params, feature_shape, fresh, key)
