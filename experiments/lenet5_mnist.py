"""LeNet-5 (ReLU, max pooling; 61,706 parameters) on MNIST (28x28). Target: >= 99.0% test accuracy.

Needs MNIST prepared for tfds, offline: `cnn-jax data import mnist --from DIR_WITH_IDX_FILES`.
"""

from cnn_jax.config import default_config


def get_config():
    config = default_config()
    config.experiment = "lenet5_mnist"
    config.model.name = "lenet5"
    config.model.options.act = "relu"
    config.model.options.pooling = "max"
    config.dataset.name = "mnist"
    config.dataset.crop_padding = 2  # random shifts of up to 2 pixels
    config.train.batch_size = 128
    config.train.num_epochs = 12
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.schedule = "cosine"
    return config
