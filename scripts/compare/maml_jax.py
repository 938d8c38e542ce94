#!/usr/bin/env python3
"""The sinusoid MAML meta-gradient in JAX, for a side-by-side with `cargo bench --bench maml`.

Same computation as metakernels' `Maml::meta_gradient`: 25 tasks, MLP 1-40-40-1 ReLU,
K = 10 support and 10 query points, k inner SGD steps of alpha = 0.01, MSE, exact second order
(jax.grad through the unrolled inner loop), vmap over tasks, mean over tasks, all under jax.jit.
First order (stop_gradient on the inner gradients) is timed too.

    python3 -m venv /tmp/maml_jax_venv && /tmp/maml_jax_venv/bin/pip install "jax[cpu]"
    /tmp/maml_jax_venv/bin/python scripts/compare/maml_jax.py            # k = 1 and 5
    /tmp/maml_jax_venv/bin/python scripts/compare/maml_jax.py --check    # also prints a checksum

Timing: best wall-clock time of `--reps` calls after warm-up (compilation excluded), each call
ending in block_until_ready. Threads: XLA's CPU defaults (all cores).
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

SIZES = (1, 40, 40, 1)
TASKS, K, ALPHA = 25, 10, 0.01


def init(key):
    params = []
    for fan_in, fan_out in zip(SIZES[:-1], SIZES[1:]):
        key, kw, kb = jax.random.split(key, 3)
        bound = 1.0 / np.sqrt(fan_in)
        params.append((jax.random.uniform(kw, (fan_out, fan_in), jnp.float32, -bound, bound),
                       jax.random.uniform(kb, (fan_out,), jnp.float32, -bound, bound)))
    return params


def forward(params, x):  # x: [N, 1]
    h = x
    for i, (w, b) in enumerate(params):
        h = h @ w.T + b
        if i + 1 < len(params):
            h = jax.nn.relu(h)
    return h


def mse(params, x, y):
    return jnp.mean((forward(params, x) - y) ** 2)


def make_meta(steps, second_order):
    def adapted_query_loss(params, xs, ys, xq, yq):
        for _ in range(steps):
            g = jax.grad(mse)(params, xs, ys)
            if not second_order:
                g = jax.lax.stop_gradient(g)
            params = jax.tree_util.tree_map(lambda p, g: p - ALPHA * g, params, g)
        return mse(params, xq, yq)

    def meta(params, xs, ys, xq, yq):
        def mean_loss(p):
            losses = jax.vmap(adapted_query_loss, in_axes=(None, 0, 0, 0, 0))(p, xs, ys, xq, yq)
            return jnp.mean(losses)
        return jax.value_and_grad(mean_loss)(params)

    return jax.jit(meta)


def batch(rng):
    amp = rng.uniform(0.1, 5.0, (TASKS, 1, 1))
    phase = rng.uniform(0.0, np.pi, (TASKS, 1, 1))
    xs = rng.uniform(-5, 5, (TASKS, K, 1))
    xq = rng.uniform(-5, 5, (TASKS, K, 1))
    f = lambda x: amp * np.sin(x - phase)
    return [jnp.asarray(a, jnp.float32) for a in (xs, f(xs), xq, f(xq))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    params = init(jax.random.PRNGKey(0))
    data = batch(np.random.default_rng(1))
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)")
    for steps in (1, 5):
        for second in (True, False):
            fn = make_meta(steps, second)
            out = fn(params, *data)
            jax.block_until_ready(out)
            best = float("inf")
            for _ in range(args.reps):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(params, *data))
                best = min(best, time.perf_counter() - t0)
            order = "second" if second else "first"
            line = f"[jax] maml/sinusoid_meta_gradient T{TASKS} 1-40-40-1 K{K} k{steps} f32 {order} order: {best * 1e3:.4f} ms"
            if args.check:
                line += f"  loss {float(out[0]):.6f}"
            print(line)


if __name__ == "__main__":
    main()
