"""The README's reuse examples run as written (a code sample that rots is worse than none)."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def _section_code(title: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"### {title}")
    end = text.index("\n### ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.DOTALL)


def test_reuse_examples_run():
    blocks = _section_code("Reusing the modules in another JAX project")
    assert len(blocks) == 4
    namespace: dict = {}
    for code in blocks[:3]:  # the fourth loads a trained run (tests/train/test_loop.py covers it)
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 (our own README)
    assert namespace["logits"].shape == (8, 10)
    assert np.isfinite(float(namespace["metrics"]["loss"]))
    norm = namespace["group_norm"].norm
    assert norm.func.__name__ == "GroupNorm" and norm.keywords == {"num_groups": 32}
    assert "cnn_jax.load(" in blocks[3]
