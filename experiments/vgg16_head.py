"""The head recipe with VGG16: the trunk frozen up to block5_pool, fc1, fc2 and a new
softmax layer trained for 100 epochs (RMSprop 1e-4, batch 32) on cached features.

    python -m vtl.train experiments/vgg16_head.py data.root=PHOTOS \
        model.weights=vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5

On the 392 vehicle photos of four classes this reaches about 0.9 test accuracy.
"""

from vtl.config import defaults


def get_config():
    config = defaults()
    config.workdir = "runs/vgg16_head"
    config.model.name = "vgg16"
    config.model.weights = "imagenet"
    config.model.cut = "block5_pool"
    return config
