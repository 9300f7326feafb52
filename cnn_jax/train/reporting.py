"""Progress hooks: `train_and_evaluate` calls these; the library itself never prints."""

from __future__ import annotations


class Reporter:
    """Base class with no-op hooks; override the ones you need (the CLI draws a progress bar).

    Hooks are called on every process of a multi-host job; filter with `jax.process_index()`.
    """

    def on_start(self, info: dict) -> None:
        """Training is about to start. info: total_steps, start_step, steps_per_epoch,
        num_params, input_shape, num_classes, num_devices, backend, feeder, resumed_from, ..."""

    def on_train_step(self, step: int, total_steps: int, metrics: dict) -> None:
        """Called after each compiled call (every few steps). metrics: loss, accuracy,
        top5_accuracy (averages since the previous call), images_per_sec, epoch."""

    def on_eval(self, step: int, metrics: dict) -> None:
        """An evaluation finished. metrics: loss, accuracy, top5_accuracy, epoch, step."""

    def on_end(self, results: dict) -> None:
        """Training ended (the results dict of `train_and_evaluate`)."""
