"""Pretrained weights: torchvision's state dicts <-> this zoo's variables, and weight files.

Every torchvision classification model with a twin in `cnn_jax.models` (`TWINS`) converts both
ways, tensor for tensor::

    from cnn_jax import pretrained
    model, variables = pretrained.load_weights("resnet50.safetensors", "resnet50")
    logits = model.apply(variables, images_nhwc, train=False)   # torchvision's logits
    pretrained.save_safetensors(variables, "resnet50", "back.safetensors")  # torchvision names

The rules (`from_torchvision` / `to_torchvision`): conv weights OIHW <-> HWIO; linear weights
(out, in) <-> (in, out), the first fully connected layer of AlexNet / VGG with its rows permuted
between PyTorch's NCHW flatten order and this zoo's NHWC order; BatchNorm weight, bias,
running_mean, running_var <-> scale, bias (params) and mean, var (batch_stats);
`num_batches_tracked` and GoogLeNet's auxiliary heads are dropped on the way in. Every tensor is
accounted for: an unmapped, a missing or a mis-shaped tensor is a `DataError` that names it.

Files: `.safetensors` are read with the safetensors package's numpy API (no torch); `.pth` / `.pt`
files need torch and are read with `torch.load(weights_only=True)`. This package itself imports
only numpy, jax and flax (safetensors and torch when a file is read or written).
"""

from __future__ import annotations

from cnn_jax.pretrained.convert import (
    HEADS,
    TORCHVISION_OPTIONS,
    TWINS,
    from_torchvision,
    num_classes_of,
    to_torchvision,
)
from cnn_jax.pretrained.files import load_weights, read_state_dict, save_safetensors

__all__ = [
    "HEADS",
    "TORCHVISION_OPTIONS",
    "TWINS",
    "from_torchvision",
    "load_weights",
    "num_classes_of",
    "read_state_dict",
    "save_safetensors",
    "to_torchvision",
]
