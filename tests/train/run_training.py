"""Subprocess driver for the training tests: run `train_and_evaluate`, export the final params.

python run_training.py --config JSON --workdir DIR [--max-steps N] [--out params.npz]
    [--coordinator HOST:PORT --num-processes P --process-id I]

Prints (flushed, so a test can kill the process at a chosen moment) `start <json>` when training
starts (the reporter's on_start info: resumed_from, damaged_checkpoints, ...), one line
`progress <step>` per reported train call, `saving <step>` as soon as an asynchronous checkpoint
save has started (its files are still being written in the background) and `results <json>` at
the end.
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--coordinator", default=None)
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--step-delay", type=float, default=0.0, help="sleep per report (s)")
    args = p.parse_args()

    import jax

    if args.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        from cnn_jax import parallel

        parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)

    import time

    from cnn_jax.config import config_from_json
    from cnn_jax.train import Reporter, export_npz, load, train_and_evaluate
    from cnn_jax.train.checkpoints import CheckpointStore

    save = CheckpointStore.save

    def announced_save(self, step, *rest, **kwargs):
        started = save(self, step, *rest, **kwargs)
        if started:
            print(f"saving {step}", flush=True)
        return started

    CheckpointStore.save = announced_save

    class PrintReporter(Reporter):
        def on_start(self, info):
            print("start " + json.dumps(info, default=str), flush=True)

        def on_train_step(self, step, total_steps, metrics):
            print(f"progress {step}", flush=True)
            if args.step_delay:
                time.sleep(args.step_delay)

    config = config_from_json(args.config)
    results = train_and_evaluate(
        config, args.workdir, max_steps=args.max_steps, reporter=PrintReporter()
    )
    if args.out:
        _, variables, _ = load(args.workdir, "latest")  # collective: every process
        if jax.process_index() == 0:
            export_npz(variables, args.out)
    print("results " + json.dumps(results, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
