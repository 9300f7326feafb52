"""Shared by the benchmark scripts: machine and version facts, JSON output, RESULTS.md sections."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"
RESULTS_DIR = BENCH_DIR / "results"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def accelerator() -> str:
    import jax

    d = jax.devices()[0]
    if d.platform == "cpu":
        return "none (CPU only)"
    return f"{len(jax.devices())} x {d.device_kind}"


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "accelerator": accelerator(),
        "os": f"{platform.system()} {platform.release()}",
        "load_average_at_start": round(os.getloadavg()[0], 2),
    }


def command_line() -> str:
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in ("XLA_FLAGS",) if os.environ.get(k))
    cmd = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    return f"{env} {cmd}".strip()


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def replace_section(name: str, body: str, path: Path = RESULTS_MD) -> None:
    """Writes `body` between `<!-- name:start -->` and `<!-- name:end -->` in RESULTS.md,
    appending the section if it is not there yet."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def header_lines(meta: dict) -> list[str]:
    m, v = meta["machine"], meta["versions"]
    return [
        f"- Date: {meta['date']}",
        f"- Command: `{meta['command']}`",
        f"- Machine: {m['cpu']}, {m['cores']} cores, accelerator: {m['accelerator']}; {m['os']}",
        (f"- Load average (1 min): {m['load_average_at_start']} at start, "
        f"{meta.get('load_average_at_end', '?')} at end (the machine is shared; above ~{m['cores']} "
        "means other processes competed for the cores)"),
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '')}`",
    ]
