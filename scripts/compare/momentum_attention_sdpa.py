#!/usr/bin/env python3
"""Side-by-side numbers for momentum attention: PyTorch's scaled_dot_product_attention (flash
backend) on the issue's shapes, plus the unfused momentum baseline in PyTorch (SDPA, then a
separate decayed-sum pass), and the measured bf16 GEMM rate of the same GPU.

Counts FLOPs as this crate's bench does: 2·B·H·T²·D for the causal forward, 3.5× that for
forward+backward. Run it on the GPU machine next to `cargo bench --bench momentum_attention`:

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch
    /tmp/venv/bin/python scripts/compare/momentum_attention_sdpa.py            # CUDA, bf16
    /tmp/venv/bin/python scripts/compare/momentum_attention_sdpa.py --device cpu --dtype f32 \
        --shapes 1,16,4096,64                                                 # CPU bar shape

Prints one JSON object per line.
"""
import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
ISSUE_SHAPES = "4,16,4096,128;8,16,2048,64;1,16,16384,128"


def timed(fn, device, reps):
    """Best wall time of `reps` calls in ms (after one warm-up), synchronising on CUDA."""
    fn()
    best = math.inf
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) * 1e3)
    return best


def momentum(v, eta):
    """m_t = Σ_{i<t} η^{t−i} v_i as a separate pass: a depthwise causal convolution over time
    with the weights η^1..η^H, H the lags above f32 resolution (as the fused kernels keep)."""
    if eta == 0.0:
        return torch.zeros_like(v)
    b, h, t, d = v.shape
    lags = min(t, math.ceil(24 / -math.log2(eta)))
    w = torch.tensor([eta ** n for n in range(lags, 0, -1)], dtype=v.dtype, device=v.device)
    x = v.permute(0, 1, 3, 2).reshape(1, b * h * d, t)
    x = F.pad(x, (lags, 0))[..., :-1]  # shift by one: only i < t contributes
    m = F.conv1d(x, w.view(1, 1, -1).expand(b * h * d, 1, lags), groups=b * h * d)
    return m.reshape(b, h, d, t).permute(0, 1, 3, 2)


def sdpa(q, k, v, device):
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def gemm_rate(device, dtype, reps):
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    ms = timed(lambda: a @ a, device, reps)
    return 2 * n**3 / ms / 1e9  # TFLOP/s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=DTYPES)
    ap.add_argument("--shapes", default=ISSUE_SHAPES, help="B,H,T,D;B,H,T,D;...")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]
    dev = args.device
    print(json.dumps({"kernel": f"torch matmul {args.dtype}", "device": dev, "tflops": gemm_rate(dev, dtype, args.reps)}))
    for spec in args.shapes.split(";"):
        b, h, t, d = map(int, spec.split(","))
        flops = 2 * b * h * t * t * d
        q, k, v = (torch.randn(b, h, t, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
        for eta in (0.0, 0.9):
            def forward():
                out = sdpa(q, k, v, dev)
                return out + momentum(v, eta) if eta > 0 else out

            def forward_backward():
                out = forward()
                out.backward(out.detach())

            for name, fn, work in (("forward", forward, flops), ("forward+backward", forward_backward, 3.5 * flops)):
                if dev == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                with torch.no_grad() if name == "forward" else torch.enable_grad():
                    ms = timed(fn, dev, args.reps)
                peak = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else None
                print(json.dumps({
                    "kernel": f"torch sdpa{' + separate momentum pass' if eta > 0 else ''} {name}",
                    "shape": f"B{b} H{h} T{t} D{d} {args.dtype}", "eta": eta, "device": dev,
                    "ms": ms, "tflops": work / ms / 1e9, "peak_mib": peak,
                }))


if __name__ == "__main__":
    main()
