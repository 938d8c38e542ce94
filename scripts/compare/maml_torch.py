#!/usr/bin/env python3
"""The sinusoid MAML meta-gradient in torch.func, for the GPU bar of issue 5 (metakernels'
fused kernel should be at least 20x faster on the same GPU) and as a CPU data point.

Same computation as `Maml::meta_gradient` and scripts/compare/maml_jax.py: 25 tasks, MLP
1-40-40-1 ReLU, K = 10 support and 10 query points, k inner SGD steps of alpha = 0.01, MSE, exact
second order: torch.func.grad of the adapted query loss through the unrolled inner loop
(grad-of-grad), vmap over tasks, mean over tasks.

    python3 -m venv /tmp/maml_torch_venv && /tmp/maml_torch_venv/bin/pip install torch
    /tmp/maml_torch_venv/bin/python scripts/compare/maml_torch.py --device cuda   # or cpu

Timing: best of `--reps` calls after warm-up; CUDA calls are timed with CUDA events around the
call (the same way metakernels' benchmarks time kernels). Prints one JSON object per k (the
GPU bundle's run.sh gathers lines starting with `{` into summary.json) after a readable line.
"""
import argparse
import json
import math
import time

import torch
from torch.func import functional_call, grad, vmap

SIZES = (1, 40, 40, 1)
TASKS, K, ALPHA = 25, 10, 0.01


def make_model(device):
    layers = []
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i + 2 < len(SIZES):
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).to(device)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=100)
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = make_model(dev)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def mse(p, x, y):
        return torch.mean((functional_call(model, p, (x,)) - y) ** 2)

    def batch():
        amp = torch.empty(TASKS, 1, 1, device=dev).uniform_(0.1, 5.0)
        phase = torch.empty(TASKS, 1, 1, device=dev).uniform_(0.0, math.pi)
        xs = torch.empty(TASKS, K, 1, device=dev).uniform_(-5, 5)
        xq = torch.empty(TASKS, K, 1, device=dev).uniform_(-5, 5)
        return xs, amp * torch.sin(xs - phase), xq, amp * torch.sin(xq - phase)

    data = batch()
    print(f"torch {torch.__version__} on {dev}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""))
    for steps in (1, 5):
        def adapted_query_loss(p, xs, ys, xq, yq):
            for _ in range(steps):
                g = grad(mse)(p, xs, ys)
                p = {k: p[k] - ALPHA * g[k] for k in p}
            return mse(p, xq, yq)

        per_task_grad = vmap(grad(adapted_query_loss), in_dims=(None, 0, 0, 0, 0))

        def meta(p):
            grads = per_task_grad(p, *data)
            return {k: v.mean(0) for k, v in grads.items()}

        for _ in range(3):
            meta(params)
        best = float("inf")
        for _ in range(args.reps):
            if dev.type == "cuda":
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                meta(params)
                stop.record()
                stop.synchronize()
                best = min(best, start.elapsed_time(stop))
            else:
                t0 = time.perf_counter()
                meta(params)
                best = min(best, (time.perf_counter() - t0) * 1e3)
        shape = f"T{TASKS} 1-40-40-1 K{K} k{steps} f32 second order"
        print(f"[torch.func] maml/sinusoid_meta_gradient {shape}: {best:.4f} ms")
        print(json.dumps({
            "kernel": "torch.func maml/sinusoid_meta_gradient (vmap of grad of grad)",
            "shape": shape, "steps": steps, "device": str(dev), "ms": best, "torch": torch.__version__,
        }))


if __name__ == "__main__":
    main()
