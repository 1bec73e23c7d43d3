"""Flax VGG16 and VGG19, NHWC, with the layer names Keras gives them.

A network is an ordered list of named layers; any contiguous range of it can be built
as a module, which is how the frozen trunk and the trained tail are split at a cut.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

BLOCK_DEPTHS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
BLOCK_FEATURES = (64, 128, 256, 512, 512)
FC_FEATURES = 4096

# Keras initialises new layers with Glorot-uniform kernels and zero biases; doing the
# same keeps a "weights=none" run comparable with the Keras recipe.
KERNEL_INIT = nn.initializers.glorot_uniform()


@dataclasses.dataclass(frozen=True)
class Layer:
    """One named layer: its kind ("conv", "pool", "flatten", "dense") and width."""

    name: str
    kind: str
    features: int = 0


def network(
    arch: str, width: float = 1.0, num_classes: int = 1000
) -> tuple[Layer, ...]:
    """The layers of `arch` in order, with `width` scaling every conv and fc layer."""
    if arch not in BLOCK_DEPTHS:
        raise ValueError(
            f"model.name: expected one of {sorted(BLOCK_DEPTHS)}, got {arch!r}"
        )

    def scaled(n):
        return max(1, round(n * width))

    layers = []
    for block, (depth, features) in enumerate(
        zip(BLOCK_DEPTHS[arch], BLOCK_FEATURES), 1
    ):
        for i in range(1, depth + 1):
            layers.append(Layer(f"block{block}_conv{i}", "conv", scaled(features)))
        layers.append(Layer(f"block{block}_pool", "pool"))

    layers += [
        Layer("flatten", "flatten"),
        Layer("fc1", "dense", scaled(FC_FEATURES)),
        Layer("fc2", "dense", scaled(FC_FEATURES)),
        Layer("predictions", "dense", num_classes),
    ]
    return tuple(layers)


def layer_names(arch: str) -> list[str]:
    """Keras layer names of `arch`, input to output."""
    return [layer.name for layer in network(arch)]


def layer_index(arch: str, name: str, field: str = "cut") -> int:
    """Position of layer `name` in `arch`, with an error that lists the valid names."""
    names = layer_names(arch)
    if name not in names:
        raise ValueError(
            f"{field}: {name!r} is not a layer of {arch}; expected one of {names}"
        )
    return names.index(name)


def layer_range(arch: str, start: str | None, stop: str) -> list[str]:
    """Names from `start` (None: the first layer) to `stop`, both included."""
    names = layer_names(arch)
    first = 0 if start is None else layer_index(arch, start, "start")
    last = layer_index(arch, stop, "stop")
    if first > last:
        raise ValueError(
            f"layer range is empty: {start!r} comes after {stop!r} in {arch}"
        )
    return names[first : last + 1]


def layer_after(arch: str, cut: str) -> str:
    """The first layer of the tail for a given cut."""
    names = layer_names(arch)
    index = layer_index(arch, cut)
    if index + 1 == len(names):
        raise ValueError(
            f"cut: {cut!r} is the last layer of {arch}; nothing is left to train"
        )
    return names[index + 1]


def weighted_layers(arch: str, start: str | None = None, stop: str = "predictions"):
    """Names of the layers in a range that carry parameters."""
    kinds = {layer.name: layer.kind for layer in network(arch)}
    return [n for n in layer_range(arch, start, stop) if kinds[n] in ("conv", "dense")]


class VGG(nn.Module):
    """A contiguous range of a VGG network, from `start` to `stop` inclusive.

    `capture` names layers whose outputs are returned as a dict (all of them must lie in
    the range); without it the output of `stop` is returned. `predictions` gives logits:
    the softmax belongs to the loss. `dropout` acts after fc1 and fc2 when `train` is
    true, as in VGG's own ImageNet training; Keras's models leave it out.
    """

    arch: str = "vgg19"
    width: float = 1.0
    num_classes: int = 1000
    start: str | None = None
    stop: str = "predictions"
    capture: tuple[str, ...] = ()
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False):
        layers = {
            layer.name: layer
            for layer in network(self.arch, self.width, self.num_classes)
        }
        names = layer_range(self.arch, self.start, self.stop)
        captured = {}

        for name in names:
            x = self.apply_layer(layers[name], x)
            if name in ("fc1", "fc2") and self.dropout > 0:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
            if name in self.capture:
                captured[name] = x

        missing = set(self.capture) - set(captured)
        if missing:
            raise ValueError(
                f"capture: layers {sorted(missing)} are outside {names[0]}..{names[-1]}"
            )
        return captured if self.capture else x

    def apply_layer(self, layer: Layer, x: jax.Array) -> jax.Array:
        if layer.kind == "conv":
            conv = nn.Conv(
                layer.features,
                (3, 3),
                padding="SAME",
                dtype=self.dtype,
                kernel_init=KERNEL_INIT,
                name=layer.name,
            )
            return nn.relu(conv(x))
        if layer.kind == "pool":
            return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        if layer.kind == "flatten":
            # NHWC flattened row-major is Keras's Flatten order, so fc1's kernel rows
            # from a Keras file line up without any permutation.
            return x.reshape((x.shape[0], -1))
        dense = nn.Dense(
            layer.features, dtype=self.dtype, kernel_init=KERNEL_INIT, name=layer.name
        )
        y = dense(x)
        return y if layer.name == "predictions" else nn.relu(y)
