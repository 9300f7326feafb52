"""LeNet-5 on MNIST (28x28). Target: >= 99.0% test accuracy.

Needs MNIST prepared for tfds, offline: `cnn-jax data import mnist --from DIR_WITH_IDX_FILES`.
"""

from cnn_jax.config import default_config


def get_config():
    config = default_config()
    config.experiment = "lenet5_mnist"
    config.model.name = "lenet5"
    config.dataset.name = "mnist"
    config.train.batch_size = 128
    config.train.num_epochs = 12
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.schedule = "cosine"
    return config
