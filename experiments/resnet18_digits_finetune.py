"""ResNet-18 fine-tuned from torchvision's ImageNet weights on the embedded handwritten digits.

Runs offline once the weights file is on disk (one-time, with internet: the README's
'Pretrained weights'); `--set model.pretrained=FILE` points elsewhere. The 8x8 greyscale digits
are resized to 64x64; the RGB first convolution is summed over its input channels for them
(a grey image is R = G = B). The backbone is frozen (BatchNorm keeps its ImageNet statistics)
and only the new 10-class head trains, the cheapest fine-tuning on a CPU; for full fine-tuning
use `--set optimizer.freeze_backbone=False optimizer.backbone_lr_scale=0.1`.
"""

from cnn_jax.config import default_config


def get_config():
    config = default_config()
    config.experiment = "resnet18_digits_finetune"
    config.model.name = "resnet18"
    config.model.pretrained = "resnet18.safetensors"
    config.dataset.name = "digits"
    config.dataset.image_size = 64
    config.dataset.crop_padding = 4
    config.train.batch_size = 64
    config.train.num_epochs = 5
    config.train.log_every_steps = 11  # twice per epoch (22 steps)
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.schedule = "cosine"
    config.optimizer.freeze_backbone = True
    return config
