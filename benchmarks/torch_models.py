"""The benchmarked architectures written in PyTorch, layer for layer like `cnn_jax.models`.

Used only by the benchmarks (the optional `bench` extra: `pip install -e '.[bench]'`); `torch` is not
a dependency of the package. Images are NCHW here, as PyTorch expects. Parameter counts equal the JAX
models' (`benchmarks/train_throughput.py` asserts it before timing anything):

  lenet5          28x28x1,  10 classes:     61,706  (tanh, average pooling, first conv padded 2)
  simple_convnet  32x32x3,   4 classes:    356,036  (3x [3x3 conv, ReLU, 2x2 max pool], FC 128, dropout)
  vgg16           32x32x3,  10 classes: 134,301,514 (torchvision layout, 7x7 adaptive pool + 4096-4096 head)
  vgg16_bn        32x32x3,  10 classes: 134,309,962 (the same with BatchNorm, experiments/vgg16_cifar10.py)
  resnet18        32x32x3,  10 classes: 11,173,962  (CIFAR stem: 3x3 conv, no max pool)
  resnet50        224x224x3, 1000 classes: 25,557,032
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import nn


class LeNet5(nn.Module):
    """conv 6@5x5 (pad 2) -> tanh -> avgpool 2 -> conv 16@5x5 -> tanh -> avgpool 2 -> 120 -> 84 -> K."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, flat: int = 400):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 120), nn.Tanh(), nn.Linear(120, 84), nn.Tanh(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SimpleConvNet(nn.Module):
    """The guides' small ConvNet: 3x3 conv blocks (32, 64, 128) with max pooling, FC 128, dropout."""

    def __init__(
        self, num_classes: int = 4, in_channels: int = 3, image_size: int = 32,
        features: Sequence[int] = (32, 64, 128), hidden: int = 128, dropout_rate: float = 0.5,
    ):
        super().__init__()
        layers, c = [], in_channels
        for width in features:
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = width
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** len(features)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c * side * side, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout_rate), nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


class VGG(nn.Module):
    """torchvision's VGG: 3x3 conv + ReLU stages with max pooling, 7x7 adaptive pool, 4096-4096 head."""

    def __init__(
        self, num_classes: int = 1000, stages=VGG16_STAGES, dropout_rate: float = 0.5,
        batchnorm: bool = False,
    ):
        super().__init__()
        layers, c = [], 3
        for width, n in stages:
            for _ in range(n):
                layers.append(nn.Conv2d(c, width, 3, padding=1))
                if batchnorm:
                    layers.append(nn.BatchNorm2d(width))
                layers.append(nn.ReLU(inplace=True))
                c = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout_rate),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout_rate),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, filters: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, filters, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters)
        self.conv2 = nn.Conv2d(filters, filters, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(filters)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != filters:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, filters, 1, stride, bias=False), nn.BatchNorm2d(filters)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        r = x if self.downsample is None else self.downsample(x)
        return self.relu(y + r)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, filters: int, stride: int = 1):
        super().__init__()
        out = filters * 4
        self.conv1 = nn.Conv2d(cin, filters, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters)
        self.conv2 = nn.Conv2d(filters, filters, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(filters)
        self.conv3 = nn.Conv2d(filters, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        r = x if self.downsample is None else self.downsample(x)
        return self.relu(y + r)


class ResNet(nn.Module):
    """torchvision's ResNet (v1.5: the bottleneck strides in its 3x3 conv), optional CIFAR stem."""

    def __init__(self, block, stage_sizes: Sequence[int], num_classes: int = 1000, cifar_stem: bool = False):
        super().__init__()
        if cifar_stem:
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        blocks, cin = [], 64
        for stage, n in enumerate(stage_sizes):
            filters = 64 * 2**stage
            for b in range(n):
                blocks.append(block(cin, filters, 2 if stage > 0 and b == 0 else 1))
                cin = filters * block.expansion
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def get_torch_model(
    name: str, *, num_classes: int, input_shape: Sequence[int], cifar_stem: bool = False
) -> nn.Module:
    """The PyTorch twin of `cnn_jax.models.get_model(name, ...)` for an HWC `input_shape`."""
    h, w, c = input_shape
    if name == "lenet5":
        side_h, side_w = (h // 2 - 4) // 2, (w // 2 - 4) // 2
        return LeNet5(num_classes, c, 16 * side_h * side_w)
    if name == "simple_convnet":
        return SimpleConvNet(num_classes, c, h)
    if name in ("vgg16", "vgg16_bn"):
        return VGG(num_classes, batchnorm=name == "vgg16_bn")
    if name == "resnet18":
        return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, cifar_stem=cifar_stem)
    if name == "resnet50":
        return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, cifar_stem=cifar_stem)
    raise ValueError(f"no PyTorch twin for model {name!r}; have lenet5, simple_convnet, vgg16, vgg16_bn, resnet18, resnet50")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class TorchTrainBenchmark:
    """The PyTorch side of a throughput comparison, shaped like `cnn_jax.bench.TrainBenchmark`.

    Same work per step as the JAX engine's device-resident step: gather the batch of a random
    permutation from a resident uint8 split, normalise it, forward, cross-entropy, backward, Adam.
    CPU: eager, float32, NCHW, `torch.set_num_threads(threads)`. CUDA ("GPU mode"): bf16 autocast
    (AMP), channels_last and `torch.compile`.
    """

    def __init__(
        self, model_name: str, batch_size: int, steps: int, *, input_shape, num_classes: int,
        options: dict | None = None, device: str = "cpu", threads: int | None = None,
        compile: bool | None = None, seed: int = 0,
    ):
        torch.manual_seed(seed)
        self.threads = threads
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.gpu = self.device.type == "cuda"
        self.batch_size, self.steps = batch_size, steps
        model = get_torch_model(model_name, num_classes=num_classes, input_shape=input_shape,
                                **(options or {}))
        self.num_params = count_params(model)
        model = model.to(self.device)
        if self.gpu:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        self.opt = torch.optim.Adam(model.parameters(), 1e-3)
        self.compiled = self.gpu if compile is None else compile
        self.model = torch.compile(model) if self.compiled else model
        h, w, c = input_shape
        gen = torch.Generator().manual_seed(seed)
        n = steps * batch_size
        self.images = torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=gen).to(self.device)
        self.labels = torch.randint(0, num_classes, (n,), generator=gen).to(self.device)
        self.mean, self.std = 0.5 * 255, 0.25 * 255
        self.epoch = 0
        t0 = time.perf_counter()
        self._train(1)  # first step: allocations, oneDNN primitive creation, torch.compile
        self.first_call_seconds = time.perf_counter() - t0
        if steps > 1:
            self._train(steps - 1)

    def _sync(self, loss):
        if self.gpu:
            torch.cuda.synchronize(self.device)
        return float(loss.detach())

    def _train(self, num_steps: int) -> float:
        perm = torch.randperm(self.images.shape[0], device=self.device)
        b = self.batch_size
        loss = None
        for i in range(num_steps):
            idx = perm[i * b : (i + 1) * b]
            x = (self.images[idx].float() - self.mean) / self.std
            if self.gpu:
                x = x.contiguous(memory_format=torch.channels_last)
            y = self.labels[idx]
            self.opt.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.gpu):
                loss = nn.functional.cross_entropy(self.model(x), y)
            loss.backward()
            self.opt.step()
        return self._sync(loss)

    def run_window(self) -> float:
        if self.threads:  # several twins with different thread counts may alternate
            torch.set_num_threads(self.threads)
        t0 = time.perf_counter()
        loss = self._train(self.steps)
        seconds = time.perf_counter() - t0
        if not math.isfinite(loss):
            raise FloatingPointError(f"PyTorch benchmark loss is {loss}")
        return seconds
