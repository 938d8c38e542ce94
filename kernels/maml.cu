// Second-order MAML on MLPs: forward, gradient, exact Hessian-vector products (R-operator,
// forward-over-reverse) and the whole k-step meta-gradient.
//
// Two engines compute the same thing (T = f32 | f64):
//
// Fused, one thread block per task, everything in dynamic shared memory:
//   maml_meta_<T>       the whole meta-gradient in one launch for the meta-batch: the k inner SGD
//                       steps, the query gradient and the k reverse HVP steps g <- g - a*H_j g.
//                       Every per-task buffer (current parameters, g, Hg, activations, deltas and
//                       their R{} directions) lives in shared memory; only the inner iterates
//                       theta_1..theta_{k-1} go to global memory. When given `mean`, the last
//                       block to finish also takes the mean over tasks (maml_mean_rows' sums,
//                       so the bits match), and the call is one launch.
//   mlp_op_<T>          forward / loss+gradient / HVP of T tasks, same engine.
//
// Per-layer, orchestrated from the host (src/ops/maml/layered.rs), every launch batched over
// all tasks; used when the fused workspace does not fit in shared memory, and as the reference:
//   maml_gemm_tiled_<T> C (+)= A.B per task, 64x64 output tiles staged through shared memory,
//                       tasks on gridDim.z: the layer products of the (R-)forward and
//                       (R-)backward passes.
//   maml_gemm_naive_<T> the same product, one thread per output element, a plain loop: the
//                       reference the GPU tests hold the fused and tiled paths against.
//   maml_bias_act_<T>, maml_r_bias_act_<T>, maml_loss_rows_<T>, maml_task_loss_<T>,
//   maml_col_sum_<T>, maml_act_back_<T>, maml_sgd_step_<T>, maml_descend_<T>
//                       the element-wise steps between the products, one thread per element.
//   maml_mean_rows_<T>  the mean over tasks of the per-task meta-gradients (fixed order:
//                       deterministic); shared by both engines.
//
// Layout of a parameter vector: for each layer l, W_l (fan_out x fan_in, row-major) then b_l.
// Activations are [n, width] row-major per layer. Accumulation is in T (f32 or f64).
#include "common.cuh"

namespace {

enum Act { ACT_RELU = 0, ACT_TANH = 1, ACT_GELU = 2, ACT_SOFTPLUS = 3 };
enum LossKind { LOSS_MSE = 0, LOSS_CE = 1 };

// Passed by value; must match `NetConfig` in src/ops/maml/cuda.rs.
struct NetConfig {
    int layers;
    int act;
    int loss;
    int params;     // P
    int rows;       // the largest sample count of the call (workspace row capacity)
    int act_elems;  // rows * sum of all layer widths (one activation buffer)
    int wide;       // rows * widest layer output (one delta buffer; never holds input width)
    int ws_elems;   // workspace elements per task
};

// Must match `MetaConfig` in src/ops/maml/cuda.rs.
struct MetaConfig {
    NetConfig net;
    int support;  // Ns
    int query;    // Nq
    int steps;    // k
    int second;   // 1: second order
    double lr;    // alpha
};

// ------------------------------------------------------------------ activations -------------
template <typename T> __device__ __forceinline__ T tanh_(T x);
template <> __device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
template <> __device__ __forceinline__ double tanh_(double x) { return tanh(x); }
template <typename T> __device__ __forceinline__ T exp_(T x);
template <> __device__ __forceinline__ float exp_(float x) { return expf(x); }
template <> __device__ __forceinline__ double exp_(double x) { return exp(x); }
template <typename T> __device__ __forceinline__ T log_(T x);
template <> __device__ __forceinline__ float log_(float x) { return logf(x); }
template <> __device__ __forceinline__ double log_(double x) { return log(x); }
template <typename T> __device__ __forceinline__ T log1p_(T x);
template <> __device__ __forceinline__ float log1p_(float x) { return log1pf(x); }
template <> __device__ __forceinline__ double log1p_(double x) { return log1p(x); }

template <typename T>
__device__ __forceinline__ T sigmoid(T z) {
    if (z >= T(0)) return T(1) / (T(1) + exp_(-z));
    const T e = exp_(z);
    return e / (T(1) + e);
}

constexpr double GELU_C = 0.7978845608028654;  // sqrt(2/pi)
constexpr double GELU_A = 0.044715;

template <typename T>
__device__ __forceinline__ T act_value(int act, T z) {
    switch (act) {
        case ACT_RELU: return z > T(0) ? z : T(0);
        case ACT_TANH: return tanh_(z);
        case ACT_GELU: return T(0.5) * z * (T(1) + tanh_(T(GELU_C) * (z + T(GELU_A) * z * z * z)));
        default: return (z > T(0) ? z : T(0)) + log1p_(exp_(-fabs(z)));
    }
}

// sigma'(z) and sigma''(z).
template <typename T>
__device__ __forceinline__ void act_derivs(int act, T z, T& d1, T& d2) {
    switch (act) {
        case ACT_RELU: d1 = z > T(0) ? T(1) : T(0); d2 = T(0); return;
        case ACT_TANH: {
            const T t = tanh_(z);
            d1 = T(1) - t * t;
            d2 = T(-2) * t * d1;
            return;
        }
        case ACT_GELU: {
            const T c = T(GELU_C), a = T(GELU_A);
            const T t = tanh_(c * (z + a * z * z * z));
            const T sech2 = T(1) - t * t;
            const T du = c * (T(1) + T(3) * a * z * z);
            const T ddu = T(6) * c * a * z;
            d1 = T(0.5) * (T(1) + t) + T(0.5) * z * sech2 * du;
            d2 = sech2 * (du + T(0.5) * z * (ddu - T(2) * t * du * du));
            return;
        }
        default: {
            const T s = sigmoid(z);
            d1 = s;
            d2 = s * (T(1) - s);
        }
    }
}

// ------------------------------------------------------------------ the block engine --------
// One task's buffers, carved from its block's dynamic shared memory.
template <typename T>
struct Work {
    T* z;       // pre-activations, all layers
    T* rz;      // R{z}
    T* h;       // activations (hidden layers; the last layer's slot is unused)
    T* rh;      // R{h}
    T* delta;   // dL/dz of the current layer
    T* delta_b; // ... of the layer below (ping-pong)
    T* rdelta;
    T* rdelta_b;
    T* scratch; // 32 values for block reductions
};

template <typename T>
__device__ Work<T> carve(T* base, const NetConfig& c) {
    Work<T> w;
    w.scratch = base;
    base += 32;
    w.z = base; base += c.act_elems;
    w.rz = base; base += c.act_elems;
    w.h = base; base += c.act_elems;
    w.rh = base; base += c.act_elems;
    w.delta = base; base += c.wide;
    w.delta_b = base; base += c.wide;
    w.rdelta = base; base += c.wide;
    w.rdelta_b = base;
    return w;
}

// The elements (per task) the engine needs besides any parameter-sized vectors.
// (Mirrored on the host in cuda.rs: 32 + 4*act_elems + 4*wide.)

// Offset of layer l's activations in an activation buffer.
__device__ __forceinline__ int act_offset(const int* sizes, int l, int rows) {
    int off = 0;
    for (int j = 0; j < l; ++j) off += sizes[j + 1];
    return off * rows;
}

// Forward pass of n samples at parameters p; with v != nullptr also R{z}, R{h} along v.
template <typename T>
__device__ void forward(const NetConfig& c, const int* sizes, const int* w_off, const T* p, const T* v,
                        const T* x, int n, Work<T>& w) {
    for (int l = 0; l < c.layers; ++l) {
        const int fi = sizes[l], fo = sizes[l + 1];
        const T* W = p + w_off[l];
        const T* b = W + fo * fi;
        const T* in = l == 0 ? x : w.h + act_offset(sizes, l - 1, c.rows);
        const T* rin = l == 0 ? nullptr : w.rh + act_offset(sizes, l - 1, c.rows);
        const int out = act_offset(sizes, l, c.rows);
        const bool hidden = l + 1 < c.layers;
        for (int idx = threadIdx.x; idx < n * fo; idx += blockDim.x) {
            const int s = idx / fo, o = idx - s * fo;
            const T* xr = in + s * fi;
            const T* wr = W + o * fi;
            // Neighbouring threads read rows of W that are fi apart: starting each thread's
            // reduction at its own offset makes the stride fi + 1, free of shared-memory bank
            // conflicts when fi is even (odd fi is conflict-free as it is).
            const int start = (fi & 1) ? 0 : o % fi;
            T acc = b[o];
            for (int k = 0, kk = start; k < fi; ++k) {
                acc += xr[kk] * wr[kk];
                if (++kk == fi) kk = 0;
            }
            w.z[out + idx] = acc;
            T racc = T(0);
            if (v != nullptr) {
                const T* V = v + w_off[l];
                const T* vr = V + o * fi;
                const T* rxr = rin != nullptr ? rin + s * fi : nullptr;
                racc = V[fo * fi + o];
                for (int k = 0, kk = start; k < fi; ++k) {
                    racc += xr[kk] * vr[kk];
                    if (rxr != nullptr) racc += rxr[kk] * wr[kk];
                    if (++kk == fi) kk = 0;
                }
                w.rz[out + idx] = racc;
            }
            if (hidden) {
                w.h[out + idx] = act_value(c.act, acc);
                if (v != nullptr) {
                    T d1, d2;
                    act_derivs(c.act, acc, d1, d2);
                    w.rh[out + idx] = d1 * racc;
                }
            }
        }
        __syncthreads();
    }
}

// The loss of the last forward pass (returned to every thread); writes delta = dL/dz_L and,
// with r, R{delta} = (d^2 L / dz^2) R{z_L}.
template <typename T>
__device__ T loss_head(const NetConfig& c, const int* sizes, const T* y, const unsigned* labels, int n, bool r,
                       Work<T>& w) {
    const int width = sizes[c.layers];
    const int out = act_offset(sizes, c.layers - 1, c.rows);
    const T* z = w.z + out;
    const T* rz = w.rz + out;
    T local = T(0);
    if (c.loss == LOSS_MSE) {
        const T scale = T(2) / T(n * width);
        for (int idx = threadIdx.x; idx < n * width; idx += blockDim.x) {
            const T e = z[idx] - y[idx];
            local += e * e;
            w.delta[idx] = scale * e;
            if (r) w.rdelta[idx] = scale * rz[idx];
        }
        local /= T(n * width);
    } else {
        const T inv_n = T(1) / T(n);
        for (int s = threadIdx.x; s < n; s += blockDim.x) {
            const T* zr = z + s * width;
            const int label = (int)labels[s];
            T m = zr[0];
            for (int j = 1; j < width; ++j) m = max(m, zr[j]);
            T total = T(0);
            for (int j = 0; j < width; ++j) total += exp_(zr[j] - m);
            const T inv = T(1) / total;
            T p_rz = T(0);
            if (r)
                for (int j = 0; j < width; ++j) p_rz += exp_(zr[j] - m) * inv * rz[s * width + j];
            for (int j = 0; j < width; ++j) {
                const T prob = exp_(zr[j] - m) * inv;
                w.delta[s * width + j] = inv_n * (prob - (j == label ? T(1) : T(0)));
                if (r) w.rdelta[s * width + j] = inv_n * prob * (rz[s * width + j] - p_rz);
            }
            local += (log_(total) + m - zr[label]) * inv_n;
        }
    }
    return mk::block_sum(local, w.scratch);  // its barriers also publish delta and rdelta
}

// Backward pass from delta: writes the gradient into grad (when not null); with v, also the
// R-backward pass, writing H v into hv.
template <typename T>
__device__ void backward(const NetConfig& c, const int* sizes, const int* w_off, const T* p, const T* v, T* hv,
                         const T* x, int n, T* grad, Work<T>& w) {
    T* delta = w.delta;
    T* delta_b = w.delta_b;
    T* rdelta = w.rdelta;
    T* rdelta_b = w.rdelta_b;
    for (int l = c.layers - 1; l >= 0; --l) {
        const int fi = sizes[l], fo = sizes[l + 1];
        const T* W = p + w_off[l];
        const T* in = l == 0 ? x : w.h + act_offset(sizes, l - 1, c.rows);
        const T* rin = l == 0 ? nullptr : w.rh + act_offset(sizes, l - 1, c.rows);
        // dW = delta^T in;  R{dW} = R{delta}^T in + delta^T R{in}.
        for (int idx = threadIdx.x; idx < fo * fi; idx += blockDim.x) {
            const int o = idx / fi, i = idx - o * fi;
            T acc = T(0), racc = T(0);
            for (int s = 0; s < n; ++s) {
                const T d = delta[s * fo + o];
                const T a = in[s * fi + i];
                acc += d * a;
                if (v != nullptr) {
                    racc += rdelta[s * fo + o] * a;
                    if (rin != nullptr) racc += d * rin[s * fi + i];
                }
            }
            if (grad != nullptr) grad[w_off[l] + idx] = acc;
            if (v != nullptr) hv[w_off[l] + idx] = racc;
        }
        for (int o = threadIdx.x; o < fo; o += blockDim.x) {
            T acc = T(0), racc = T(0);
            for (int s = 0; s < n; ++s) {
                acc += delta[s * fo + o];
                if (v != nullptr) racc += rdelta[s * fo + o];
            }
            if (grad != nullptr) grad[w_off[l] + fo * fi + o] = acc;
            if (v != nullptr) hv[w_off[l] + fo * fi + o] = racc;
        }
        if (l > 0) {
            // dh = delta W;  delta_below = dh * sigma'(z_below);
            // R{delta_below} = (R{delta} W + delta V) * sigma' + dh * sigma'' * R{z_below}.
            const int below = act_offset(sizes, l - 1, c.rows);
            const T* V = v != nullptr ? v + w_off[l] : nullptr;
            for (int idx = threadIdx.x; idx < n * fi; idx += blockDim.x) {
                const int s = idx / fi, i = idx - s * fi;
                T g = T(0), rg = T(0);
                for (int o = 0; o < fo; ++o) {
                    const T d = delta[s * fo + o];
                    g += d * W[o * fi + i];
                    if (V != nullptr) rg += rdelta[s * fo + o] * W[o * fi + i] + d * V[o * fi + i];
                }
                T d1, d2;
                act_derivs(c.act, w.z[below + idx], d1, d2);
                delta_b[idx] = g * d1;
                if (V != nullptr) rdelta_b[idx] = rg * d1 + g * d2 * w.rz[below + idx];
            }
        }
        __syncthreads();
        T* t = delta; delta = delta_b; delta_b = t;
        t = rdelta; rdelta = rdelta_b; rdelta_b = t;
    }
}

// Block-wide copy of n elements.
template <typename T>
__device__ __forceinline__ void block_copy(T* dst, const T* src, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
}

// The per-task workspace: dynamic shared memory.
template <typename T>
__device__ __forceinline__ T* workspace() {
    extern __shared__ __align__(16) unsigned char smem_bytes[];
    return reinterpret_cast<T*>(smem_bytes);
}

// ------------------------------------------------------------------ fused meta-gradient -----
// The mean over tasks (blocks) of the [tasks, P] rows each block has written, in the same
// launch: every thread makes its writes visible device-wide, the block draws a ticket from
// `done`, and the block that draws the last one sums each column in task order (as mean_rows
// does: the same bits), reading past L1, then rearms `done` to 0 for the next launch.
template <typename T>
__device__ void mean_by_last_block(const T* rows, T* mean, unsigned* done, int P) {
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(done, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    const int tasks = gridDim.x;
    for (int i = threadIdx.x; i < P; i += blockDim.x) {
        T acc = T(0);
        for (int t = 0; t < tasks; ++t) acc += __ldcg(rows + (long long)t * P + i);
        mean[i] = acc / T(tasks);
    }
    if (threadIdx.x == 0) *done = 0;
}

// Workspace per task: theta[P], g[P], hv[P], then the engine buffers. `mean` (P, or null: the
// host launches maml_mean_rows) and `done` (the device's block counter) as mean_by_last_block.
template <typename T>
__device__ void maml_meta(const MetaConfig cfg, const int* sizes, const int* w_off, const T* params,
                          const T* xs, const T* ys, const unsigned* ls, const T* xq, const T* yq,
                          const unsigned* lq, T* iterates, T* adapted, T* grads, T* losses, T* mean,
                          unsigned* done) {
    const NetConfig& c = cfg.net;
    const int task = blockIdx.x, P = c.params, in_w = sizes[0], out_w = sizes[c.layers];
    T* base = workspace<T>();
    T* theta = base;
    T* g = base + P;
    T* hv = base + 2 * P;
    Work<T> w = carve(base + 3 * P, c);
    const T lr = T(cfg.lr);
    const T* x_s = xs + (long long)task * cfg.support * in_w;
    const T* x_q = xq + (long long)task * cfg.query * in_w;
    const T* y_s = c.loss == LOSS_MSE ? ys + (long long)task * cfg.support * out_w : nullptr;
    const T* y_q = c.loss == LOSS_MSE ? yq + (long long)task * cfg.query * out_w : nullptr;
    const unsigned* l_s = c.loss == LOSS_CE ? ls + (long long)task * cfg.support : nullptr;
    const unsigned* l_q = c.loss == LOSS_CE ? lq + (long long)task * cfg.query : nullptr;
    T* my_iterates = iterates + (long long)task * (cfg.steps - 1) * P;  // theta_1 .. theta_{k-1}
    T* my_adapted = adapted + (long long)task * P;

    block_copy(theta, params, P);
    __syncthreads();
    // Inner loop: theta_{j+1} = theta_j - lr * grad L_support(theta_j).
    for (int j = 0; j < cfg.steps; ++j) {
        forward(c, sizes, w_off, theta, (const T*)nullptr, x_s, cfg.support, w);
        loss_head(c, sizes, y_s, l_s, cfg.support, false, w);
        backward(c, sizes, w_off, theta, (const T*)nullptr, (T*)nullptr, x_s, cfg.support, hv, w);
        T* keep = j + 1 < cfg.steps ? my_iterates + (long long)j * P : my_adapted;
        for (int i = threadIdx.x; i < P; i += blockDim.x) {
            const T next = theta[i] - lr * hv[i];
            theta[i] = next;
            keep[i] = next;
        }
        __syncthreads();
    }
    // Query loss and gradient at theta_k.
    forward(c, sizes, w_off, theta, (const T*)nullptr, x_q, cfg.query, w);
    const T loss = loss_head(c, sizes, y_q, l_q, cfg.query, false, w);
    backward(c, sizes, w_off, theta, (const T*)nullptr, (T*)nullptr, x_q, cfg.query, g, w);
    // Reverse: g <- g - lr * H(theta_j) g for j = k-1 .. 0.
    if (cfg.second) {
        for (int j = cfg.steps - 1; j >= 0; --j) {
            block_copy(theta, j == 0 ? params : my_iterates + (long long)(j - 1) * P, P);
            __syncthreads();
            forward(c, sizes, w_off, theta, g, x_s, cfg.support, w);
            loss_head(c, sizes, y_s, l_s, cfg.support, true, w);
            backward(c, sizes, w_off, theta, g, hv, x_s, cfg.support, (T*)nullptr, w);
            // No barrier: other threads read g after the one that follows the next block_copy,
            // and the final copy below reads each g[i] from the thread that wrote it.
            for (int i = threadIdx.x; i < P; i += blockDim.x) g[i] -= lr * hv[i];
        }
    }
    block_copy(grads + (long long)task * P, g, P);
    if (threadIdx.x == 0) losses[task] = loss;
    if (mean != nullptr) mean_by_last_block(grads, mean, done, P);
}

// ------------------------------------------------------------------ forward / grad / HVP ----
enum OpMode { OP_FORWARD = 0, OP_GRAD = 1, OP_HVP = 2 };

// Workspace per task: the engine buffers only (parameters are read from global memory).
template <typename T>
__device__ void mlp_op(const NetConfig c, int mode, int n, const int* sizes, const int* w_off, const T* params,
                       long long p_stride, const T* v, long long v_stride, const T* x, const T* y,
                       const unsigned* labels, T* out, T* losses) {
    const int task = blockIdx.x, P = c.params, in_w = sizes[0], out_w = sizes[c.layers];
    Work<T> w = carve(workspace<T>(), c);
    const T* p = params + task * p_stride;
    const T* vt = mode == OP_HVP ? v + task * v_stride : nullptr;
    const T* xt = x + (long long)task * n * in_w;
    forward(c, sizes, w_off, p, vt, xt, n, w);
    if (mode == OP_FORWARD) {
        const T* z = w.z + act_offset(sizes, c.layers - 1, c.rows);
        block_copy(out + (long long)task * n * out_w, z, n * out_w);
        return;
    }
    const T* yt = c.loss == LOSS_MSE ? y + (long long)task * n * out_w : nullptr;
    const unsigned* lt = c.loss == LOSS_CE ? labels + (long long)task * n : nullptr;
    const T loss = loss_head(c, sizes, yt, lt, n, mode == OP_HVP, w);
    T* row = out + (long long)task * P;
    if (mode == OP_GRAD) {
        backward(c, sizes, w_off, p, (const T*)nullptr, (T*)nullptr, xt, n, row, w);
        if (threadIdx.x == 0) losses[task] = loss;
    } else {
        backward(c, sizes, w_off, p, vt, row, xt, n, (T*)nullptr, w);
    }
}

// ------------------------------------------------------------------ per-layer engine --------
// Every kernel below is batched over tasks and grid-stride, so any launch size is valid.

// A matrix operand of one task: element (i, j) of task t at off + t*batch + i*rs + j*cs.
// Must match `Operand` in src/ops/maml/layered.rs.
struct Operand {
    long long off;
    long long batch;
    int rs;
    int cs;
};

// C = A.B (accumulate: C += A.B) for every task, A: m x k, B: k x n, C: m x n.
// Must match `GemmShape` in src/ops/maml/layered.rs.
struct GemmShape {
    Operand a, b, c;
    int m, n, k;
    int tasks;
    int accumulate;
    int pad;
};

__device__ __forceinline__ long long global_thread() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ long long grid_threads() { return (long long)gridDim.x * blockDim.x; }

template <typename T>
__device__ __forceinline__ T* at(T* base, const Operand& o, long long t, long long i, long long j) {
    return base + o.off + t * o.batch + i * o.rs + j * o.cs;
}

// The reference product: one thread per output element, a plain loop over k.
template <typename T>
__device__ void gemm_naive(const T* A, const T* B, T* C, const GemmShape s) {
    const long long per_task = (long long)s.m * s.n, total = per_task * s.tasks;
    for (long long e = global_thread(); e < total; e += grid_threads()) {
        const long long t = e / per_task, r = e - t * per_task;
        const long long i = r / s.n, j = r - i * s.n;
        T acc = T(0);
        for (int q = 0; q < s.k; ++q) acc += *at(A, s.a, t, i, q) * *at(B, s.b, t, q, j);
        T* c = at(C, s.c, t, i, j);
        *c = s.accumulate ? *c + acc : acc;
    }
}

// The tiled product: a 256-thread block computes 64x64 output tiles, staging 64x16 slices of A
// and 16x64 slices of B through shared memory; each thread owns a 4x4 micro-tile strided by 16
// (rows ty + 16i, columns tx + 16j) so that its shared-memory reads are broadcasts (A) or
// consecutive (B). Loads follow whichever dimension of the operand is contiguous, so both
// plain and transposed operands coalesce. Tiles over n on gridDim.x, m on y, tasks on z, each
// grid-stride (the host caps y and z at 65535).
constexpr int TILE_M = 64, TILE_N = 64, TILE_K = 16, TILE_THREADS = 256;

template <typename T>
__device__ void gemm_tiled(const T* A, const T* B, T* C, const GemmShape s) {
    __shared__ T As[TILE_K][TILE_M + 1];
    __shared__ T Bs[TILE_K][TILE_N + 1];
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const int tiles_m = (s.m + TILE_M - 1) / TILE_M, tiles_n = (s.n + TILE_N - 1) / TILE_N;
    const bool a_k_fast = s.a.cs == 1, b_n_fast = s.b.cs == 1;
    for (int t = blockIdx.z; t < s.tasks; t += gridDim.z)
        for (int tm = blockIdx.y; tm < tiles_m; tm += gridDim.y)
            for (int tn = blockIdx.x; tn < tiles_n; tn += gridDim.x) {
                const int m0 = tm * TILE_M, n0 = tn * TILE_N;
                T acc[4][4];
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j) acc[i][j] = T(0);
                for (int k0 = 0; k0 < s.k; k0 += TILE_K) {
                    for (int e = threadIdx.x; e < TILE_M * TILE_K; e += TILE_THREADS) {
                        const int mm = a_k_fast ? e / TILE_K : e % TILE_M;
                        const int kk = a_k_fast ? e % TILE_K : e / TILE_M;
                        const int gm = m0 + mm, gk = k0 + kk;
                        As[kk][mm] = gm < s.m && gk < s.k ? *at(A, s.a, t, gm, gk) : T(0);
                    }
                    for (int e = threadIdx.x; e < TILE_K * TILE_N; e += TILE_THREADS) {
                        const int nn = b_n_fast ? e % TILE_N : e / TILE_K;
                        const int kk = b_n_fast ? e / TILE_N : e % TILE_K;
                        const int gn = n0 + nn, gk = k0 + kk;
                        Bs[kk][nn] = gn < s.n && gk < s.k ? *at(B, s.b, t, gk, gn) : T(0);
                    }
                    __syncthreads();
#pragma unroll
                    for (int kk = 0; kk < TILE_K; ++kk) {
                        T a[4], b[4];
#pragma unroll
                        for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
                        for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
                        for (int i = 0; i < 4; ++i)
#pragma unroll
                            for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
                    }
                    __syncthreads();
                }
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const int gm = m0 + ty + 16 * i, gn = n0 + tx + 16 * j;
                        if (gm < s.m && gn < s.n) {
                            T* c = at(C, s.c, t, gm, gn);
                            *c = s.accumulate ? *c + acc[i][j] : acc[i][j];
                        }
                    }
            }
}

// z[t] (n x fo, task stride z_stride) += b (task stride p_stride); h = sigma(z) when h != null.
template <typename T>
__device__ void bias_act(T* z, T* h, const T* p, long long b_off, long long p_stride, int n, int fo,
                         long long z_stride, int tasks, int act) {
    const long long per_task = (long long)n * fo, total = per_task * tasks;
    for (long long e = global_thread(); e < total; e += grid_threads()) {
        const long long t = e / per_task, r = e - t * per_task;
        const int o = (int)(r % fo);
        const long long idx = t * z_stride + r;
        const T v = z[idx] + p[b_off + t * p_stride + o];
        z[idx] = v;
        if (h != nullptr) h[idx] = act_value(act, v);
    }
}

// rz += R{b} (task stride v_stride); rh = sigma'(z) rz when rh != null.
template <typename T>
__device__ void r_bias_act(T* rz, T* rh, const T* z, const T* v, long long b_off, long long v_stride, int n,
                           int fo, long long z_stride, int tasks, int act) {
    const long long per_task = (long long)n * fo, total = per_task * tasks;
    for (long long e = global_thread(); e < total; e += grid_threads()) {
        const long long t = e / per_task, r = e - t * per_task;
        const int o = (int)(r % fo);
        const long long idx = t * z_stride + r;
        const T rv = rz[idx] + v[b_off + t * v_stride + o];
        rz[idx] = rv;
        if (rh != nullptr) {
            T d1, d2;
            act_derivs(act, z[idx], d1, d2);
            rh[idx] = d1 * rv;
        }
    }
}

// One thread per (task, sample): the sample's share of the loss into row_loss[t*rows + s],
// delta = dL/dz for its output row and, when rdelta != null, R{delta} = (d^2L/dz^2) R{z}.
template <typename T>
__device__ void loss_rows(const T* z, const T* rz, long long z_stride, const T* y, const unsigned* labels, int n,
                          int width, int tasks, int loss, T* delta, T* rdelta, long long d_stride, T* row_loss,
                          int rows) {
    const long long total = (long long)n * tasks;
    for (long long e = global_thread(); e < total; e += grid_threads()) {
        const long long t = e / n;
        const int s = (int)(e - t * n);
        const T* zr = z + t * z_stride + (long long)s * width;
        const T* rzr = rdelta != nullptr ? rz + t * z_stride + (long long)s * width : nullptr;
        T* dr = delta + t * d_stride + (long long)s * width;
        T* rdr = rdelta != nullptr ? rdelta + t * d_stride + (long long)s * width : nullptr;
        T contribution = T(0);
        if (loss == LOSS_MSE) {
            const T* yr = y + e * width;
            const T count = T((long long)n * width);
            for (int j = 0; j < width; ++j) {
                const T err = zr[j] - yr[j];
                contribution += err * err / count;
                dr[j] = T(2) * err / count;
                if (rdr != nullptr) rdr[j] = T(2) * rzr[j] / count;
            }
        } else {
            const int label = (int)labels[e];
            T m = zr[0];
            for (int j = 1; j < width; ++j) m = max(m, zr[j]);
            T sum = T(0);
            for (int j = 0; j < width; ++j) sum += exp_(zr[j] - m);
            T p_rz = T(0);
            if (rdr != nullptr)
                for (int j = 0; j < width; ++j) p_rz += exp_(zr[j] - m) / sum * rzr[j];
            for (int j = 0; j < width; ++j) {
                const T prob = exp_(zr[j] - m) / sum;
                dr[j] = (prob - (j == label ? T(1) : T(0))) / T(n);
                if (rdr != nullptr) rdr[j] = prob * (rzr[j] - p_rz) / T(n);
            }
            contribution = (log_(sum) + m - zr[label]) / T(n);
        }
        row_loss[t * rows + s] = contribution;
    }
}

// One thread per task: its loss, the samples' shares summed in order (deterministic).
template <typename T>
__device__ void task_loss(const T* row_loss, int rows, int n, T* losses, int tasks) {
    for (long long t = global_thread(); t < tasks; t += grid_threads()) {
        T acc = T(0);
        for (int s = 0; s < n; ++s) acc += row_loss[t * rows + s];
        losses[t] = acc;
    }
}

// One thread per (task, column): out[off + t*out_stride + o] = sum over the n rows of d.
template <typename T>
__device__ void col_sum(const T* d, long long d_stride, int n, int width, T* out, long long out_off,
                        long long out_stride, int tasks) {
    const long long total = (long long)width * tasks;
    for (long long e = global_thread(); e < total; e += grid_threads()) {
        const long long t = e / width;
        const int o = (int)(e - t * width);
        T acc = T(0);
        for (int s = 0; s < n; ++s) acc += d[t * d_stride + (long long)s * width + o];
        out[out_off + t * out_stride + o] = acc;
    }
}

// In place, from dh = dL/dh of a hidden layer (and R{dh} in rd when not null) to its deltas:
// d = dh sigma'(z);  rd = R{dh} sigma'(z) + dh sigma''(z) R{z}.
template <typename T>
__device__ void act_back(T* d, T* rd, long long d_stride, const T* z, const T* rz, long long z_stride, int n,
                         int width, int tasks, int act) {
    const long long per_task = (long long)n * width, total = per_task * tasks;
    for (long long e = global_thread(); e < total; e += grid_threads()) {
        const long long t = e / per_task, r = e - t * per_task;
        const long long di = t * d_stride + r, zi = t * z_stride + r;
        T d1, d2;
        act_derivs(act, z[zi], d1, d2);
        const T dh = d[di];
        d[di] = dh * d1;
        if (rd != nullptr) rd[di] = rd[di] * d1 + dh * d2 * rz[zi];
    }
}

// dst[t] = src[t] - lr * grad[t] over P parameters (src task stride 0: one broadcast row).
template <typename T>
__device__ void sgd_step(T* dst, const T* src, long long src_stride, const T* grad, double lr, int P, int tasks) {
    const T a = T(lr);
    const long long total = (long long)P * tasks;
    for (long long e = global_thread(); e < total; e += grid_threads()) {
        const long long t = e / P, i = e - t * P;
        dst[e] = src[t * src_stride + i] - a * grad[e];
    }
}

// g -= lr * hv, element-wise over total elements.
template <typename T>
__device__ void descend(T* g, const T* hv, double lr, long long total) {
    const T a = T(lr);
    for (long long e = global_thread(); e < total; e += grid_threads()) g[e] -= a * hv[e];
}

// Mean over rows of a [tasks, P] matrix, each column summed in row order.
template <typename T>
__device__ void mean_rows(const T* rows, T* out, int tasks, int P) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < P; i += gridDim.x * blockDim.x) {
        T acc = T(0);
        for (int t = 0; t < tasks; ++t) acc += rows[(long long)t * P + i];
        out[i] = acc / T(tasks);
    }
}

}  // namespace

#define MK_MAML(TN, T)                                                                                   \
    extern "C" __global__ void maml_meta_##TN(                                                           \
        const MetaConfig cfg, const int* sizes, const int* w_off, const T* params, const T* xs,         \
        const T* ys, const unsigned* ls, const T* xq, const T* yq, const unsigned* lq, T* iterates,     \
        T* adapted, T* grads, T* losses, T* mean, unsigned* done) {                                      \
        maml_meta<T>(cfg, sizes, w_off, params, xs, ys, ls, xq, yq, lq, iterates, adapted, grads,       \
                     losses, mean, done);                                                                \
    }                                                                                                    \
    extern "C" __global__ void mlp_op_##TN(const NetConfig c, int mode, int n, const int* sizes,         \
                                           const int* w_off, const T* params, long long p_stride,       \
                                           const T* v, long long v_stride, const T* x, const T* y,      \
                                           const unsigned* labels, T* out, T* losses) {                 \
        mlp_op<T>(c, mode, n, sizes, w_off, params, p_stride, v, v_stride, x, y, labels, out, losses);  \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(TILE_THREADS)                                           \
        maml_gemm_tiled_##TN(const T* a, const T* b, T* c, const GemmShape s) {                          \
        gemm_tiled<T>(a, b, c, s);                                                                       \
    }                                                                                                    \
    extern "C" __global__ void maml_gemm_naive_##TN(const T* a, const T* b, T* c, const GemmShape s) {   \
        gemm_naive<T>(a, b, c, s);                                                                       \
    }                                                                                                    \
    extern "C" __global__ void maml_bias_act_##TN(T* z, T* h, const T* p, long long b_off,              \
                                                  long long p_stride, int n, int fo, long long z_stride, \
                                                  int tasks, int act) {                                  \
        bias_act<T>(z, h, p, b_off, p_stride, n, fo, z_stride, tasks, act);                             \
    }                                                                                                    \
    extern "C" __global__ void maml_r_bias_act_##TN(T* rz, T* rh, const T* z, const T* v, long long b_off, \
                                                    long long v_stride, int n, int fo, long long z_stride, \
                                                    int tasks, int act) {                                \
        r_bias_act<T>(rz, rh, z, v, b_off, v_stride, n, fo, z_stride, tasks, act);                      \
    }                                                                                                    \
    extern "C" __global__ void maml_loss_rows_##TN(const T* z, const T* rz, long long z_stride, const T* y, \
                                                   const unsigned* labels, int n, int width, int tasks,  \
                                                   int loss, T* delta, T* rdelta, long long d_stride,    \
                                                   T* row_loss, int rows) {                              \
        loss_rows<T>(z, rz, z_stride, y, labels, n, width, tasks, loss, delta, rdelta, d_stride, row_loss, \
                     rows);                                                                              \
    }                                                                                                    \
    extern "C" __global__ void maml_task_loss_##TN(const T* row_loss, int rows, int n, T* losses,        \
                                                   int tasks) {                                          \
        task_loss<T>(row_loss, rows, n, losses, tasks);                                                  \
    }                                                                                                    \
    extern "C" __global__ void maml_col_sum_##TN(const T* d, long long d_stride, int n, int width, T* out, \
                                                 long long out_off, long long out_stride, int tasks) {   \
        col_sum<T>(d, d_stride, n, width, out, out_off, out_stride, tasks);                              \
    }                                                                                                    \
    extern "C" __global__ void maml_act_back_##TN(T* d, T* rd, long long d_stride, const T* z,           \
                                                  const T* rz, long long z_stride, int n, int width,     \
                                                  int tasks, int act) {                                  \
        act_back<T>(d, rd, d_stride, z, rz, z_stride, n, width, tasks, act);                             \
    }                                                                                                    \
    extern "C" __global__ void maml_sgd_step_##TN(T* dst, const T* src, long long src_stride,           \
                                                  const T* grad, double lr, int P, int tasks) {          \
        sgd_step<T>(dst, src, src_stride, grad, lr, P, tasks);                                           \
    }                                                                                                    \
    extern "C" __global__ void maml_descend_##TN(T* g, const T* hv, double lr, long long total) {        \
        descend<T>(g, hv, lr, total);                                                                    \
    }                                                                                                    \
    extern "C" __global__ void maml_mean_rows_##TN(const T* rows, T* out, int tasks, int P) {            \
        mean_rows<T>(rows, out, tasks, P);                                                               \
    }

MK_MAML(f32, float)
MK_MAML(f64, double)
