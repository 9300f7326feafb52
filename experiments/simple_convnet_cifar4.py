"""The CNN guides' small ConvNet on four CIFAR-10 classes: bird, cat, dog, ship."""

from cnn_jax.config import default_config


def get_config():
    config = default_config()
    config.experiment = "simple_convnet_cifar4"
    config.model.name = "simple_convnet"
    config.dataset.name = "cifar10"
    config.dataset.classes = [2, 3, 5, 8]  # bird, cat, dog, ship -> labels 0..3
    config.dataset.crop_padding = 4
    config.dataset.flip = True
    config.train.batch_size = 128
    config.train.num_epochs = 40
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.schedule = "cosine"
    return config
