"""The Keras recipe, done properly: VGG19 ImageNet trunk frozen, the head trained.

    python -m vtl.train experiments/vgg19_head.py data.root=PHOTOS

The trunk runs once up to block5_pool and its features are kept; fc1, fc2 and a new
softmax layer train for 100 epochs with RMSprop at 1e-4, batch 32, on 90% of the photos.
On four classes of a few hundred vehicle photos expect a test accuracy near 0.9.
"""

from vtl.config import defaults


def get_config():
    config = defaults()
    config.workdir = "runs/vgg19_head"
    config.model.name = "vgg19"
    config.model.weights = "imagenet"
    config.model.cut = "block5_pool"
    return config
