"""Measure the CPU levers for training throughput, JAX variants and PyTorch eager in one process.

Every variant trains the same model (Adam, softmax cross-entropy, float32) on the same synthetic,
device-resident batches; timed windows of the variants are interleaved (A B C A B C ...) so a noisy,
shared machine hits them alike, and each variant reports the median and best window.

  fast         one jitted train step per call with the CPU fast paths (cnn_jax.fast_paths; the default)
  plain        the same without them (the default layers: XLA's own lowering and options)
  fast/K=V/..  the fast paths with some turned off or changed (`FastPathPolicy` fields):
                 eigen=0        keep XLA's default YNNPACK convolutions (no compiler options)
                 in=N, out=M    planar im2col for convs with <= N input channels and <= M outputs
                 patch=BYTES    ... whose patches fit in BYTES
                 pool=0         XLA's reduce-window max pooling
                 small=0        XLA's conv also for inputs smaller than the kernel
  +scanK       K steps per call: `lax.scan` over K device-resident batches (no Python per step)
  +xla:K=V;K=V extra XLA options for this variant's compilation only (jit compiler_options), e.g.
               "xla:xla_cpu_use_onednn=true" -- lets flags be compared inside one process
  torch        PyTorch eager, `torch.set_num_threads(threads)`

List the available XLA flags with `XLA_FLAGS=--help python -c "import jax; jax.numpy.ones(1)"`.

  python benchmarks/cpu_levers.py --model lenet5 --batch-size 128 --variants plain,fast,fast/eigen=0,torch
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnn_jax import fast_paths
from cnn_jax.bench import BENCH_MODELS
from cnn_jax.models import get_model, model_options

POLICY_KEYS = {
    "eigen": ("eigen_convolutions", lambda v: v not in ("0", "false")),
    "in": ("planar_conv_max_in_channels", int),
    "out": ("planar_conv_max_out_features", int),
    "patch": ("planar_conv_max_patch_bytes", int),
    "pool": ("reshape_max_pool", lambda v: v not in ("0", "false")),
    "small": ("small_input_im2col", lambda v: v not in ("0", "false")),
}


def parse_policy(spec: str) -> fast_paths.FastPathPolicy:
    """'eigen=0/in=1' -> FastPathPolicy(eigen_convolutions=False, planar_conv_max_in_channels=1)."""
    changes = {}
    for tok in filter(None, spec.split("/")):
        key, _, value = tok.partition("=")
        if key not in POLICY_KEYS or not value:
            raise SystemExit(f"unknown policy setting {tok!r}; expected one of {sorted(POLICY_KEYS)}=VALUE")
        field, convert = POLICY_KEYS[key]
        changes[field] = convert(value)
    return dataclasses.replace(fast_paths.DEFAULT_POLICY, **changes)


def parse_compiler_options(spec: str) -> dict:
    """'xla_cpu_use_onednn=true;xla_cpu_prefer_vector_width=512' -> compiler_options dict."""
    out = {}
    for item in filter(None, spec.split(";")):
        key, value = item.split("=", 1)
        if value in ("true", "false"):
            out[key] = value == "true"
        elif value.lstrip("-").isdigit():
            out[key] = int(value)
        else:
            out[key] = value
    return out


def make_jax_variant(model, tx, batches, *, scan_steps: int, fast: bool,
                     policy: fast_paths.FastPathPolicy | None = None, compiler_options=None,
                     seed: int = 0):
    """Returns (run(n_steps) -> None that blocks, compile_seconds)."""
    images = batches[0]  # [S, B, ...] device arrays
    num_batches = images.shape[0]
    variables = model.init({"params": jax.random.key(seed), "dropout": jax.random.key(1)},
                           images[0, :1], train=False)
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    opt_state = tx.init(params)

    def one_step(carry, i, data):
        params, stats, opt_state = carry
        x = data[0][i % num_batches]
        y = data[1][i % num_batches]

        def loss_fn(p):
            v = {"params": p, **({"batch_stats": stats} if stats else {})}
            logits, new = model.apply(v, x, train=True, rngs={"dropout": jax.random.fold_in(jax.random.key(2), i)},
                                      mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

        (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, new.get("batch_stats", stats), opt_state), loss

    k = max(scan_steps, 1)

    def many(carry, start, data):
        carry, losses = jax.lax.scan(lambda c, i: one_step(c, i, data), carry, start + jnp.arange(k))
        return carry, losses[-1]

    def single(carry, i, data):
        return one_step(carry, i, data)

    fn = jax.jit(many if scan_steps else single, donate_argnums=0)
    carry = (params, stats, opt_state)
    t0 = time.perf_counter()
    fast_options = fast_paths.compiler_options(jax.devices(), policy or fast_paths.DEFAULT_POLICY)
    options = {**((fast_options or {}) if fast else {}), **(compiler_options or {})}
    compiled = fn.lower(carry, jnp.int32(0), batches).compile(compiler_options=options or None)
    compile_s = time.perf_counter() - t0
    state = {"carry": carry, "i": 0}

    def run(n_steps: int):
        carry, i = state["carry"], state["i"]
        loss = None
        for _ in range(n_steps // k):
            carry, loss = compiled(carry, jnp.int32(i), batches)
            i += k
        jax.block_until_ready(loss)
        state["carry"], state["i"] = carry, i

    return run, compile_s


def make_torch_variant(name, spec, batch_size, threads, num_batches, seed=0):
    import torch
    from torch_models import count_params, get_torch_model

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    model = get_torch_model(name, num_classes=spec["num_classes"], input_shape=spec["input_shape"],
                            **spec["options"])
    model.train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    h, w, c = spec["input_shape"]
    xs = [torch.randn(batch_size, c, h, w) for _ in range(num_batches)]
    ys = [torch.randint(0, spec["num_classes"], (batch_size,)) for _ in range(num_batches)]
    state = {"i": 0}

    def run(n_steps: int):
        i = state["i"]
        for _ in range(n_steps):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(xs[i % num_batches]), ys[i % num_batches])
            loss.backward()
            opt.step()
            i += 1
        loss.item()
        state["i"] = i

    return run, count_params(model)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lenet5")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--variants", default="plain,fast,fast/eigen=0,fast/in=0,fast/pool=0,torch")
    p.add_argument("--steps", type=int, default=40, help="steps per timed window")
    p.add_argument("--windows", type=int, default=7)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--num-batches", type=int, default=8, help="distinct resident batches cycled")
    p.add_argument("--json", help="append one JSON line with the results to this file")
    args = p.parse_args(argv)

    spec = BENCH_MODELS[args.model]
    tx = optax.adam(1e-3)
    rng = np.random.default_rng(0)
    b = args.batch_size
    images = jnp.asarray(rng.standard_normal((args.num_batches, b, *spec["input_shape"]), np.float32))
    labels = jnp.asarray(rng.integers(0, spec["num_classes"], (args.num_batches, b)), jnp.int32)

    runs, info = {}, {}
    for v in args.variants.split(","):
        if v == "torch":
            runs[v], n = make_torch_variant(args.model, spec, b, args.threads, args.num_batches)
            info[v] = {"params": n}
            continue
        parts = v.split("+")
        base, _, policy_spec = parts[0].partition("/")
        if base not in ("fast", "plain"):
            raise SystemExit(f"variant {v!r} must start with 'fast', 'plain' or be 'torch'")
        xla = [p for p in parts[1:] if p.startswith("xla:")]
        scans = [p for p in parts[1:] if p.startswith("scan")]
        scan = int(scans[0][4:]) if scans else 0
        if args.steps % max(scan, 1):
            raise SystemExit(f"--steps {args.steps} must be a multiple of the scan length {scan}")
        policy = parse_policy(policy_spec)
        modules = fast_paths.modules(policy) if base == "fast" else {}
        fields = model_options(args.model)
        model = get_model(args.model, num_classes=spec["num_classes"], **spec["options"],
                          **{k: m for k, m in modules.items() if k in fields})
        runs[v], c = make_jax_variant(
            model, tx, (images, labels), scan_steps=scan, fast=base == "fast",
            policy=policy, compiler_options=parse_compiler_options(xla[0][4:]) if xla else None,
        )
        info[v] = {"compile_s": round(c, 2)}
    for run in runs.values():  # warm-up
        run(args.steps)
    times = {v: [] for v in runs}
    cpu_times = {v: [] for v in runs}
    for _ in range(args.windows):
        for v, run in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run(args.steps)
            times[v].append(time.perf_counter() - t0)
            cpu_times[v].append(time.process_time() - c0)
    result = {
        "model": args.model, "batch_size": b, "threads": args.threads,
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_avg_1m": os.getloadavg()[0], "variants": {},
    }
    ref = statistics.median(times["torch"]) if "torch" in times else None
    for v, ts in times.items():
        med, best = statistics.median(ts), min(ts)
        cpu_ms = 1e3 * statistics.median(cpu_times[v]) / args.steps
        entry = {"images_per_sec_median": round(args.steps * b / med, 1),
                 "images_per_sec_best": round(args.steps * b / best, 1),
                 "cpu_ms_per_step_median": round(cpu_ms, 2), **info[v]}
        if ref:
            entry["ratio_vs_torch_median"] = round(ref / med, 3)
        result["variants"][v] = entry
        print(f"{args.model:15s} B={b:<4d} {v:14s} {entry['images_per_sec_median']:9.0f} img/s median "
              f"({entry['images_per_sec_best']:.0f} best)"
              + (f"  x{entry['ratio_vs_torch_median']:.2f} torch" if ref else "")
              + f"  cpu {cpu_ms:.1f} ms/step"
              + (f"  compile {info[v]['compile_s']}s" if "compile_s" in info[v] else ""))
    print(f"load average (1 min) at end: {result['load_avg_1m']:.2f}; XLA_FLAGS={result['xla_flags']!r}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
