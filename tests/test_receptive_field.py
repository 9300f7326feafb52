"""cnn_jax.receptive_field: analytical receptive fields, checked by hand and against the input
gradient of one centre unit (its non-zero region is the empirical receptive field)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import fast_paths, layers
from cnn_jax.errors import ShapeError
from cnn_jax.models import DenseNet, get_model, model_options
from cnn_jax.models.summary import summary_rows
from cnn_jax.receptive_field import receptive_fields


def fields(model, shape):
    return {r.path: r for r in receptive_fields(model, shape)}


def triple(record):
    """(size, jump, start) of a square field."""
    (size, size_w), (jump, jump_w), (start, start_w) = record.size, record.jump, record.start
    assert (size, jump, start) == (size_w, jump_w, start_w), record
    return size, jump, start


# --------------------------------------------------------------------------------------------------
# By hand
# --------------------------------------------------------------------------------------------------


def test_lenet5_by_hand():
    # size += (k - 1) * jump; jump *= stride; start += ((k - 1) / 2 - pad_low) * jump.
    # 28x28, first conv SAME (pad 2): conv1 5x5 -> (5, 1, 0); pool 2x2 -> (6, 2, 0.5);
    # conv2 5x5 VALID -> (6 + 4*2, 2, 0.5 + 2*2) = (14, 2, 4.5); pool -> (16, 4, 4.5 + 1) = 5.5.
    rf = fields(get_model("lenet5", num_classes=10), (28, 28, 1))
    assert triple(rf["block1/conv1"]) == (5, 1, 0)
    assert triple(rf["block1/pool"]) == triple(rf["block1"]) == (6, 2, 0.5)
    assert triple(rf["block2/conv1"]) == (14, 2, 4.5)
    assert triple(rf["block2/pool"]) == (16, 4, 5.5)
    assert rf["head"].is_global and rf["head/logits"].is_global
    assert rf["head/hidden1"].size is None and rf["head/hidden1"].jump is None
    # 32x32 with the first conv VALID (Harley's network): no padding, every start moves by +2.
    harley = get_model("lenet5", num_classes=10, first_padding="VALID", pooling="max")
    rf = fields(harley, (32, 32, 1))
    assert triple(rf["block1/conv1"]) == (5, 1, 2)
    assert triple(rf["block2/pool"]) == (16, 4, 7.5)
    # Sum pooling is a Pool kind: same windows, same fields.
    summed = fields(get_model("lenet5", num_classes=10, pooling="sum"), (28, 28, 1))
    assert triple(summed["block2/pool"]) == (16, 4, 5.5)


def test_vgg16_and_alexnet_known_values():
    rf = fields(get_model("vgg16", num_classes=10), (224, 224, 3))
    convs = [rf[f"block{b}/conv{c}"].size[0] for b, n in enumerate((2, 2, 3, 3, 3), 1) for c in range(1, n + 1)]  # fmt: skip
    pools = [rf[f"block{b}/pool"].size[0] for b in range(1, 6)]
    assert convs == [3, 5, 10, 14, 24, 32, 40, 60, 76, 92, 132, 164, 196]
    assert pools == [6, 16, 44, 100, 212]
    assert triple(rf["block5/conv3"]) == (196, 16, 7.5)  # conv5_3
    assert triple(rf["block5/pool"]) == (212, 32, 15.5)  # pool5
    assert triple(rf["avgpool"]) == (212, 32, 15.5)  # 7x7 -> 7x7: the identity
    # conv1 11x11/4 pad 2 -> (11, 4, 3); pool 3/2 -> (19, 8, 7); conv2 5x5 -> (51, 8, 7);
    # pool -> (67, 16, 15); three 3x3 convs -> 99, 131, 163; pool5 -> (163 + 2*16, 32, 31).
    rf = fields(get_model("alexnet", num_classes=10), (224, 224, 3))
    assert triple(rf["conv1"]) == (11, 4, 3)
    assert [rf[f"conv{i}"].size[0] for i in (2, 3, 4, 5)] == [51, 99, 131, 163]
    assert triple(rf["pool5"]) == (195, 32, 31)


ZOO_BY_HAND = {
    # Stem 7x7/2 (pad 3) + 3x3/2 max pool (pad 1): (11, 4, 0); each basic block adds two 3x3
    # convs at its jump, the first of a stage striding: layer1 27, 43; layer2 67, 99; layer3
    # 147, 211; layer4 307, 435. The 1x1 shortcut (43, 99, 211 at layers 2-4) lies inside.
    "resnet18": {
        "maxpool": (11, 4, 0),
        "layer2_0/downsample_conv": (43, 8, 0),
        "layer2_0": (67, 8, 0),
        "layer4_1": (435, 32, 0),
    },
    # Bottlenecks: one 3x3 each; stages of 3, 4, 6, 3 blocks: 11 + 3*8 = 35, + 8 + 3*16 = 91,
    # + 16 + 5*32 = 267, + 32 + 2*64 = 427.
    "resnet50": {"layer1_2": (35, 4, 0), "layer3_5": (267, 16, 0), "layer4_2": (427, 32, 0)},
    # conv1 7/2 (pad 3) -> 7; pool 3/2 (start + 1*2) -> (11, 4, 2); conv3 3x3 -> 19; pool ->
    # (27, 8, 6); every Inception's widest branch adds 2 jumps (one 3x3 conv, or the 3x3 pool; the
    # 1x1 branch adds none): 3a 43, 3b 59; pool -> (75, 16, 14); 4a..4e -> 235; pool4 2/2 ->
    # (251, 32, 22); 5a 315, 5b 379.
    "googlenet": {
        "inception3a/branch1": (27, 8, 6),
        "inception3a/branch4_pool": (43, 8, 6),
        "inception3a": (43, 8, 6),
        "inception4e": (235, 16, 14),
        "inception5b": (379, 32, 22),
    },
    # conv1 7/2 pad 1 -> (7, 2, 2); pool 3/2 -> (11, 4, 4); conv2 5/2 -> (27, 8, 12); pool ->
    # (43, 16, 20); three 3x3 convs -> 139; pool5 -> (171, 32, 36).
    "zfnet": {"conv2": (27, 8, 12), "pool5": (171, 32, 36)},
}


@pytest.mark.parametrize("name", sorted(ZOO_BY_HAND))
def test_zoo_fields_by_hand(name):
    rf = fields(get_model(name, num_classes=10), (224, 224, 3))
    assert {layer: triple(rf[layer]) for layer in ZOO_BY_HAND[name]} == ZOO_BY_HAND[name]


def test_cifar_stems_by_hand():
    # Three (3x3 SAME conv, 2x2 pool) blocks: (3, 1, 0) (4, 2, .5) (8, 2, .5) (10, 4, 1.5) ...
    rf = fields(get_model("simple_convnet", num_classes=10), (32, 32, 3))
    assert triple(rf["block3"]) == (22, 8, 3.5)
    # AlexNet's CIFAR stem: conv1 3x3 pad 1 -> (3, 1, 0); pool 3/2 -> (5, 2, 1).
    rf = fields(get_model("alexnet", num_classes=10, cifar_stem=True), (32, 32, 3))
    assert triple(rf["pool1"]) == (5, 2, 1)


def test_densenet_concatenation_keeps_the_widest_field():
    # DenseNet-121: stem (11, 4, 0); each dense layer adds one 3x3 conv, each transition a 2x2
    # average pool (start + jump / 2): 11 + 6*8 = 59, 63 (j 8, start 2); + 12*16 = 255, 263
    # (j 16, start 6); + 24*32 = 1031, 1047 (j 32, start 14); + 16*64 = 2071.
    rf = fields(get_model("densenet121", num_classes=10), (224, 224, 3))
    assert triple(rf["denseblock1_layer6"]) == (59, 4, 0)
    assert triple(rf["transition1"]) == (63, 8, 2)
    assert triple(rf["norm5"]) == (2071, 32, 14)
    # A layer's output is the concatenation [input, new features]: the new features' field.
    assert triple(rf["denseblock1_layer1"]) == triple(rf["denseblock1_layer1/conv2"]) == (19, 4, 0)


def test_mlp_is_global_and_adaptive_pools():
    assert all(r.is_global for r in receptive_fields(get_model("mlp", num_classes=10), (28, 28, 1)))
    # VGG's 7x7 adaptive pool after a 1x1 map: every unit sees the same window (jump 0).
    rf = fields(get_model("vgg11", num_classes=10), (32, 32, 3))
    assert triple(rf["avgpool"]) == (150, 0, 15.5)
    # AlexNet at 256: 7x7 -> 6x6 bins [0, 2), [1, 3), ... [5, 7): width 2, spacing 1.
    rf = fields(get_model("alexnet", num_classes=10), (256, 256, 3))
    assert rf["pool5"].output_shape == (1, 7, 7, 256)
    assert triple(rf["avgpool"]) == (rf["pool5"].size[0] + 32, 32, rf["pool5"].start[0] + 16)


def test_fast_path_modules_give_the_same_fields():
    for name, shape in (("lenet5", (28, 28, 1)), ("resnet18", (64, 64, 3))):
        options = {k: v for k, v in fast_paths.modules().items() if k in model_options(name)}
        default = receptive_fields(get_model(name, num_classes=10), shape)
        fast = receptive_fields(get_model(name, num_classes=10, **options), shape)
        assert [(r.path, r.size, r.jump, r.start) for r in fast] == [
            (r.path, r.size, r.jump, r.start) for r in default
        ]


def test_summary_rows_carry_the_fields_and_window():
    model = get_model("lenet5", num_classes=10)
    rows, totals = summary_rows(model, (28, 28, 1), receptive_field=True)
    assert [row.receptive_field for row in rows] == receptive_fields(model, (28, 28, 1))
    assert totals["params"] == 61_706
    pool = rows[2].receptive_field
    assert pool.path == "block1/pool" and pool.window(0, 0) == ((-2, 3), (-2, 3))
    assert pool.window(3, 1) == ((4, 9), (0, 5))  # centre 0.5 + 3*2 = 6.5, 6 pixels wide
    with pytest.raises(ShapeError, match="'head' is global"):
        rows[-4].receptive_field.window(0, 0)


# --------------------------------------------------------------------------------------------------
# Against the input gradient
# --------------------------------------------------------------------------------------------------


def gradient_windows(model, variables, shape, records):
    """Per record: the (top, bottom, left, right) box of the non-zero input gradient of the unit at
    the centre of its map (summed over channels), and whether the box is all non-zero."""
    paths = [r.path for r in records]

    def centre_units(x):
        _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
        units = []
        for path in paths:
            node = state["intermediates"]
            for name in path.split("/"):
                node = node[name]
            y = node["__call__"][0]
            units.append(y[0, y.shape[1] // 2, y.shape[2] // 2, :].sum())
        return jnp.stack(units)

    x = jax.random.uniform(jax.random.key(1), (1, *shape))
    grads = np.abs(np.asarray(jax.jit(jax.jacrev(centre_units))(x)))[:, 0].sum(-1)  # [L, H, W]
    boxes = []
    for grad in grads:
        rows, cols = np.nonzero(grad.any(1))[0], np.nonzero(grad.any(0))[0]
        top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
        boxes.append(
            ((top, bottom, left, right), bool(grad[top : bottom + 1, left : right + 1].all()))
        )
    return boxes


def assert_gradients_match(model, variables, shape, records, solid=True):
    assert records
    for record, (box, full) in zip(records, gradient_windows(model, variables, shape, records)):
        (top, bottom), (left, right) = record.window(
            record.output_shape[1] // 2, record.output_shape[2] // 2
        )
        expected = (max(top, 0), min(bottom, shape[0] - 1), max(left, 0), min(right, shape[1] - 1))
        assert box == expected, (record, box)
        assert full or not solid, record


def spatial(records):
    return [r for r in records if not r.is_global]


def random_variables(model, shape):
    """Normal random variables (initialising with `model.init` would compile it: seconds)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape)))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(s.dtype), shapes)


def test_lenet5_fields_are_its_gradient_support():
    # The real model: random weights, tanh and average pooling have no zero derivatives.
    for options, shape in (({}, (28, 28, 1)), ({"first_padding": "VALID"}, (32, 32, 1))):
        model = get_model("lenet5", num_classes=10, **options)
        variables = random_variables(model, shape)
        assert_gradients_match(model, variables, shape, spatial(receptive_fields(model, shape)))


# A stand-in with the zoo model's exact layer structure whose gradient support is exactly the field:
# all weights 1, no activation (a ReLU or a max pool would zero some paths), no norm (ResNet's
# zero-initialised BatchNorm scale would cut a branch), sum instead of max/avg pooling, one channel
# per conv (fields do not depend on widths; it keeps VGG-16 at 224x224 cheap).


def one_channel_conv(features, *args, **kwargs):
    return layers.Conv(1, *args, **kwargs)


class SumPool(layers.Pool):
    def reduce_windows(self, x, windows, strides, padding):
        return nn.pool(x, 0.0, jax.lax.add, windows, strides, padding)


def positive_stand_in(model, shape):
    model = model.clone(conv=one_channel_conv, pool=SumPool, norm=None, act=lambda x: x)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape)))
    return model, jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)


@pytest.mark.parametrize(
    "name, size, options",
    [
        # 224: conv5_3's 196 and pool5's 212 lie inside the image around the centre unit.
        ("vgg16", 224, {"head_features": (4,)}),
        # 480: layer4_1's 435 around the centre unit (7 of 15) spans rows 7..441.
        ("resnet18", 480, {}),
    ],
)
def test_zoo_fields_are_the_gradient_support(name, size, options):
    shape = (size, size, 1)
    model, variables = positive_stand_in(get_model(name, num_classes=2, **options), shape)
    records = spatial(receptive_fields(model, shape))
    assert triple(records[-1])[0] == {"vgg16": 212, "resnet18": 435}[name]
    assert_gradients_match(model, variables, shape, records)


def test_densenet_stand_in_matches_its_gradient_support():
    shape = (64, 64, 1)
    small = DenseNet(num_classes=2, block_config=(1, 2), growth_rate=4, num_init_features=4)
    model, variables = positive_stand_in(small, shape)
    assert_gradients_match(model, variables, shape, spatial(receptive_fields(model, shape)))


class TwoShiftedBranches(nn.Module):
    """Branches whose windows are offset in opposite directions, joined by an add; plus the
    functional forms: a dilated lax conv, nn.avg_pool, a pad and a strided slice."""

    @nn.compact
    def __call__(self, x, train=False):
        conv = lambda pad, name: nn.Conv(1, (3, 3), padding=pad, use_bias=False, name=name)
        x = conv(((2, 0), (2, 0)), "up_left")(x) + conv(((0, 2), (0, 2)), "down_right")(x)
        kernel = self.param("kernel", nn.initializers.ones, (3, 3, 1, 1))
        x = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), ((2, 2), (2, 2)), rhs_dilation=(2, 2),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )  # fmt: skip
        x = nn.avg_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        x = jnp.pad(x, ((0, 0), (1, 0), (1, 0), (0, 0)))[:, ::2, ::2, :]
        return nn.Dense(1, name="out")(x)


def test_union_of_offset_branches_and_functional_ops():
    shape = (40, 40, 1)
    model = TwoShiftedBranches()
    records = fields(model, shape)
    # Each branch sees 3 pixels, centred at +1 and -1 around its unit: the sum sees 5.
    assert triple(records["up_left"]) == (3, 1, -1)
    assert triple(records["down_right"]) == (3, 1, 1)
    assert triple(records["out"]) == (
        # union (5, 1, 0); dilated conv 3x3 d2 pad 2: (9, 1, 0); avg pool 3/2, SAME pads (0, 1)
        # at 40: (11, 2, 1); pad 1 then every other unit: (11, 4, -1).
        11,
        4,
        -1,
    )
    variables = jax.tree.map(jnp.ones_like, model.init(jax.random.key(0), jnp.zeros((1, *shape))))
    branches = [records["up_left"], records["down_right"], records["out"]]
    # Not solid: the dilated conv skips every other pixel of the branches' union.
    assert_gradients_match(model, variables, shape, branches, solid=False)


def test_global_ops_and_unknown_ops():
    class Mixed(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            y = nn.Conv(2, (3, 3), name="conv")(x)
            flipped = nn.Conv(2, (1, 1), name="flipped")(jnp.flip(y, axis=1))
            # Squeeze-and-excitation: the global mean rescales every position.
            squeeze = nn.Dense(2, name="squeeze")(y.mean(axis=(1, 2), keepdims=True))
            excited = nn.Conv(2, (1, 1), name="excited")(squeeze * y)
            return nn.Dense(2, name="channels")(y), flipped, excited

    rf = fields(Mixed(), (8, 8, 3))
    assert triple(rf["conv"]) == (3, 1, 0)
    assert triple(rf["channels"]) == (3, 1, 0)  # a Dense on [N, H, W, C]: a 1x1 conv
    assert rf["flipped"].is_global  # a mirror has no one window per unit
    assert rf["squeeze"].is_global and rf["excited"].is_global
