"""What a trained LeNet-5 sees: its first-layer filters, the activation maps of each conv and
pooling layer for one test image of a digit 8 (the guides' figure), and its output probabilities.

    python experiments/feature_maps.py [--workdir checkpoints/lenet5_digits]
        [--experiment lenet5_digits] [--image FILE.png [--polarity auto|as-is|invert]]
        [--index N]

Uses the trained model in the workdir; when it holds no checkpoint yet, trains the experiment
there first. Writes <workdir>/pictures/{filters,feature_maps,probabilities}.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cnn_jax import predict
from cnn_jax.config import apply_overrides, load_config, validate_config
from cnn_jax.train import load, train_and_evaluate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="lenet5_digits", help="config to train if needed")
    parser.add_argument("--workdir", help="training folder (default: checkpoints/EXPERIMENT)")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--max-steps", type=int, help="when training: stop after N steps")
    parser.add_argument("--image", help="a PNG/JPEG file instead of a test image")
    parser.add_argument(
        "--polarity",
        choices=("auto", "as-is", "invert"),
        default="auto",
        help="--image: auto inverts a dark-on-light image for a model trained on light-on-dark "
        "digits (and says so); as-is never inverts; invert always does",
    )
    parser.add_argument("--index", type=int, help="test image index (default: the first 8)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or Path("checkpoints") / Path(args.experiment).stem)

    if not (workdir / "checkpoints").is_dir():
        config = validate_config(apply_overrides(load_config(args.experiment), args.overrides))
        print(f"no checkpoint in {workdir}: training {args.experiment} first")
        results = train_and_evaluate(config, workdir, max_steps=args.max_steps)
        print(f"final test accuracy {results['final_test_accuracy']:.4f}")
    model, variables, config = load(workdir, "latest")

    names = predict.model_input(config)["class_names"]
    if args.image:
        shape = predict.model_input(config)["native_shape"]
        image = predict.read_image(args.image, shape, invert=args.polarity == "invert")
        title = args.image
        background = predict.training_background(config)
        if args.polarity == "auto" and predict.opposite_polarity(image, background):
            image, title = 255 - image, f"{args.image} (inverted)"
            print(f"note: inverted {args.image} to match the training images ({background} "
                  "background); --polarity as-is keeps it as it is")  # fmt: skip
    else:
        image, label, index = predict.sample_test_image(config, "8", args.index)
        title = f"test image {index} (label {names[label]})"
    written = predict.save_feature_pictures(
        config, model, variables, workdir / "pictures", image, title
    )
    probs = predict.predict_probs(config, model, variables, image[None])[0]
    print(f"{title}: " + ", ".join(f"{n} {p:.3f}" for n, p in zip(names, probs)))
    print("wrote:", *written.values(), sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
