"""LeNet-5 on scikit-learn's handwritten digits (8x8, 1,797 images), resized to 32x32.

The main job (`make run`): real data embedded in a dependency, so it runs offline, in well
under two minutes on two CPU cores.
"""

from cnn_jax.config import default_config


def get_config():
    config = default_config()
    config.experiment = "lenet5_digits"
    config.model.name = "lenet5"
    config.dataset.name = "digits"
    config.dataset.image_size = 32  # LeNet-5's original input size...
    config.model.options.first_padding = "VALID"  # ...and its classic layer shapes (61,706 parameters)
    config.train.batch_size = 32
    config.train.num_epochs = 30
    config.train.log_every_steps = 20
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.schedule = "cosine"
    return config
