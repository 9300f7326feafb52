"""`python -m cnn_jax` runs the `cnn-jax` command line."""

import sys

from cnn_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
