"""ResNet-18 with the CIFAR stem (3x3 conv, no max-pool) on CIFAR-10, for a real GPU/TPU run."""

from cnn_jax.config import default_config


def get_config():
    config = default_config()
    config.experiment = "resnet18_cifar10"
    config.model.name = "resnet18"
    config.model.options.cifar_stem = True
    config.dataset.name = "cifar10"
    config.dataset.crop_padding = 4
    config.dataset.flip = True
    config.train.batch_size = 128
    config.train.num_epochs = 200
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = True
    config.optimizer.weight_decay = 5e-4
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_epochs = 1.0
    return config
