"""cnn_jax.explain and `cnn-jax visualize activations|saliency|grad-cam|occlusion|top-patches|
maximize` (issue 14, parts 2-4): activations of any layer before and after the activation,
saliency, SmoothGrad, Grad-CAM, occlusion, guided backpropagation / deconvnet projections, top
dataset patches and activation maximisation, on zoo models and on a user module.

The saliency family is checked on a task where only one image region carries the label (a tiny
CNN trained here in a few seconds): each map must put most of its mass in that region, which the
input's own brightness does not. On LeNet-5 trained briefly on the digits, the Grad-CAM evidence
must be faithful and Guided Grad-CAM's must lie on the strokes.
"""

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from cnn_jax import cli, explain
from cnn_jax.errors import ConfigError
from cnn_jax.models import get_model

# Initialisation with a counter-based generator: the default one (threefry) takes seconds to
# compile on CPU, more than these tests' models take to train.
KEY = jax.random.key(0, impl="rbg")
SIZE, BLOB = 16, 4
REGION = np.zeros((SIZE, SIZE), bool)
REGION[: SIZE // 2, : SIZE // 2] = True  # the top-left quadrant: the only informative region


def one_region_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, 16, 16, 1] noise; label 1: a bright 4x4 square somewhere in the top-left quadrant.
    Either label: often a bar as bright elsewhere (a distractor that carries no label)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.3, (n, SIZE, SIZE, 1)).astype(np.float32)
    y = rng.integers(0, 2, n)
    for i in range(n):
        if y[i]:
            r, c = rng.integers(0, SIZE // 2 - BLOB + 1, 2)
            x[i, r : r + BLOB, c : c + BLOB] += 1.5
        if rng.random() < 0.7:
            r, c = rng.integers(SIZE // 2, SIZE - 1), rng.integers(0, SIZE - 2 * BLOB + 1)
            r, c = (c, r) if rng.random() < 0.5 else (r, c)
            if rng.random() < 0.5:
                x[i, r, c : c + 2 * BLOB] += 1.5
            else:
                x[i, c : c + 2 * BLOB, r] += 1.5
    return x, y


class TinyCNN(nn.Module):
    """A user's module: not from the zoo, no `train` argument, its activation as an `act` field."""

    act: object = nn.relu

    @nn.compact
    def __call__(self, x):
        x = self.act(nn.Conv(8, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = self.act(nn.Conv(8, (3, 3))(x))
        # zero init and an L1 penalty (below): weights of the uninformative places stay near 0
        return nn.Dense(2, kernel_init=nn.initializers.zeros)(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def one_region():
    """(model, variables, held-out images, labels) after 300 Adam steps (about a second)."""
    model = TinyCNN()
    x, y = one_region_images(2048, seed=0)
    variables = jax.jit(model.init)(KEY, x[:1])
    tx = optax.adam(3e-3)

    @jax.jit
    def step(variables, opt_state, xb, yb):
        def loss(v):
            ce = optax.softmax_cross_entropy_with_integer_labels(model.apply(v, xb), yb).mean()
            return ce + 0.03 * jnp.abs(v["params"]["Dense_0"]["kernel"]).sum()

        grads = jax.grad(loss)(variables)
        updates, opt_state = tx.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state

    opt_state, rng = tx.init(variables), np.random.default_rng(0)
    for _ in range(300):
        batch = rng.integers(0, len(x), 64)
        variables, opt_state = step(variables, opt_state, x[batch], y[batch])
    xt, yt = one_region_images(128, seed=1)
    return model, variables, xt, yt


def mass_in_region(maps) -> np.ndarray:
    """Per map [N, H, W]: the share of its positive mass inside REGION."""
    m = np.maximum(np.asarray(maps, np.float64), 0)
    return m[:, REGION].sum(1) / np.maximum(m.reshape(len(m), -1).sum(1), 1e-12)


def test_every_map_finds_the_one_informative_region(one_region):
    model, variables, x, y = one_region
    assert (explain.logits(model, variables, x).argmax(-1) == y).mean() > 0.95
    pos = x[y == 1][:16]
    # The test can fail: the images' own brightness (blob + distractor bar) is mostly elsewhere.
    assert mass_in_region(np.abs(pos[..., 0])).mean() < 0.5

    shares = {
        "saliency": mass_in_region(explain.saliency(model, variables, pos, 1)),
        "smoothgrad": mass_in_region(explain.smoothgrad(model, variables, pos, 1, samples=8)),
        "grad_cam": mass_in_region(explain.grad_cam(model, variables, pos, 1)[0]),
    }
    occlusions = [explain.occlusion(model, variables, p, 1, size=4, stride=2) for p in pos[:3]]
    shares["occlusion"] = mass_in_region([o.sensitivity for o in occlusions])
    for name, share in shares.items():
        assert share.mean() > 0.6, (name, share)  # 0.67 (saliency) to 1.0 (occlusion)
        assert np.median(share) > 0.55, (name, share)

    # occluding the informative square drops the true class; occluding anything else does not
    for o in occlusions:
        assert o.base > 0.9 and o.target == 1
        inside = (o.tops[:, None] < SIZE // 2 - 2) & (o.lefts[None, :] < SIZE // 2 - 2)
        outside = (o.tops[:, None] >= SIZE // 2) | (o.lefts[None, :] >= SIZE // 2)
        assert o.probs[inside].min() < 0.5
        assert o.probs[outside].min() > o.base - 0.2


def test_grad_cam_is_the_gradient_weighted_map(one_region):
    """grad_cam equals the formula computed by hand on the model split at its last conv layer:
    ReLU(sum_k mean(d logit / d A_k) A_k), here upsampled by stretching (the user module has
    no `train` argument, so no receptive field is derived)."""
    model, variables, x, y = one_region
    x = x[y == 1][:4]
    a = jnp.asarray(explain.activations(model, variables, x, ["Conv_1:act"])["Conv_1:act"])
    dense = variables["params"]["Dense_0"]

    def class1(a):
        return (a.reshape(len(a), -1) @ dense["kernel"] + dense["bias"])[:, 1].sum()

    weights = jax.grad(class1)(a).mean(axis=(1, 2), keepdims=True)
    cam = explain.upsample(jax.nn.relu((weights * a).sum(-1)), (SIZE, SIZE))
    cam = cam / cam.max(axis=(1, 2), keepdims=True)
    got, layer = explain.grad_cam(model, variables, x, 1)
    assert layer == "Conv_1:act"
    np.testing.assert_allclose(got, cam, atol=1e-5)


@pytest.fixture(scope="module")
def lenet():
    """lenet5_digits' model, randomly initialised, and three random inputs."""
    model = get_model("lenet5", num_classes=10, act="relu", pooling="max", first_padding="VALID")
    x = np.random.default_rng(1).normal(size=(3, 32, 32, 1)).astype(np.float32)
    return model, jax.jit(model.init)(KEY, x[:1]), x


def test_activations_of_every_layer_before_and_after_the_activation(lenet):
    model, variables, x = lenet
    shapes = explain.layer_shapes(model, variables, x)
    assert list(shapes) == [
        "block1/conv1", "block1/conv1:act", "block1/pool", "block1",
        "block2/conv1", "block2/conv1:act", "block2/pool", "block2",
        "head/hidden1", "head/hidden1:act", "head/hidden2", "head/hidden2:act", "head/logits",
        "head",
    ]  # fmt: skip
    assert shapes["block2/conv1"] == (3, 10, 10, 16) and shapes["head/hidden2"] == (3, 84)
    acts = explain.activations(model, variables, x)
    for name in ("block1/conv1", "block2/conv1", "head/hidden1"):
        assert (acts[name] < 0).any()
        np.testing.assert_array_equal(acts[name + ":act"], np.maximum(acts[name], 0))
    np.testing.assert_allclose(acts["head/logits"], jax.jit(model.apply)(variables, x), rtol=1e-5)
    picked = explain.activations(model, variables, x, ["head/hidden2:act", "block1/pool"])
    assert list(picked) == ["head/hidden2:act", "block1/pool"]
    with pytest.raises(ConfigError, match=r"'block1/conv'.*did you mean 'block1/conv1'"):
        explain.activations(model, variables, x, ["block1/conv"])


def test_grad_cams_default_layer():
    """The last rectified map before the head; an Inception module's concatenation rather than
    its last branch; never a pooled map when the conv's is finer."""
    lenet = {
        "block2/conv1": (1, 10, 10, 16),
        "block2/conv1:act": (1, 10, 10, 16),
        "block2/pool": (1, 5, 5, 16),
        "block2": (1, 5, 5, 16),
        "head/hidden1": (1, 120),
    }
    assert explain.default_cam_layer(lenet) == "block2/conv1:act"
    inception = {
        "inc/branch1/bn:act": (1, 7, 7, 64),
        "inc/branch4/bn": (1, 7, 7, 32),
        "inc/branch4/bn:act": (1, 7, 7, 32),
        "inc/branch4": (1, 7, 7, 32),
        "inc": (1, 7, 7, 96),
        "fc": (1, 10),
    }
    assert explain.default_cam_layer(inception) == "inc"
    assert explain.default_cam_layer({"conv": (1, 4, 4, 2), "pool": (1, 1, 1, 2)}) == "conv"
    with pytest.raises(ConfigError, match="no layer with spatial maps"):
        explain.default_cam_layer({"dense": (1, 3)})


def test_a_module_with_a_hard_coded_relu():
    """Any Flax module: its modules' outputs are recorded (no ':act' entries without an `act`
    field); guided backprop cannot replace its ReLU and says so; plain gradients work."""

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
            return nn.Dense(3, name="out")(x.mean(axis=(1, 2)))

    model = Plain()
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 1)).astype(np.float32)
    variables = jax.jit(model.init)(KEY, x)
    assert explain.layer_shapes(model, variables, x) == {"conv": (2, 8, 8, 4), "out": (2, 3)}
    with pytest.raises(ConfigError, match="act"):
        explain.project(model, variables, x, channel=0, rule="guided")
    grads = explain.project(model, variables, x, channel=2, rule="gradient")
    want = jax.jit(jax.grad(lambda x: model.apply(variables, x)[:, 2].sum()))(x)
    np.testing.assert_allclose(grads, want, rtol=1e-5, atol=1e-7)


def test_guided_and_deconvnet_relu_backward_passes(lenet):
    x = jnp.array([-1.0, 2.0, 3.0, -4.0])
    g = jnp.array([5.0, -6.0, 7.0, 8.0])
    _, guided = jax.vjp(explain.guided_relu, x)
    _, deconv = jax.vjp(explain.deconv_relu, x)
    np.testing.assert_array_equal(guided(g)[0], [0.0, 0.0, 7.0, 0.0])  # x > 0 and g > 0
    np.testing.assert_array_equal(deconv(g)[0], [5.0, 0.0, 7.0, 8.0])  # g > 0, whatever x
    np.testing.assert_array_equal(explain.guided_relu(x), jax.nn.relu(x))

    model, variables, x = lenet
    plain = explain.project(model, variables, x, layer="block2/conv1", channel=3, rule="gradient")
    guided = explain.project(model, variables, x, layer="block2/conv1", channel=3)
    assert plain.shape == guided.shape == x.shape
    assert not np.allclose(plain, guided)


def test_top_units_are_the_strongest_images_with_their_receptive_fields(lenet, one_region):
    model, variables, _ = lenet
    images = np.random.default_rng(2).normal(size=(40, 32, 32, 1)).astype(np.float32)
    top = explain.top_units(model, variables, images, layer="block2/conv1:act", k=3, batch_size=16)
    a = explain.activations(model, variables, images, ["block2/conv1:act"])["block2/conv1:act"]
    for row, channel in enumerate(top.channels):
        strongest = a[..., channel].reshape(len(a), -1).max(1)
        np.testing.assert_array_equal(top.index[row], np.argsort(-strongest, kind="stable")[:3])
        for j, i in enumerate(top.index[row]):
            assert a[i, top.y[row, j], top.x[row, j], channel] == pytest.approx(strongest[i])
            # LeNet-5's second conv: 14x14 input pixels 2 apart, unit 0 centred on (6.5, 6.5)
            top_, left = 2 * top.y[row, j], 2 * top.x[row, j]
            assert tuple(top.boxes[row, j]) == (top_, left, top_ + 14, left + 14)

    # a model without an analytical field (no `train` argument): the input-gradient support
    model, variables, images, _ = one_region
    top = explain.top_units(model, variables, images, layer="Conv_0", k=2, channels=[0, 5])
    for (t, left, b, r), y_, x_ in zip(top.boxes.reshape(-1, 4), top.y.ravel(), top.x.ravel()):
        assert (t, left, b, r) == (max(y_ - 1, 0), max(x_ - 1, 0), min(y_ + 2, 16), min(x_ + 2, 16))
    with pytest.raises(ConfigError, match="channels"):
        explain.top_units(model, variables, images, layer="Conv_0", channels=[8])


def test_maximize_activation_finds_inputs_stronger_than_the_data(one_region):
    model, variables, x, _ = one_region
    value_range = (float(x.min()), float(x.max()))
    image, reached = explain.maximize_activation(
        model, variables, (SIZE, SIZE, 1), channel=1, steps=100, value_range=value_range
    )
    assert image.shape == (SIZE, SIZE, 1) and value_range[0] <= image.min() <= image.max()
    assert reached > explain.logits(model, variables, x)[:, 1].max()
    assert reached == pytest.approx(explain.logits(model, variables, image[None])[0, 1], rel=1e-4)
    # a first-layer unit: its best input fills its 3x3 field, mid-grey elsewhere (the L2 pull)
    image, reached = explain.maximize_activation(
        model, variables, (SIZE, SIZE, 1), layer="Conv_0", channel=2, steps=100,
        value_range=value_range, jitter=0,
    )  # fmt: skip
    centre = explain.activations(model, variables, x, ["Conv_0"])["Conv_0"][:, 8, 8, 2]
    assert reached > centre.max()
    outside = np.ones((SIZE, SIZE), bool)
    outside[7:10, 7:10] = False
    assert np.abs(image[..., 0][outside] - sum(value_range) / 2).max() < 0.1


# --------------------------------------------------------------------------------------------------
# LeNet-5 trained briefly on the digits, through the command line
# --------------------------------------------------------------------------------------------------

# one evaluation and one checkpoint, at the end
TINY = [
    "train.eval_batch_size=120", "train.eval_every_epochs=100", "checkpoint.every_steps=120",
    "checkpoint.async_save=False",
]  # fmt: skip


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """(workdir, model, variables, config) of lenet5_digits after 120 steps (97-98% test)."""
    root = tmp_path_factory.mktemp("explain")
    workdir = root / "lenet5_digits"  # where the gallery looks for it under --workdir-root
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TFDS_DATA_DIR", str(root / "tfds"))
        argv = ["train", "lenet5_digits", "--workdir", str(workdir), "--max-steps", "120"]
        assert cli.main([*argv, "--no-pictures", "--set", *TINY]) == 0
        from cnn_jax.train import load

        yield (workdir, *load(workdir))


def test_grad_cam_on_a_trained_digits_model(digits_run):
    """Guided Grad-CAM's evidence lies on the strokes, and the pixels Grad-CAM ranks highest are
    the ones the prediction depends on (blanking them costs far more than blanking as many at
    random). Plain Grad-CAM at the last conv layer (10x10 units seeing 14x14 pixels of an 8x8
    digit drawn at 32x32) does not resolve strokes: much of its evidence is where a stroke is
    absent (the gap that tells an 8 from a 3)."""
    from cnn_jax import predict
    from cnn_jax.data import load_split_arrays

    _, model, variables, config = digits_run
    images, labels = load_split_arrays("digits", "test", config=config)
    x = np.asarray(predict.preprocess_for_model(config, images[:100]))
    labels = labels[:100]
    strokes = x[..., 0] > (x.min() + x.max()) / 2
    assert 0.2 < strokes.mean() < 0.4

    guided, layer = explain.guided_grad_cam(model, variables, x, labels)
    assert layer == "block2/conv1:act"
    positive = np.maximum(guided[..., 0], 0)
    on_strokes = (positive * strokes).sum((1, 2)) / positive.sum((1, 2))
    assert on_strokes.mean() > 0.6, on_strokes.mean()

    cam, _ = explain.grad_cam(model, variables, x, labels, layer=layer)
    top_quarter = cam >= np.quantile(cam.reshape(len(cam), -1), 0.75, axis=1)[:, None, None]
    random_quarter = np.random.default_rng(0).random(cam.shape) < 0.25

    def p_true(blank):
        blanked = np.where(blank[..., None], x.min(), x)  # set to the background
        probs = jax.nn.softmax(explain.logits(model, variables, blanked))
        return float(np.asarray(probs)[np.arange(len(x)), labels].mean())

    assert p_true(np.zeros_like(top_quarter)) > 0.9
    assert p_true(top_quarter) < p_true(random_quarter) - 0.1


def run(capsys, argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def written(out):
    paths = [line.split("wrote ", 1)[1] for line in out.splitlines() if line.startswith("wrote ")]
    for path in paths:
        with Image.open(path) as im:
            assert im.format == "PNG" and min(im.size) > 100
    return paths


@pytest.mark.heavy
def test_gallery_draws_the_figure_set(digits_run, tmp_path, capsys):
    """`cnn-jax run gallery` on a trained LeNet-5 (its workdir under --workdir-root): every
    figure of the set, readable PNGs; MNIST, not imported here, is skipped with a note."""
    workdir = digits_run[0]
    argv = ["run", "gallery", "--models", "lenet5_digits,lenet5_mnist", "--workdir-root"]
    argv += [workdir.parent, "--out", tmp_path, "-k", "2", "--steps", "5"]
    code, out, err = run(capsys, argv)
    assert code == 0, err
    assert "lenet5_mnist: skipped:" in out and "not prepared" in out
    assert "lenet5_digits: images 100, grad_cam_layer block2/conv1:act, stroke_area 0." in out
    assert (tmp_path / "lenet5_digits" / "stroke_evidence.json").is_file()
    names = sorted(str(p.relative_to(tmp_path / "lenet5_digits")) for p in map(Path, written(out)))
    assert names == sorted([
        "filters.png", "maps/block1_conv1.png", "maps/block2_conv1.png", "maps/dense.png",
        "receptive_fields.png", "top_patches/block1_conv1_act.png",
        "top_patches/block2_conv1_act.png", "maximize_block1_conv1.png",
        "maximize_block2_conv1.png", "maximize_classes.png", "saliency.png", "grad_cam.png",
        "occlusion.png",
    ])  # fmt: skip


def test_visualize_commands(digits_run, tmp_path, capsys):
    """Each `visualize` view writes its PNG (after the gallery, whose compiled functions these
    share: the same model, layers and sizes)."""
    workdir = digits_run[0]
    code, out, err = run(capsys, ["visualize", "activations", "--workdir", workdir])
    assert code == 0, err
    names = [p.rsplit("/", 1)[1] for p in written(out)]  # blocks repeat their last layer: left out
    assert names == [*(f"{n}.png" for n in ("block1_conv1", "block1_pool", "block2_conv1")),
                     "block2_pool.png", "dense.png"]  # fmt: skip
    for what, extra in (
        ("saliency", []),
        ("grad-cam", ["--class", "3"]),
        ("occlusion", ["--size", "8"]),
        ("top-patches", ["--layer", "block1/conv1:act", "-k", "4"]),
        ("maximize", ["--steps", "5"]),
    ):
        out_png = tmp_path / f"{what}.png"
        argv = ["visualize", what, "--workdir", workdir, "--out", out_png, *extra]
        if what in ("saliency", "grad-cam", "occlusion"):
            argv += ["--index", "5"]
        code, out, err = run(capsys, argv)
        assert code == 0, err
        want = out_png / "block1_conv1_act.png" if what == "top-patches" else out_png
        assert written(out) == [str(want)]
        if what == "occlusion":
            assert "unoccluded" in out and "the 8x8 square" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["grad-cam", "--layer", "block2/conv"], (
            "layer='block2/conv' is not a layer of this model (did you mean 'block2/conv1' or "
            "'block1/conv1' or 'block2/conv1:act'?); its layers: block1/conv1, block1/conv1:act,")),
        (["grad-cam", "--layer", "head/hidden1"], "Grad-CAM needs a layer with spatial maps"),
        (["saliency", "--class", "cat"], "--class 'cat' is not a class of this model"),
        (["occlusion", "--size", "99"], "occlusion size=99 must be between 1 and the image side"),
        (["top-patches", "--layer", "block1/conv1", "--channels", "6"],
         "channels=[6] out of range for 'block1/conv1' (6)"),
        (["maximize", "--channels", "10"], "channel=10 out of range"),
        (["activations", "--layer", "nope"], "layer='nope' is not a layer"),
    ],
)  # fmt: skip
def test_visualize_refuses_bad_arguments_by_name(digits_run, capsys, argv, message):
    code, out, err = run(capsys, ["visualize", *argv, "--workdir", digits_run[0]])
    assert code == 2 and err.startswith("cnn-jax: error: ") and message in err, err
    assert "Traceback" not in err and out == ""


def test_readme_example_runs(digits_run):
    """The README's Python example of `cnn_jax.explain` runs as written, on this workdir."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("### Understanding a trained network") :]
    (code,) = re.findall(r"```python\n(.*?)```", section[: section.index("\n### ")], re.DOTALL)
    namespace: dict = {}
    code = code.replace('"checkpoints/lenet5_digits"', repr(str(digits_run[0])))
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    assert namespace["layer"] == "block2/conv1:act" and namespace["cam"].shape == (1, 32, 32)
    assert namespace["acts"]["block1/conv1"].shape == (1, 28, 28, 6)
    assert namespace["occ"].probs.shape == (13, 13) and namespace["top"].index.shape == (16, 9)
    assert namespace["inputs"].shape == (6, 32, 32, 1)
