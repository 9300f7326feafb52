"""The named experiments, shipped in the wheel as the package `cnn_jax.experiments`.

Config experiments define `get_config()` (run with `cnn-jax train NAME`); script experiments
define `main(argv)` (run with `cnn-jax run NAME`). `cnn_jax.config.experiments_dir()` finds this
folder in a source checkout, an editable install and a wheel install alike.
"""
