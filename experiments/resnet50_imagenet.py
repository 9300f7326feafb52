"""ResNet-50 on ImageNet (ILSVRC 2012) at 224x224, for a multi-accelerator run.

The recipe of the Flax ImageNet example: SGD with Nesterov momentum, learning rate 0.1 per 256
images with 5 warm-up epochs and cosine decay, bfloat16 compute. The ImageNet files must be
prepared for tfds beforehand (manual download); see the README.
"""

from cnn_jax.config import default_config


def get_config():
    config = default_config()
    config.experiment = "resnet50_imagenet"
    config.model.name = "resnet50"
    config.dataset.name = "imagenet2012"
    config.dataset.feeder = "streaming"
    config.dataset.image_size = 224
    config.dataset.flip = True
    config.train.batch_size = 1024
    config.train.eval_batch_size = 1024
    config.train.num_epochs = 90
    config.train.half_precision = True
    config.train.label_smoothing = 0.1
    config.train.log_every_steps = 100
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.1 * 1024 / 256
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = True
    config.optimizer.weight_decay = 1e-4
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_epochs = 5.0
    config.checkpoint.every_steps = 2000
    return config
