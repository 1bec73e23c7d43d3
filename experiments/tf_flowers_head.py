"""The head recipe on tf_flowers from tensorflow-datasets: 3670 photos of 5 flowers.

    python -m vtl.train experiments/tf_flowers_head.py [data.tfds_dir=DIR]

tf_flowers must already be prepared in DIR (default $TFDS_DATA_DIR or
~/tensorflow_datasets); on a machine that is online, `tfds build tf_flowers` does it.
The first run writes its examples once as PNG files under ~/.cache/vtl/tfds; 10% of
each class is held out by data.split_seed (tfds slices work too:
data.tfds_train_split='train[:90%]' data.tfds_test_split='train[90%:]'). Classes
keep tfds' order: dandelion, daisy, tulips, sunflowers, roses. Its test accuracy has
not been measured yet; the trunk pass over 3670 photos takes about 15 minutes on a
2-core CPU and seconds on a GPU.
"""

from vtl.config import defaults


def get_config():
    config = defaults()
    config.workdir = "runs/tf_flowers_head"
    config.data.source = "tfds:tf_flowers"
    config.data.tfds_train_split = "train"
    config.data.tfds_test_split = ""
    config.model.name = "vgg19"
    config.model.weights = "imagenet"
    config.model.cut = "block5_pool"
    return config
