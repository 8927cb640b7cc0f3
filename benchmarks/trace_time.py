"""Benchmark: how the first `fit` step grows with the number of experts.

A 2-layer model of `keras_moe.HierarchicalMoE` layers (d = h = 16, `g x g`
experts, k = 2 per level, dropless) is trained for one step, then one more:
the first step holds tracing, graph optimisation and one step, the second
is one step. Each case runs in its own process, both dropless strategies
(`keras_moe.dispatch.dropless_dispatch`'s `"unrolled"` Python loop over the
experts and its `"loop"` `tf.while_loop`), each under a time limit: a case
that does not finish in time is reported as `not finished`.

Usage:
    python benchmarks/trace_time.py [--experts 256 1024 4096] [--limit 300]
        [--layers hier flat] [--out benchmarks/results/trace_time.json]

`--layers flat` uses flat `MoE(E, k=4)` layers instead: their gating has
no per-group loop, so only the dispatch depends on `E`.

Prints a table and writes JSON, with the trace-time growth from the
smallest to the largest `E` of each layer kind and strategy (trace time =
first step - next step) and the load average of the machine (other jobs
share it; compare rows of one run).
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

D = H = 16
BATCH = 1024


def run_case(num_experts, strategy, layer="hier"):
    """One case in this process: `(first step s, next step s)`."""
    import keras
    import numpy as np

    import keras_moe
    from keras_moe import dispatch

    # The benchmark forces each strategy through the automatic choice.
    dispatch.LOOP_MIN_EXPERTS = 1 if strategy == "loop" else 10**9
    groups = math.isqrt(num_experts)
    assert groups * groups == num_experts, num_experts
    keras.utils.set_random_seed(0)
    if layer == "hier":
        layers = [keras_moe.HierarchicalMoE(groups, groups, H, seed=s) for s in (1, 2)]
    else:
        # Flat MoE, k = 4 (as 2 + 2): no per-group loop in the gating, so
        # the dispatch's own share of the trace time shows.
        layers = [keras_moe.MoE(num_experts, H, k=4, seed=s) for s in (1, 2)]
    model = keras.Sequential([keras.Input((D,)), *layers])
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, D)).astype("float32")
    y = rng.normal(size=(BATCH, D)).astype("float32")
    times = []
    for _ in range(2):
        start = time.perf_counter()
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
        times.append(time.perf_counter() - start)
    return times


def run_limited(num_experts, strategy, limit, layer="hier"):
    """A case in a child process, killed after `limit` seconds."""
    command = [sys.executable, __file__, "--case", str(num_experts), strategy, layer]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return dict(finished=False, wall_s=time.perf_counter() - start)
    if done.returncode != 0:
        raise RuntimeError(f"case {num_experts} {strategy} failed:\n{done.stderr[-3000:]}")
    first, second = json.loads(done.stdout.strip().splitlines()[-1])
    return dict(finished=True, first_step_s=first, next_step_s=second)


def fmt(row, key):
    return f"{row[key]:9.2f}" if row["finished"] else f"{'not fin.':>9}"


def print_table(rows, limit):
    print(f"{'layer':5} {'E':>5} {'strategy':9} {'first s':>9} {'next s':>9}")
    for r in rows:
        print(
            f"{r['layer']:5} {r['num_experts']:>5} {r['strategy']:9} {fmt(r, 'first_step_s')} "
            f"{fmt(r, 'next_step_s')}"
            + ("" if r["finished"] else f"   (not finished within {limit} s)"),
            flush=True,
        )


def growth(rows):
    """`{layer/strategy: trace(E_max) / trace(E_min)}`, trace = first step - next step."""
    out = {}
    for key in sorted({(r["layer"], r["strategy"]) for r in rows}):
        done = sorted(
            (r["num_experts"], r["first_step_s"] - r["next_step_s"]) for r in rows
            if (r["layer"], r["strategy"]) == key and r["finished"]
        )
        if len(done) >= 2:
            out[f"{key[0]}/{key[1]}"] = dict(
                experts=[done[0][0], done[-1][0]], trace_s=[done[0][1], done[-1][1]],
                ratio=done[-1][1] / done[0][1],
            )
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--strategies", nargs="+", default=["loop", "unrolled"])
    parser.add_argument("--limit", type=float, default=300.0, help="seconds per case")
    parser.add_argument("--out", default="benchmarks/results/trace_time.json")
    parser.add_argument(
        "--layers", nargs="+", choices=["hier", "flat"], default=["hier"],
        help="HierarchicalMoE (g x g experts) and/or flat MoE (k=4) layers",
    )
    parser.add_argument("--case", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(int(args.case[0]), args.case[1], args.case[2])))
        return None
    rows = []
    for layer in args.layers:
        for strategy in args.strategies:
            for num_experts in args.experts:
                row = dict(
                    layer=layer, num_experts=num_experts, strategy=strategy, d=D, h=H,
                    batch=BATCH,
                )
                row.update(run_limited(num_experts, strategy, args.limit, layer))
                row["loadavg"] = os.getloadavg()
                rows.append(row)
                print_table(rows[-1:], args.limit)
    print()
    print_table(rows, args.limit)
    ratios = growth(rows)
    for key, g in ratios.items():
        print(
            f"trace time {key}: {g['trace_s'][0]:.2f} s at E={g['experts'][0]}, "
            f"{g['trace_s'][1]:.2f} s at E={g['experts'][1]}: x{g['ratio']:.2f}"
        )
    import keras
    import tensorflow as tf

    result = dict(
        benchmark="trace_time",
        models=dict(
            hier="2 x HierarchicalMoE(g, g, h=16), E = g * g, k=2+2, d=16, dropless, Adam, mse",
            flat="2 x MoE(E, h=16), k=4, d=16, dropless, Adam, mse",
        ),
        batch=BATCH,
        limit_s=args.limit,
        machine=dict(
            platform=platform.platform(), cpu_count=os.cpu_count(),
            python=sys.version.split()[0], tensorflow=tf.__version__, keras=keras.__version__,
        ),
        rows=rows,
        trace_growth=ratios,
        loadavg_at_end=os.getloadavg(),
    )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
