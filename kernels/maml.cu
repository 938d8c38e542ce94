// Second-order MAML on MLPs: forward, gradient, exact Hessian-vector products (R-operator,
// forward-over-reverse) and the whole k-step meta-gradient, one thread block per task.
//
// Kernels (T = f32 | f64):
//   maml_meta_<T>       the fused meta-gradient: for its task, a block runs the k inner SGD steps,
//                       the query gradient and the k reverse HVP steps g <- g - a*H_j g, all in
//                       one launch for the whole meta-batch. Every per-task buffer (current
//                       parameters, g, Hg, activations, deltas and their R{} directions) lives in
//                       dynamic shared memory when it fits; otherwise the same code runs on a
//                       per-block slice of a global workspace (slower, L2-resident, never an
//                       error). Only the inner iterates theta_1..theta_{k-1} go to global memory.
//   mlp_op_<T>          forward / loss+gradient / HVP of T tasks, same engine, same two modes.
//   maml_mean_rows_<T>  the mean over tasks of the per-task meta-gradients (fixed order:
//                       deterministic).
//   maml_meta_reference_<T>  one thread per task, plain serial loops in global memory: the
//                       obviously correct version the GPU tests hold the fast one against.
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
    int wide;       // rows * max(widest layer, input width) (one delta buffer)
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
// One task's buffers, carved from shared memory or from a global workspace slice.
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
    const T sum = mk::block_sum(local, w.scratch);
    __syncthreads();
    return sum;
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

// The per-task workspace base: dynamic shared memory, or this block's slice of `ws_global`.
template <typename T>
__device__ __forceinline__ T* workspace(T* ws_global, long long ws_elems) {
    extern __shared__ __align__(16) unsigned char smem_bytes[];
    return ws_global != nullptr ? ws_global + (long long)blockIdx.x * ws_elems
                                : reinterpret_cast<T*>(smem_bytes);
}

// ------------------------------------------------------------------ fused meta-gradient -----
// Workspace per task: theta[P], g[P], hv[P], then the engine buffers.
template <typename T>
__device__ void maml_meta(const MetaConfig cfg, const int* sizes, const int* w_off, const T* params,
                          const T* xs, const T* ys, const unsigned* ls, const T* xq, const T* yq,
                          const unsigned* lq, T* iterates, T* adapted, T* grads, T* losses, T* ws_global) {
    const NetConfig& c = cfg.net;
    const int task = blockIdx.x, P = c.params, in_w = sizes[0], out_w = sizes[c.layers];
    T* base = workspace(ws_global, c.ws_elems);
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
            for (int i = threadIdx.x; i < P; i += blockDim.x) g[i] -= lr * hv[i];
            __syncthreads();
        }
    }
    block_copy(grads + (long long)task * P, g, P);
    if (threadIdx.x == 0) losses[task] = loss;
}

// ------------------------------------------------------------------ forward / grad / HVP ----
enum OpMode { OP_FORWARD = 0, OP_GRAD = 1, OP_HVP = 2 };

// Workspace per task: the engine buffers only (parameters are read from global memory).
template <typename T>
__device__ void mlp_op(const NetConfig c, int mode, int n, const int* sizes, const int* w_off, const T* params,
                       long long p_stride, const T* v, long long v_stride, const T* x, const T* y,
                       const unsigned* labels, T* out, T* losses, T* ws_global) {
    const int task = blockIdx.x, P = c.params, in_w = sizes[0], out_w = sizes[c.layers];
    Work<T> w = carve(workspace(ws_global, c.ws_elems), c);
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

// ------------------------------------------------------------------ reference (serial) ------
// One thread per task, everything in global memory, written as plainly as possible: a forward
// pass that keeps every layer, a backward pass, and the R-operator versions of both.
template <typename T>
struct Ref {
    const int* sizes;
    const int* w_off;
    int layers, act, loss, rows;
    T *z, *h, *rz, *rh, *d, *db, *rd, *rdb;

    __device__ int off(int l) const { return act_offset(sizes, l, rows); }

    __device__ void fwd(const T* p, const T* v, const T* x, int n) {
        for (int l = 0; l < layers; ++l) {
            const int fi = sizes[l], fo = sizes[l + 1];
            for (int s = 0; s < n; ++s)
                for (int o = 0; o < fo; ++o) {
                    T a = p[w_off[l] + fo * fi + o], ra = v ? v[w_off[l] + fo * fi + o] : T(0);
                    for (int i = 0; i < fi; ++i) {
                        const T in = l == 0 ? x[s * fi + i] : h[off(l - 1) + s * fi + i];
                        a += p[w_off[l] + o * fi + i] * in;
                        if (v) {
                            ra += v[w_off[l] + o * fi + i] * in;
                            if (l > 0) ra += p[w_off[l] + o * fi + i] * rh[off(l - 1) + s * fi + i];
                        }
                    }
                    z[off(l) + s * fo + o] = a;
                    rz[off(l) + s * fo + o] = ra;
                    T d1, d2;
                    act_derivs(act, a, d1, d2);
                    h[off(l) + s * fo + o] = act_value(act, a);
                    rh[off(l) + s * fo + o] = d1 * ra;
                }
        }
    }

    __device__ T head(const T* y, const unsigned* lab, int n) {
        const int C = sizes[layers];
        const T* o = z + off(layers - 1);
        const T* ro = rz + off(layers - 1);
        T total = T(0);
        for (int s = 0; s < n; ++s) {
            if (loss == LOSS_MSE) {
                for (int j = 0; j < C; ++j) {
                    const T e = o[s * C + j] - y[s * C + j];
                    total += e * e / T(n * C);
                    d[s * C + j] = T(2) * e / T(n * C);
                    rd[s * C + j] = T(2) * ro[s * C + j] / T(n * C);
                }
            } else {
                T m = o[s * C];
                for (int j = 1; j < C; ++j) m = max(m, o[s * C + j]);
                T sum = T(0), prz = T(0);
                for (int j = 0; j < C; ++j) sum += exp_(o[s * C + j] - m);
                for (int j = 0; j < C; ++j) prz += exp_(o[s * C + j] - m) / sum * ro[s * C + j];
                for (int j = 0; j < C; ++j) {
                    const T pr = exp_(o[s * C + j] - m) / sum;
                    d[s * C + j] = (pr - (j == (int)lab[s] ? T(1) : T(0))) / T(n);
                    rd[s * C + j] = pr * (ro[s * C + j] - prz) / T(n);
                }
                total += (log_(sum) + m - o[s * C + lab[s]]) / T(n);
            }
        }
        return total;
    }

    // grad may be null; hv only with v.
    __device__ void bwd(const T* p, const T* v, const T* x, int n, T* grad, T* hv) {
        for (int l = layers - 1; l >= 0; --l) {
            const int fi = sizes[l], fo = sizes[l + 1];
            for (int o = 0; o < fo; ++o) {
                T gb = T(0), rgb = T(0);
                for (int i = 0; i < fi; ++i) {
                    T gw = T(0), rgw = T(0);
                    for (int s = 0; s < n; ++s) {
                        const T in = l == 0 ? x[s * fi + i] : h[off(l - 1) + s * fi + i];
                        const T rin = l == 0 ? T(0) : rh[off(l - 1) + s * fi + i];
                        gw += d[s * fo + o] * in;
                        rgw += rd[s * fo + o] * in + d[s * fo + o] * rin;
                    }
                    if (grad) grad[w_off[l] + o * fi + i] = gw;
                    if (hv) hv[w_off[l] + o * fi + i] = rgw;
                }
                for (int s = 0; s < n; ++s) {
                    gb += d[s * fo + o];
                    rgb += rd[s * fo + o];
                }
                if (grad) grad[w_off[l] + fo * fi + o] = gb;
                if (hv) hv[w_off[l] + fo * fi + o] = rgb;
            }
            if (l == 0) break;
            for (int s = 0; s < n; ++s)
                for (int i = 0; i < fi; ++i) {
                    T g = T(0), rg = T(0);
                    for (int o = 0; o < fo; ++o) {
                        g += d[s * fo + o] * p[w_off[l] + o * fi + i];
                        if (v) rg += rd[s * fo + o] * p[w_off[l] + o * fi + i] + d[s * fo + o] * v[w_off[l] + o * fi + i];
                    }
                    T d1, d2;
                    const int zi = off(l - 1) + s * fi + i;
                    act_derivs(act, z[zi], d1, d2);
                    db[s * fi + i] = g * d1;
                    rdb[s * fi + i] = rg * d1 + g * d2 * rz[zi];
                }
            T* t = d; d = db; db = t;
            t = rd; rd = rdb; rdb = t;
        }
    }
};

// Reference workspace per task: theta[P], g[P], hv[P], z, h, rz, rh (act_elems each), 4 deltas.
template <typename T>
__device__ void maml_meta_reference(const MetaConfig cfg, const int* sizes, const int* w_off, const T* params,
                                    const T* xs, const T* ys, const unsigned* ls, const T* xq, const T* yq,
                                    const unsigned* lq, T* iterates, T* adapted, T* grads, T* losses, T* ws,
                                    int tasks) {
    const int task = blockIdx.x * blockDim.x + threadIdx.x;
    if (task >= tasks) return;
    const NetConfig& c = cfg.net;
    const int P = c.params, in_w = sizes[0], out_w = sizes[c.layers];
    T* base = ws + (long long)task * c.ws_elems;
    T *theta = base, *g = base + P, *hv = base + 2 * P;
    T* a = base + 3 * P;
    Ref<T> r{sizes, w_off, c.layers, c.act, c.loss, c.rows,
             a, a + c.act_elems, a + 2 * c.act_elems, a + 3 * c.act_elems,
             a + 4 * c.act_elems, a + 4 * c.act_elems + c.wide, a + 4 * c.act_elems + 2 * c.wide,
             a + 4 * c.act_elems + 3 * c.wide};
    const T lr = T(cfg.lr);
    const T* x_s = xs + (long long)task * cfg.support * in_w;
    const T* x_q = xq + (long long)task * cfg.query * in_w;
    const T* y_s = c.loss == LOSS_MSE ? ys + (long long)task * cfg.support * out_w : nullptr;
    const T* y_q = c.loss == LOSS_MSE ? yq + (long long)task * cfg.query * out_w : nullptr;
    const unsigned* l_s = c.loss == LOSS_CE ? ls + (long long)task * cfg.support : nullptr;
    const unsigned* l_q = c.loss == LOSS_CE ? lq + (long long)task * cfg.query : nullptr;
    T* its = iterates + (long long)task * (cfg.steps - 1) * P;
    for (int i = 0; i < P; ++i) theta[i] = params[i];
    for (int j = 0; j < cfg.steps; ++j) {
        r.fwd(theta, nullptr, x_s, cfg.support);
        r.head(y_s, l_s, cfg.support);
        r.bwd(theta, nullptr, x_s, cfg.support, hv, nullptr);
        T* keep = j + 1 < cfg.steps ? its + (long long)j * P : adapted + (long long)task * P;
        for (int i = 0; i < P; ++i) keep[i] = theta[i] = theta[i] - lr * hv[i];
    }
    r.fwd(theta, nullptr, x_q, cfg.query);
    losses[task] = r.head(y_q, l_q, cfg.query);
    r.bwd(theta, nullptr, x_q, cfg.query, g, nullptr);
    if (cfg.second)
        for (int j = cfg.steps - 1; j >= 0; --j) {
            const T* th = j == 0 ? params : its + (long long)(j - 1) * P;
            r.fwd(th, g, x_s, cfg.support);
            r.head(y_s, l_s, cfg.support);
            r.bwd(th, g, x_s, cfg.support, nullptr, hv);
            for (int i = 0; i < P; ++i) g[i] -= lr * hv[i];
        }
    for (int i = 0; i < P; ++i) grads[(long long)task * P + i] = g[i];
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
        T* adapted, T* grads, T* losses, T* ws_global) {                                                 \
        maml_meta<T>(cfg, sizes, w_off, params, xs, ys, ls, xq, yq, lq, iterates, adapted, grads,       \
                     losses, ws_global);                                                                 \
    }                                                                                                    \
    extern "C" __global__ void maml_meta_reference_##TN(                                                 \
        const MetaConfig cfg, const int* sizes, const int* w_off, const T* params, const T* xs,         \
        const T* ys, const unsigned* ls, const T* xq, const T* yq, const unsigned* lq, T* iterates,     \
        T* adapted, T* grads, T* losses, T* ws, int tasks) {                                             \
        maml_meta_reference<T>(cfg, sizes, w_off, params, xs, ys, ls, xq, yq, lq, iterates, adapted,    \
                               grads, losses, ws, tasks);                                                \
    }                                                                                                    \
    extern "C" __global__ void mlp_op_##TN(const NetConfig c, int mode, int n, const int* sizes,         \
                                           const int* w_off, const T* params, long long p_stride,       \
                                           const T* v, long long v_stride, const T* x, const T* y,      \
                                           const unsigned* labels, T* out, T* losses, T* ws_global) {   \
        mlp_op<T>(c, mode, n, sizes, w_off, params, p_stride, v, v_stride, x, y, labels, out, losses,   \
                  ws_global);                                                                            \
    }                                                                                                    \
    extern "C" __global__ void maml_mean_rows_##TN(const T* rows, T* out, int tasks, int P) {            \
        mean_rows<T>(rows, out, tasks, P);                                                               \
    }

MK_MAML(f32, float)
MK_MAML(f64, double)
