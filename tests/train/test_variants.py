"""`train_and_evaluate` with the other back end, feeder and training options switched on."""

import json

import pytest
from train_helpers import tiny_config

from cnn_jax.train import evaluate, train_and_evaluate

VARIANTS = {
    "pmap_resident_batchnorm": [
        "train.backend=pmap",
        "model.options.norm='batch'",
    ],
    "jit_streaming": [
        "dataset.feeder=streaming",
    ],
    "pmap_streaming": [
        "train.backend=pmap",
        "dataset.feeder=streaming",
    ],
    "compiled_loop_bf16_accum_sgd_dropout": [
        "train.steps_per_call=5",
        "train.half_precision=True",
        "train.batch_size=16",  # 2 micro-batches of 8: one example per device
        "train.grad_accum_steps=2",
        "train.label_smoothing=0.1",
        "model.options.dropout_rate=0.3",
        "optimizer.name=sgd",
        "optimizer.nesterov=True",
        "optimizer.learning_rate=0.05",
        "optimizer.weight_decay=1e-4",
        "optimizer.schedule=cosine",
        "optimizer.warmup_epochs=0.25",
        "optimizer.grad_clip_norm=1.0",
        "checkpoint.every_steps=12",
    ],
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_evaluates_and_resumes(tmp_path, name):
    config = tiny_config("train.num_epochs=1", *VARIANTS[name])
    first = train_and_evaluate(config, tmp_path, max_steps=12)
    assert first["steps"] == 12
    results = train_and_evaluate(config, tmp_path)
    assert results["steps"] == 256 // config.train.batch_size and results["resumed_from"] == 12
    assert results["final_test_accuracy"] > 0.15  # above chance (0.1) after one epoch
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    test = [r for r in records if r["split"] == "test"]
    assert test[-1]["count"] == 256
    metrics = evaluate(tmp_path, "latest")
    assert metrics["accuracy"] == pytest.approx(results["final_test_accuracy"], abs=1e-6)
