"""One Lloyd iteration of scikit-learn's KMeans at (N, D, K) = (200000, 64, 256), f32, to set
beside `cargo bench --bench kmeans` (whose first report lines time metakernels' assign + update
on the same shape).

Usage (a venv under /tmp):
    python3 -m venv /tmp/skl && /tmp/skl/bin/pip install scikit-learn threadpoolctl
    /tmp/skl/bin/python scripts/compare/kmeans_sklearn.py [--threads 2]

Two timings, best of several repetitions, both with the same thread count as rayon uses:
  * `lloyd_iter`: sklearn's own single Lloyd step (`lloyd_iter_chunked_dense`: chunked BLAS GEMM
    distances, argmin, per-thread centroid sums), exactly one assignment + update — the fair
    counterpart of metakernels' assign + update;
  * `fit(max_iter=1)`: `KMeans(n_clusters=K, init=C, n_init=1, max_iter=1, algorithm="lloyd")`,
    which adds input checks, ‖x‖² and a final relabelling pass to the step above.
"""
import argparse
import os
import time

import numpy as np
from threadpoolctl import threadpool_limits


def best(f, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def main():
    ap = argparse.ArgumentParser()
    # rayon uses every core by default: so does this, unless told otherwise.
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--shape", type=int, nargs=3, default=[200000, 64, 256])
    args = ap.parse_args()
    n, d, k = args.shape
    # The bench's data: uniform in [-1, 1), its first K rows as the centroids (the values differ,
    # the distribution and the cost do not: every distance is computed either way).
    rng = np.random.default_rng(42)
    x = rng.uniform(-1.0, 1.0, size=(n, d)).astype(np.float32)
    c = x[:k].copy()

    import sklearn
    from sklearn.cluster import KMeans
    from sklearn.cluster._k_means_lloyd import lloyd_iter_chunked_dense

    with threadpool_limits(limits=args.threads):
        w = np.ones(n, dtype=np.float32)
        centers_new = np.zeros_like(c)
        weight_in_clusters = np.zeros(k, dtype=np.float32)
        labels = np.full(n, -1, dtype=np.int32)
        shift = np.zeros(k, dtype=np.float32)

        def step():
            lloyd_iter_chunked_dense(x, w, c, centers_new, weight_in_clusters, labels, shift, args.threads)

        step_ms = best(step, args.reps)

        def fit():
            KMeans(n_clusters=k, init=c, n_init=1, max_iter=1, algorithm="lloyd").fit(x)

        fit_ms = best(fit, max(3, args.reps // 2))
    print(f"scikit-learn {sklearn.__version__}, {args.threads} threads, N{n} D{d} K{k} f32")
    print(f"[sklearn] lloyd_iter (assign+update)  {step_ms:9.2f} ms  {2*n*d*k/step_ms/1e6:8.2f} GFLOP/s")
    print(f"[sklearn] fit(max_iter=1)             {fit_ms:9.2f} ms")


if __name__ == "__main__":
    main()
