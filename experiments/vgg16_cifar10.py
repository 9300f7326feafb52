"""VGG-16 (with batch norm) on CIFAR-10, for a real GPU/TPU run."""

from cnn_jax.config import default_config


def get_config():
    config = default_config()
    config.experiment = "vgg16_cifar10"
    config.model.name = "vgg16_bn"
    config.dataset.name = "cifar10"
    config.dataset.crop_padding = 4
    config.dataset.flip = True
    config.train.batch_size = 128
    config.train.num_epochs = 160
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.05
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = True
    config.optimizer.weight_decay = 5e-4
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_epochs = 1.0
    return config
