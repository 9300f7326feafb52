"""LeNet-5 on Fashion-MNIST (28x28, ten clothing classes)."""

from cnn_jax.config import default_config


def get_config():
    config = default_config()
    config.experiment = "lenet5_fashion_mnist"
    config.model.name = "lenet5"
    config.model.options.act = "relu"
    config.model.options.pooling = "max"
    config.dataset.name = "fashion_mnist"
    config.dataset.flip = True  # clothes are left-right symmetric
    config.train.batch_size = 128
    config.train.num_epochs = 20
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.schedule = "cosine"
    return config
