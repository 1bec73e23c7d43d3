"""A narrow VGG19 on 32×32 images with random weights: the whole job in seconds.

python -m vtl.train tests/tiny_experiment.py data.root=FOLDER workdir=RUN
"""

from vtl.config import defaults


def get_config():
    config = defaults()
    config.workdir = "runs/tiny"
    config.model.name = "vgg19"
    config.model.weights = "none"
    config.model.width = 1 / 16
    config.data.image_size = 32
    config.data.test_fraction = 0.25
    config.features.batch_size = 8
    config.train.epochs = 20
    config.train.batch_size = 8
    config.train.optimizer = "adam"
    config.train.learning_rate = 1e-2
    # A network this narrow has no capacity to spare for dropout.
    config.train.dropout = 0.0
    return config
