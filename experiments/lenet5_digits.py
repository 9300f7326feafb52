"""LeNet-5 on scikit-learn's handwritten digits (8x8, 1,797 images), resized to 32x32.

The main job (`make run`): real data embedded in a dependency, so it runs offline, in well
under two minutes on two CPU cores. LeNet-5's layer shapes (32x32 input, 61,706 parameters)
with the modern ReLU + max pooling, and small random shifts (crop after 2-pixel padding) as
augmentation: the 1,437 training images are few, and without it the test accuracy plateaus
near 97%.
"""

from cnn_jax.config import default_config


def get_config():
    config = default_config()
    config.experiment = "lenet5_digits"
    config.model.name = "lenet5"
    config.model.options.first_padding = "VALID"  # the original 32x32 input, no padding
    config.model.options.act = "relu"
    config.model.options.pooling = "max"
    config.dataset.name = "digits"
    config.dataset.image_size = 32
    config.dataset.crop_padding = 2
    config.train.batch_size = 64
    config.train.num_epochs = 15
    config.train.log_every_steps = 11  # twice per epoch (22 steps)
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 3e-3
    config.optimizer.schedule = "cosine"
    return config
