// scripts/emulate/run.sh maml [quick]: runs every kernel of kernels/maml.cu under the CPU
// emulation of prelude.h, with the launch sequences, grids, block sizes, dynamic shared memory,
// workspace sizes and argument values of src/ops/maml/cuda.rs and src/ops/maml/layered.rs
// (the fused-size rule of `fused_plan` with the H200's 227 KiB opt-in limit, `net_config`, the
// per-layer `Engine` with its tiled or naive product), and compares them with a float64 MLP
// forward / backward / R-operator written here (the obvious per-sample loops of the references
// in tests/all/maml.rs; checked first against central differences of itself) at the
// tolerances of the Rust GPU tests (tests/all/maml/cuda.rs: relative 1e-4 in f32, 1e-10 in f64):
//
//   Mlp::forward / loss_and_grad / hvp   mlp_op_<T> (fused, one block per task) and the tiled
//                      per-layer path (maml_gemm_tiled, bias_act, r_bias_act, loss_rows,
//                      task_loss, col_sum, act_back), [T,P] parameters and one broadcast [P]
//                      row, directions [T,P] and [P]: outputs, losses, gradients, H v vs f64
//   Maml::meta_gradient                   the automatic path (maml_meta_<T> when the workspace
//                      fits, else tiled), the forced tiled path and the naive reference path
//                      (maml_gemm_naive), each followed by maml_mean_rows and the host mean of
//                      the losses, k in {1, 2, 5}, first and second order: the mean gradient,
//                      per-task losses, adapted parameters, the fused kernel's stored inner
//                      iterates, the meta-loss vs f64, and fused vs naive reference
//
// over every activation x loss, f32 and f64; the sinusoid 1-40-40-1 shape (25 tasks, K = 10,
// 13 query points as in the GPU test, k = 1 and 5 second order, 3 first order); the GPU tests'
// other shapes (one support sample, an input wider than every layer, one layer, one class,
// 64-256-256-10 which fits the fused op in f32 but not in f64, 16-300-300-4 and 70-130-65-11
// which only fit the tiled path); sample counts just inside and just outside the fused-size
// rule, for the ops (no parameter vectors; 120 / 121 samples of the sinusoid net in f32, 59 / 60
// in f64) and the meta-gradient (three vectors; 109 / 110 and 49 / 50), where the automatic
// path must switch; [T,P] and broadcast [P] parameters and directions in all four
// combinations; a NaN in one task's input (no status path exists: it must stay in that task);
// the 1-D grids and the tiled product's grid with their caps lowered to 2 blocks (the GPU
// test's 70 000 tasks exceed the product's 65 535 gridDim.z; emulating that many blocks would
// take hours), so every grid-stride loop takes several turns; and determinism: the fused and tiled
// meta-gradients again under another schedule seed, bit for bit. Every output and workspace
// buffer starts as NaN (cuda::alloc with poisoning, as in the tests), so an element never
// written fails; every buffer is a guarded emu::DeviceVec (prelude.h), so a read or write past
// the end faults where it happens, naming the thread and the buffer (exit 3; EMU_GUARD=before:
// the same before the start). The f64 reference is first checked against central differences of
// itself. `quick` launches every kernel of both dtypes at least once (about 1 s after a 5 s
// compile); the full run takes about 30 s.
//
// Not reached: none of the 26 kernels (the driver checks that each ran). Label out of range
// has no status path in the kernels: mod.rs refuses labels >= classes before any launch (a
// kernel given one would read past the logits row), so there is nothing to emulate.
//
// Deliberately broken copies of kernels/maml.cu, each caught by `quick` (exit 1, or 3 for a
// write past a buffer): the __syncthreads ending a fused forward layer, a fused backward layer,
// or the copy of theta_j in the reverse loop dropped; the tiled product's second
// __syncthreads dropped (write-after-read on the tiles); its k-tail guard (gk <= s.k) and store
// guard (gn <= s.n) off by one; carve's rdelta_b aliased onto rdelta; the softmax loss head's
// R{delta} without the p.R{z} term; GELU's sigma'' with a factor dropped; R{delta_below} using
// z for R{z}; the R-forward without the bias direction; the MSE scale 2/n for 2/(n out); the
// reverse loop reading theta_0 for theta_1; the inner loop never writing the adapted
// parameters; mlp_op ignoring the parameter task stride; sgd_step ignoring its source stride;
// col_sum dropping the last row; descend striding by blockDim instead of the grid; the tiled
// product not striding over tasks. A control mutation that only rotates the fused forward's
// summation start (same sum, other order) passes, full mode included.
//
// What it cannot: timing, bank conflicts, registers, spills; interleavings finer than "one
// warp's whole barrier interval, then another's" (EMU_TSAN=1 checks every ordering instead: see
// run.sh); the device's expf/tanhf/log1pf (glibc's
// here) and nvcc's FMA contraction. It is not a GPU run.
#include "prelude.h"

#define MK_HOST_EMULATION 1
namespace {
EMU_DYNAMIC_SHARED(unsigned char, smem_bytes);  // the kernels' `extern __shared__ ... smem_bytes[]`
}
#include "maml.cu"
#include <numbers>
#include <optional>
#include <string>

#include "report.h"

template <typename V>
static std::vector<double> doubles(const V& v, size_t n) {
    return std::vector<double>(v.begin(), v.begin() + (ptrdiff_t)n);
}

// ------------------------------------------------------------------ the network ---------------

struct Net {
    std::vector<int> sizes;
    int act;   // Act: RELU 0, TANH 1, GELU 2, SOFTPLUS 3 (Activation as i32)
    int loss;  // LOSS_MSE 0, LOSS_CE 1
    std::vector<int> w_off;
    int P = 0;
    Net(std::vector<int> s, int a, int l) : sizes(std::move(s)), act(a), loss(l) {
        for (size_t i = 0; i + 1 < sizes.size(); ++i) w_off.push_back(P), P += sizes[i + 1] * (sizes[i] + 1);
    }
    int layers() const { return (int)sizes.size() - 1; }
    int in() const { return sizes[0]; }
    int out() const { return sizes.back(); }
    int fan_in(int l) const { return sizes[l]; }
    int fan_out(int l) const { return sizes[l + 1]; }
    int max_width() const { return *std::max_element(sizes.begin() + 1, sizes.end()); }
    std::string name() const {
        static const char* acts[] = {"relu", "tanh", "gelu", "softplus"};
        std::string s;
        for (size_t i = 0; i < sizes.size(); ++i) s += (i ? "-" : "") + std::to_string(sizes[i]);
        return s + " " + acts[act] + (loss ? " ce" : " mse");
    }
};

// ------------------------------------------------------------------ float64 reference ---------
// The obvious per-sample MLP: forward, loss, backward, and the R-operator along v.

static double act_f(int a, double z) {
    switch (a) {
        case 0: return z > 0 ? z : 0;
        case 1: return std::tanh(z);
        case 2: return 0.5 * z * (1 + std::tanh(std::sqrt(2 / std::numbers::pi) * (z + 0.044715 * z * z * z)));
        default: return std::log1p(std::exp(z));
    }
}
static double act_d1(int a, double z) {
    switch (a) {
        case 0: return z > 0 ? 1 : 0;
        case 1: return 1 - std::tanh(z) * std::tanh(z);
        case 2: {
            const double c = std::sqrt(2 / std::numbers::pi), u = c * (z + 0.044715 * z * z * z), t = std::tanh(u);
            return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * 0.044715 * z * z);
        }
        default: return 1 / (1 + std::exp(-z));
    }
}
static double act_d2(int a, double z) {
    switch (a) {
        case 0: return 0;
        case 1: { const double t = std::tanh(z); return -2 * t * (1 - t * t); }
        case 2: {
            const double c = std::sqrt(2 / std::numbers::pi), k = 0.044715;
            const double t = std::tanh(c * (z + k * z * z * z)), s2 = 1 - t * t;
            const double u1 = c * (1 + 3 * k * z * z), u2 = 6 * c * k * z;
            // d/dz [0.5(1+t) + 0.5 z s2 u1] = s2 u1 + 0.5 z (-2 t s2 u1^2 + s2 u2)
            return s2 * u1 + 0.5 * z * (-2 * t * s2 * u1 * u1 + s2 * u2);
        }
        default: { const double s = 1 / (1 + std::exp(-z)); return s * (1 - s); }
    }
}

// Loss of one task over n samples at p; grad += dL/dp, hv += H v (v not null), out = the
// network outputs [n, out] when not null.
static double ref_task(const Net& net, const double* p, const double* v, const double* x, const double* y,
                       const unsigned* labels, int n, double* grad, double* hv, double* out) {
    const int L = net.layers(), no = net.out();
    double loss = 0;
    std::vector<std::vector<double>> a(L + 1), ra(L + 1), z(L), rz(L);
    for (int s = 0; s < n; ++s) {
        a[0].assign(x + (size_t)s * net.in(), x + (size_t)(s + 1) * net.in());
        ra[0].assign(net.in(), 0.0);
        for (int l = 0; l < L; ++l) {
            const int fi = net.fan_in(l), fo = net.fan_out(l);
            const double *W = p + net.w_off[l], *b = W + fo * fi;
            z[l].assign(fo, 0), rz[l].assign(fo, 0), a[l + 1].assign(fo, 0), ra[l + 1].assign(fo, 0);
            for (int o = 0; o < fo; ++o) {
                double acc = b[o], racc = v ? v[net.w_off[l] + fo * fi + o] : 0;
                for (int i = 0; i < fi; ++i) {
                    acc += W[o * fi + i] * a[l][i];
                    if (v) racc += v[net.w_off[l] + o * fi + i] * a[l][i] + W[o * fi + i] * ra[l][i];
                }
                z[l][o] = acc, rz[l][o] = racc;
                const bool hidden = l + 1 < L;
                a[l + 1][o] = hidden ? act_f(net.act, acc) : acc;
                ra[l + 1][o] = hidden ? act_d1(net.act, acc) * racc : racc;
            }
        }
        const std::vector<double>& zo = z[L - 1];
        const std::vector<double>& rzo = rz[L - 1];
        if (out) std::copy(zo.begin(), zo.end(), out + (size_t)s * no);
        // delta = dL/dz_L, rdelta = (d2L/dz2) R{z_L}
        std::vector<double> delta(no), rdelta(no);
        if (net.loss == 0) {
            const double cnt = (double)n * no;
            for (int j = 0; j < no; ++j) {
                const double e = zo[j] - y[(size_t)s * no + j];
                loss += e * e / cnt;
                delta[j] = 2 * e / cnt;
                rdelta[j] = 2 * rzo[j] / cnt;
            }
        } else {
            const unsigned lab = labels[s];
            double m = zo[0], sum = 0, prz = 0;
            for (int j = 1; j < no; ++j) m = std::max(m, zo[j]);
            std::vector<double> pr(no);
            for (int j = 0; j < no; ++j) sum += (pr[j] = std::exp(zo[j] - m));
            for (int j = 0; j < no; ++j) pr[j] /= sum, prz += pr[j] * rzo[j];
            loss += (std::log(sum) + m - zo[lab]) / n;
            for (int j = 0; j < no; ++j) {
                delta[j] = (pr[j] - (j == (int)lab)) / n;
                rdelta[j] = pr[j] * (rzo[j] - prz) / n;
            }
        }
        for (int l = L - 1; l >= 0; --l) {
            const int fi = net.fan_in(l), fo = net.fan_out(l);
            const double* W = p + net.w_off[l];
            for (int o = 0; o < fo; ++o) {
                for (int i = 0; i < fi; ++i) {
                    if (grad) grad[net.w_off[l] + o * fi + i] += delta[o] * a[l][i];
                    if (hv) hv[net.w_off[l] + o * fi + i] += rdelta[o] * a[l][i] + delta[o] * ra[l][i];
                }
                if (grad) grad[net.w_off[l] + fo * fi + o] += delta[o];
                if (hv) hv[net.w_off[l] + fo * fi + o] += rdelta[o];
            }
            if (l == 0) break;
            std::vector<double> nd(fi), nrd(fi);
            for (int i = 0; i < fi; ++i) {
                double dh = 0, rdh = 0;
                for (int o = 0; o < fo; ++o) {
                    dh += W[o * fi + i] * delta[o];
                    if (v) rdh += W[o * fi + i] * rdelta[o] + v[net.w_off[l] + o * fi + i] * delta[o];
                }
                const double zb = z[l - 1][i];
                nd[i] = dh * act_d1(net.act, zb);
                nrd[i] = rdh * act_d1(net.act, zb) + dh * act_d2(net.act, zb) * rz[l - 1][i];
            }
            delta.swap(nd), rdelta.swap(nrd);
        }
    }
    return loss;
}

struct MetaRef {
    std::vector<double> grad, losses, adapted, iterates;  // [P], [T], [T,P], [T,k-1,P]
    double loss = 0;
};

// The k inner steps, the query loss and gradient, and (second order) g <- g - a H_j g.
static MetaRef ref_meta(const Net& net, int k, double lr, bool second, const std::vector<double>& theta, int tasks,
                        int ns, int nq, const std::vector<double>& xs, const std::vector<double>& ys,
                        const std::vector<unsigned>& ls, const std::vector<double>& xq,
                        const std::vector<double>& yq, const std::vector<unsigned>& lq) {
    const int P = net.P, in = net.in(), no = net.out();
    MetaRef r;
    r.grad.assign(P, 0), r.losses.assign(tasks, 0), r.adapted.assign((size_t)tasks * P, 0);
    r.iterates.assign((size_t)tasks * (k - 1) * P, 0);
    for (int t = 0; t < tasks; ++t) {
        const double* x_s = xs.data() + (size_t)t * ns * in;
        const double* y_s = net.loss == 0 ? ys.data() + (size_t)t * ns * no : nullptr;
        const unsigned* l_s = net.loss == 1 ? ls.data() + (size_t)t * ns : nullptr;
        const double* x_q = xq.data() + (size_t)t * nq * in;
        const double* y_q = net.loss == 0 ? yq.data() + (size_t)t * nq * no : nullptr;
        const unsigned* l_q = net.loss == 1 ? lq.data() + (size_t)t * nq : nullptr;
        std::vector<std::vector<double>> th{theta};
        for (int j = 0; j < k; ++j) {
            std::vector<double> g(P, 0.0), next(P);
            ref_task(net, th[j].data(), nullptr, x_s, y_s, l_s, ns, g.data(), nullptr, nullptr);
            for (int i = 0; i < P; ++i) next[i] = th[j][i] - lr * g[i];
            th.push_back(next);
        }
        std::vector<double> g(P, 0.0);
        r.losses[t] = ref_task(net, th[k].data(), nullptr, x_q, y_q, l_q, nq, g.data(), nullptr, nullptr);
        if (second)
            for (int j = k - 1; j >= 0; --j) {
                std::vector<double> hv(P, 0.0);
                ref_task(net, th[j].data(), g.data(), x_s, y_s, l_s, ns, nullptr, hv.data(), nullptr);
                for (int i = 0; i < P; ++i) g[i] -= lr * hv[i];
            }
        for (int i = 0; i < P; ++i) r.grad[i] += g[i] / tasks;
        std::copy(th[k].begin(), th[k].end(), r.adapted.begin() + (size_t)t * P);
        for (int j = 1; j < k; ++j) std::copy(th[j].begin(), th[j].end(), r.iterates.begin() + ((size_t)t * (k - 1) + j - 1) * P);
        r.loss += r.losses[t] / tasks;
    }
    return r;
}

// ------------------------------------------------------------------ inputs --------------------

static std::mt19937_64 g_rng(2025);
static std::vector<double> normal_vec(size_t n, double scale = 1.0) {
    std::normal_distribution<double> d(0, 1);
    std::vector<double> v(n);
    for (double& x : v) x = scale * d(g_rng);
    return v;
}
// Mlp::init's scheme: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for W and b.
static std::vector<double> init_params(const Net& net) {
    std::vector<double> v;
    for (int l = 0; l < net.layers(); ++l) {
        const double bound = 1 / std::sqrt((double)net.fan_in(l));
        std::uniform_real_distribution<double> u(-bound, bound);
        for (int i = 0; i < net.fan_out(l) * (net.fan_in(l) + 1); ++i) v.push_back(u(g_rng));
    }
    return v;
}

// ------------------------------------------------------------------ kernels by dtype ----------

template <typename T> struct K;
#define MK_K(T, TN)                                                    \
    template <> struct K<T> {                                          \
        static constexpr const char* name = #TN;                       \
        static constexpr double tol = std::is_same_v<T, float> ? 1e-4 : 1e-10; \
        static constexpr auto meta = &maml_meta_##TN;                  \
        static constexpr auto op = &mlp_op_##TN;                       \
        static constexpr auto gemm_tiled = &maml_gemm_tiled_##TN;      \
        static constexpr auto gemm_naive = &maml_gemm_naive_##TN;      \
        static constexpr auto bias_act = &maml_bias_act_##TN;          \
        static constexpr auto r_bias_act = &maml_r_bias_act_##TN;      \
        static constexpr auto loss_rows = &maml_loss_rows_##TN;        \
        static constexpr auto task_loss = &maml_task_loss_##TN;        \
        static constexpr auto col_sum = &maml_col_sum_##TN;            \
        static constexpr auto act_back = &maml_act_back_##TN;          \
        static constexpr auto sgd_step = &maml_sgd_step_##TN;          \
        static constexpr auto descend = &maml_descend_##TN;            \
        static constexpr auto mean_rows = &maml_mean_rows_##TN;        \
    };
MK_K(float, f32)
MK_K(double, f64)
#undef MK_K

// Which kernels ran (every one must, in quick mode too).
static std::vector<std::string> g_launched;
static void launched(const char* kernel, const char* dtype) {
    const std::string s = std::string(kernel) + "_" + dtype;
    if (std::find(g_launched.begin(), g_launched.end(), s) == g_launched.end()) g_launched.push_back(s);
}

// ------------------------------------------------------------------ device buffers ------------
// Every buffer a kernel reads or writes is an emu::DeviceVec (prelude.h): its end touches an
// inaccessible page, so a read or write past it faults at the instruction and names the thread
// and the buffer (EMU_GUARD=before: the same before its start); the few slack bytes short of the
// page are poisoned and checked after every block.
template <typename T> using Dev = emu::DeviceVec<T>;
// Every launch of the driver: emu_launch (which checks the buffers' slack after every block),
// and the record that the kernel ran.
#define LAUNCH(grid, smem, kernel_name, ...)                     \
    do {                                                          \
        emu_launch(grid, block(), smem, [=] { __VA_ARGS__; });    \
        launched(kernel_name, K<T>::name);                        \
    } while (0)

// cuda::alloc (at least one element) with poisoning: NaN (0xff bytes).
template <typename T>
static Dev<T> alloc(size_t n) {
    Dev<T> v(std::max<size_t>(n, 1));
    v.poison();
    return v;
}
// The values as a T buffer, and back exactly as f64 (the reference's inputs).
template <typename T>
static Dev<T> as(std::vector<double>& v) {
    Dev<T> r(v.size());
    for (size_t i = 0; i < v.size(); ++i) r[i] = (T)v[i], v[i] = (double)r[i];
    return r;
}
static Dev<unsigned> labels_vec(size_t n, int classes) {
    Dev<unsigned> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = (unsigned)(g_rng() % (uint64_t)classes);
    return v;
}

// ------------------------------------------------------------------ cuda.rs, mirrored ---------

constexpr unsigned THREADS_RS = 256;           // cuda.rs / layered.rs THREADS
constexpr size_t SMEM_OPTIN = 227 * 1024;      // max_shared_bytes_optin of an H100/H200
constexpr size_t TILE = 64;                    // layered.rs TILE
static size_t g_grid_yz = 65535;               // layered.rs GRID_YZ
static size_t g_grid_x_max = 2147483647;       // the tiled grid's x clamp (i32::MAX)
static size_t g_max_blocks = 65535;            // grid_1d's MAX_BLOCKS in src/cuda/mod.rs
static bool g_force_tiled = false;             // cuda::force_tiled

static dim3 grid_1d(size_t items) {
    return {(unsigned)std::clamp<size_t>((items + THREADS_RS - 1) / THREADS_RS, 1, g_max_blocks), 1, 1};
}
static dim3 block() { return {THREADS_RS, 1, 1}; }

// net_config: the fused kernels' configuration for `rows` samples and `vectors` parameter-sized
// buffers per task (None when a count exceeds i32).
static std::optional<NetConfig> net_config(const Net& net, size_t rows, size_t vectors) {
    size_t widths = 0;
    for (int l = 0; l < net.layers(); ++l) widths += net.fan_out(l);
    const size_t act_elems = rows * widths, wide = rows * net.max_width();
    const size_t ws = 4 * act_elems + 4 * wide + 32 + vectors * net.P;
    if (act_elems > INT32_MAX || wide > INT32_MAX || ws > INT32_MAX || rows > INT32_MAX) return std::nullopt;
    return NetConfig{net.layers(), net.act, net.loss, net.P, (int)rows, (int)act_elems, (int)wide, (int)ws};
}
// fused_plan: the configuration and dynamic shared memory bytes, or None for the tiled path.
template <typename T>
static std::optional<std::pair<NetConfig, size_t>> fused_plan(const Net& net, size_t rows, size_t vectors) {
    const auto cfg = net_config(net, rows, vectors);
    if (!cfg) return std::nullopt;
    const size_t bytes = (size_t)cfg->ws_elems * sizeof(T);
    if (bytes > SMEM_OPTIN || g_force_tiled) return std::nullopt;
    return std::make_pair(*cfg, bytes);
}
// The largest sample count whose workspace fits the fused kernel.
template <typename T>
static size_t largest_fused_rows(const Net& net, size_t vectors) {
    size_t rows = 0;
    while (fused_plan<T>(net, rows + 1, vectors)) ++rows;
    return rows;
}

// ------------------------------------------------------------------ layered.rs, mirrored -----

enum class Product { Tiled, Naive };

static Operand op_rows(size_t off, size_t batch, size_t ld) { return {(long long)off, (long long)batch, (int)ld, 1}; }
static Operand op_t(Operand o) { return {o.off, o.batch, o.cs, o.rs}; }

template <typename T>
struct PView {  // layered.rs Params: task t's vector at t * stride
    const T* buf;
    size_t stride;
};

template <typename T>
struct Engine {
    const Net& net;
    Product product;
    size_t tasks, rows, wide;
    std::vector<Dev<T>> z, h, rz, rh;
    Dev<T> d, d_next, rd, rd_next, row_loss;
    int tasks_i, act;

    Engine(const Net& n, Product p, size_t t, size_t r, bool with_r)
        : net(n), product(p), tasks(t), rows(r), wide(n.max_width()), tasks_i((int)t), act(n.act) {
        const int L = net.layers();
        for (int l = 0; l < L; ++l) z.push_back(alloc<T>(tasks * rows * net.fan_out(l)));
        for (int l = 0; l + 1 < L; ++l) h.push_back(alloc<T>(tasks * rows * net.fan_out(l)));
        if (with_r) {
            for (int l = 0; l < L; ++l) rz.push_back(alloc<T>(tasks * rows * net.fan_out(l)));
            for (int l = 0; l + 1 < L; ++l) rh.push_back(alloc<T>(tasks * rows * net.fan_out(l)));
        }
        d = alloc<T>(tasks * rows * wide), d_next = alloc<T>(tasks * rows * wide);
        rd = alloc<T>(tasks * rows * (with_r ? wide : 1)), rd_next = alloc<T>(tasks * rows * (with_r ? wide : 1));
        row_loss = alloc<T>(tasks * rows);
    }

    // Kernels::gemm: C (+)= A.B for every task.
    void gemm(const T* a, Operand ao, const T* b, Operand bo, T* c, Operand co, size_t m, size_t n, size_t k,
              bool accumulate) {
        const GemmShape s{ao, bo, co, (int)m, (int)n, (int)k, tasks_i, accumulate, 0};
        if (product == Product::Tiled) {
            const dim3 grid{(unsigned)std::clamp<size_t>((n + TILE - 1) / TILE, 1, g_grid_x_max),
                            (unsigned)std::clamp<size_t>((m + TILE - 1) / TILE, 1, g_grid_yz),
                            (unsigned)std::clamp<size_t>(tasks, 1, g_grid_yz)};
            LAUNCH(grid, 0, "maml_gemm_tiled", K<T>::gemm_tiled(a, b, c, s));
        } else {
            LAUNCH(grid_1d(tasks * m * n), 0, "maml_gemm_naive", K<T>::gemm_naive(a, b, c, s));
        }
    }

    Operand input_op(int l, size_t xn) const {
        const size_t fi = net.fan_in(l);
        return l == 0 ? op_rows(0, xn * fi, fi) : op_rows(0, rows * fi, fi);
    }
    Operand weight_op(int l, PView<T> p) const { return op_t(op_rows(net.w_off[l], p.stride, net.fan_in(l))); }

    void forward(PView<T> p, const PView<T>* v, const T* x, size_t n) {
        const int L = net.layers(), n_i = (int)n, tasks_i_ = tasks_i, act_ = act;
        for (int l = 0; l < L; ++l) {
            const size_t fi = net.fan_in(l), fo = net.fan_out(l);
            const bool hidden = l + 1 < L;
            const Operand in_op = input_op(l, n), out_op = op_rows(0, rows * fo, fo);
            const T* input = l == 0 ? x : h[l - 1].data();
            const Operand w = weight_op(l, p);
            gemm(input, in_op, p.buf, w, z[l].data(), out_op, n, fo, fi, false);
            const long long b_off = net.w_off[l] + (long long)(fo * fi), p_stride = (long long)p.stride,
                            z_stride = (long long)(rows * fo);
            const int fo_i = (int)fo;
            T* zl = z[l].data();
            T* hl = hidden ? h[l].data() : nullptr;
            const T* pb = p.buf;
            LAUNCH(grid_1d(tasks * n * fo), 0, "maml_bias_act",
                   K<T>::bias_act(zl, hl, pb, b_off, p_stride, n_i, fo_i, z_stride, tasks_i_, act_));
            if (!v) continue;
            const Operand vw = weight_op(l, *v);
            gemm(input, in_op, v->buf, vw, rz[l].data(), out_op, n, fo, fi, false);
            if (l > 0) gemm(rh[l - 1].data(), input_op(l, n), p.buf, w, rz[l].data(), out_op, n, fo, fi, true);
            const long long v_stride = (long long)v->stride;
            T* rzl = rz[l].data();
            T* rhl = hidden ? rh[l].data() : nullptr;
            const T* vb = v->buf;
            LAUNCH(grid_1d(tasks * n * fo), 0, "maml_r_bias_act",
                   K<T>::r_bias_act(rzl, rhl, zl, vb, b_off, v_stride, n_i, fo_i, z_stride, tasks_i_, act_));
        }
    }

    void head(const T* y, const unsigned* labels, size_t n, bool r, T* losses) {
        const int last = net.layers() - 1;
        const size_t width = net.out();
        const long long z_stride = (long long)(rows * width), d_stride = (long long)(rows * wide);
        const int n_i = (int)n, width_i = (int)width, rows_i = (int)rows, tasks_i_ = tasks_i, loss = net.loss;
        const T* zl = z[last].data();
        const T* rzl = r ? rz[last].data() : nullptr;
        T* dd = d.data();
        T* rdd = r ? rd.data() : nullptr;
        T* rl = row_loss.data();
        LAUNCH(grid_1d(tasks * n), 0, "maml_loss_rows",
               K<T>::loss_rows(zl, rzl, z_stride, y, labels, n_i, width_i, tasks_i_, loss, dd, rdd, d_stride, rl, rows_i));
        if (losses) {
            LAUNCH(grid_1d(tasks), 0, "maml_task_loss", K<T>::task_loss(rl, rows_i, n_i, losses, tasks_i_));
        }
    }

    void backward(PView<T> p, const PView<T>* v, T* hv, const T* x, size_t n, T* grad) {
        const size_t pn = net.P, d_batch = rows * wide;
        const int n_i = (int)n;
        for (int l = net.layers() - 1; l >= 0; --l) {
            const size_t fi = net.fan_in(l), fo = net.fan_out(l);
            const Operand in_op = input_op(l, n), delta = op_rows(0, d_batch, fo),
                          dw = op_rows(net.w_off[l], pn, fi);
            const size_t b_off = net.w_off[l] + fo * fi;
            const T* input = l == 0 ? x : h[l - 1].data();
            if (grad) {
                gemm(d.data(), op_t(delta), input, in_op, grad, dw, fo, fi, n, false);
                col_sum(false, b_off, grad, n_i, fo);
            }
            if (v) {
                gemm(rd.data(), op_t(delta), input, in_op, hv, dw, fo, fi, n, false);
                if (l > 0) gemm(d.data(), op_t(delta), rh[l - 1].data(), in_op, hv, dw, fo, fi, n, true);
                col_sum(true, b_off, hv, n_i, fo);
            }
            if (l == 0) break;
            const Operand below = op_rows(0, d_batch, fi), w = op_rows(net.w_off[l], p.stride, fi);
            gemm(d.data(), delta, p.buf, w, d_next.data(), below, n, fi, fo, false);
            if (v) {
                const Operand vw = op_rows(net.w_off[l], v->stride, fi);
                gemm(rd.data(), delta, p.buf, w, rd_next.data(), below, n, fi, fo, false);
                gemm(d.data(), delta, v->buf, vw, rd_next.data(), below, n, fi, fo, true);
            }
            act_back(l - 1, n_i, fi, v != nullptr);
            std::swap(d, d_next);
            std::swap(rd, rd_next);
        }
    }

    void col_sum(bool r, size_t off, T* out, int n_i, size_t width) {
        const long long d_stride = (long long)(rows * wide), off_ = (long long)off, out_stride = net.P;
        const int width_i = (int)width, tasks_i_ = tasks_i;
        const T* src = r ? rd.data() : d.data();
        LAUNCH(grid_1d(tasks * width), 0, "maml_col_sum",
               K<T>::col_sum(src, d_stride, n_i, width_i, out, off_, out_stride, tasks_i_));
    }

    void act_back(int below, int n_i, size_t width, bool r) {
        const long long d_stride = (long long)(rows * wide), z_stride = (long long)(rows * width);
        const int width_i = (int)width, tasks_i_ = tasks_i, act_ = act;
        T* dn = d_next.data();
        T* rdn = r ? rd_next.data() : nullptr;
        const T* zb = z[below].data();
        const T* rzb = r ? rz[below].data() : nullptr;
        LAUNCH(grid_1d(tasks * (size_t)n_i * width), 0, "maml_act_back",
               K<T>::act_back(dn, rdn, d_stride, zb, rzb, z_stride, n_i, width_i, tasks_i_, act_));
    }
};

// ------------------------------------------------------------------ the ops -------------------

enum Mode { FORWARD = 0, GRAD = 1, HVP = 2 };

template <typename T>
struct OpIn {
    size_t tasks, samples;
    bool broadcast;                     // params one [P] row
    Dev<T> params, x, y, v;             // y empty for CE
    Dev<unsigned> labels;
    bool v_rows;                        // v [T,P] (else [P])
};

template <typename T>
struct OpOut {
    Dev<T> out, losses;
    bool fused;
};

// cuda.rs run_op: the fused mlp_op_<T> when its workspace fits, else the tiled path.
template <typename T>
static OpOut<T> run_op(Mode mode, const Net& net, const OpIn<T>& in) {
    OpOut<T> r;
    const size_t pn = net.P, tasks = in.tasks, n = in.samples;
    const T* yv = net.loss == 0 && mode != FORWARD ? in.y.data() : nullptr;
    const unsigned* lab = net.loss == 1 && mode != FORWARD ? in.labels.data() : nullptr;
    const T* v = mode == HVP ? in.v.data() : nullptr;
    const auto plan = fused_plan<T>(net, n, 0);
    r.fused = plan.has_value();
    if (plan) {
        const NetConfig cfg = plan->first;
        const size_t shared = plan->second;
        r.out = alloc<T>(mode == FORWARD ? tasks * n * net.out() : tasks * pn);
        if (mode == GRAD) r.losses = alloc<T>(tasks);
        const long long p_stride = in.broadcast ? 0 : (long long)pn;
        const long long v_stride = mode == HVP && in.v_rows ? (long long)pn : 0;
        const int mode_i = mode, n_i = (int)n;
        const std::vector<int> sizes(net.sizes), offsets(net.w_off);
        const int *sz = sizes.data(), *off = offsets.data();
        const T *p = in.params.data(), *x = in.x.data();
        T* out = r.out.data();
        T* losses = mode == GRAD ? r.losses.data() : nullptr;
        const dim3 grid{(unsigned)tasks, 1, 1};
        LAUNCH(grid, shared, "mlp_op", K<T>::op(cfg, mode_i, n_i, sz, off, p, p_stride, v, v_stride, x, yv, lab, out, losses));
        return r;
    }
    // run_op_tiled
    const PView<T> p{in.params.data(), in.broadcast ? 0 : pn};
    Engine<T> e(net, Product::Tiled, tasks, n, mode == HVP);
    const PView<T> dir{v, in.v_rows ? pn : 0};
    e.forward(p, mode == HVP ? &dir : nullptr, in.x.data(), n);
    if (mode == FORWARD) {
        r.out = std::move(e.z.back());
        return r;
    }
    r.out = alloc<T>(tasks * pn);
    if (mode == HVP) {
        e.head(yv, lab, n, true, nullptr);
        e.backward(p, &dir, r.out.data(), in.x.data(), n, nullptr);
        return r;
    }
    r.losses = alloc<T>(tasks);
    e.head(yv, lab, n, false, r.losses.data());
    e.backward(p, nullptr, nullptr, in.x.data(), n, r.out.data());
    return r;
}

// ------------------------------------------------------------------ the meta-gradient ---------

template <typename T>
struct Batch {
    size_t tasks, ns, nq;
    Dev<T> xs, ys, xq, yq;
    Dev<unsigned> ls, lq;
};

template <typename T>
struct MetaOut {
    Dev<T> grad, losses, adapted, iterates;  // iterates: the fused kernel's only
    double loss = 0;
    bool fused = false;
    // The fused launch took the mean over tasks itself (cuda.rs: tasks·P ≤ MEAN_IN_LAUNCH_MAX):
    // whether it has the bits of maml_mean_rows over the same rows, and left its counter at 0.
    bool mean_in_launch = false, mean_bits_match = false, counter_rearmed = false;
};

constexpr size_t MEAN_IN_LAUNCH_MAX = size_t(1) << 16;  // cuda.rs

enum class Path { Auto, Reference };

template <typename T>
static Dev<T> mean_rows(const Dev<T>& rows, size_t tasks, size_t pn) {
    Dev<T> mean = alloc<T>(pn);
    const T* src = rows.data();
    T* dst = mean.data();
    const int tasks_i = (int)tasks, pn_i = (int)pn;
    LAUNCH(grid_1d(pn), 0, "maml_mean_rows", K<T>::mean_rows(src, dst, tasks_i, pn_i));
    return mean;
}

// cuda.rs meta_typed: fused when it fits (Auto), else layered::meta_gradient with the tiled
// product (Auto) or the naive one (Reference); then mean_rows and the host mean of the losses.
template <typename T>
static MetaOut<T> meta_gradient(const Net& net, int k, double lr, bool second, const Dev<T>& theta,
                                const Batch<T>& b, Path path) {
    MetaOut<T> r;
    const size_t tasks = b.tasks, pn = net.P;
    const T* ys = net.loss == 0 ? b.ys.data() : nullptr;
    const T* yq = net.loss == 0 ? b.yq.data() : nullptr;
    const unsigned* ls = net.loss == 1 ? b.ls.data() : nullptr;
    const unsigned* lq = net.loss == 1 ? b.lq.data() : nullptr;
    std::optional<std::pair<NetConfig, size_t>> plan;
    if (path == Path::Auto) plan = fused_plan<T>(net, std::max(b.ns, b.nq), 3);
    r.fused = plan.has_value();
    Dev<T> grads;
    if (plan) {
        const MetaConfig cfg{plan->first, (int)b.ns, (int)b.nq, k, second, lr};
        const size_t shared = plan->second;
        r.iterates = alloc<T>(tasks * (k - 1) * pn);
        r.adapted = alloc<T>(tasks * pn);
        grads = alloc<T>(tasks * pn);
        r.losses = alloc<T>(tasks);
        const std::vector<int> sizes(net.sizes), offsets(net.w_off);
        const int *sz = sizes.data(), *off = offsets.data();
        const T *p = theta.data(), *xs = b.xs.data(), *xq = b.xq.data();
        T *it = r.iterates.data(), *ad = r.adapted.data(), *gr = grads.data(), *lo = r.losses.data();
        r.mean_in_launch = tasks * pn <= MEAN_IN_LAUNCH_MAX;
        Dev<T> mean = alloc<T>(pn);
        Dev<unsigned> counter(1, 0u);  // the device's block counter: 0 between launches
        T* mn = r.mean_in_launch ? mean.data() : nullptr;
        unsigned* done = counter.data();
        const dim3 grid{(unsigned)tasks, 1, 1};
        LAUNCH(grid, shared, "maml_meta",
               K<T>::meta(cfg, sz, off, p, xs, ys, ls, xq, yq, lq, it, ad, gr, lo, mn, done));
        if (r.mean_in_launch) {
            const Dev<T> separate = mean_rows(grads, tasks, pn);
            r.mean_bits_match = std::memcmp(mean.data(), separate.data(), pn * sizeof(T)) == 0;
            r.counter_rearmed = counter[0] == 0;
            r.grad = std::move(mean);
        }
    } else {
        // layered::meta_gradient
        Engine<T> e(net, path == Path::Reference ? Product::Naive : Product::Tiled, tasks, std::max(b.ns, b.nq),
                    second);
        std::vector<Dev<T>> thetas;
        for (int j = 0; j < k; ++j) thetas.push_back(alloc<T>(tasks * pn));
        Dev<T> g = alloc<T>(tasks * pn), hv = alloc<T>(tasks * pn);
        r.losses = alloc<T>(tasks);
        const PView<T> theta0{theta.data(), 0};
        const int pn_i = (int)pn, tasks_i = (int)tasks;
        for (int j = 0; j < k; ++j) {
            const PView<T> th = j == 0 ? theta0 : PView<T>{thetas[j - 1].data(), pn};
            e.forward(th, nullptr, b.xs.data(), b.ns);
            e.head(ys, ls, b.ns, false, nullptr);
            e.backward(th, nullptr, nullptr, b.xs.data(), b.ns, hv.data());
            const long long src_stride = (long long)th.stride;
            T* dst = thetas[j].data();
            const T* src = th.buf;
            const T* hvp = hv.data();
            LAUNCH(grid_1d(tasks * pn), 0, "maml_sgd_step", K<T>::sgd_step(dst, src, src_stride, hvp, lr, pn_i, tasks_i));
        }
        const PView<T> adapted{thetas.back().data(), pn};
        e.forward(adapted, nullptr, b.xq.data(), b.nq);
        e.head(yq, lq, b.nq, false, r.losses.data());
        e.backward(adapted, nullptr, nullptr, b.xq.data(), b.nq, g.data());
        if (second)
            for (int j = k - 1; j >= 0; --j) {
                const PView<T> th = j == 0 ? theta0 : PView<T>{thetas[j - 1].data(), pn};
                const PView<T> gv{g.data(), pn};
                e.forward(th, &gv, b.xs.data(), b.ns);
                e.head(ys, ls, b.ns, true, nullptr);
                e.backward(th, &gv, hv.data(), b.xs.data(), b.ns, nullptr);
                const long long total = (long long)(tasks * pn);
                T* gp = g.data();
                const T* hvp = hv.data();
                LAUNCH(grid_1d(tasks * pn), 0, "maml_descend", K<T>::descend(gp, hvp, lr, total));
            }
        grads = std::move(g);
        r.adapted = std::move(thetas.back());
    }
    if (!r.mean_in_launch) r.grad = mean_rows(grads, tasks, pn);
    for (size_t t = 0; t < tasks; ++t) r.loss += (double)r.losses[t];
    r.loss /= (double)tasks;
    return r;
}

// ------------------------------------------------------------------ cases ---------------------

template <typename T>
static std::string tag(const Net& net, const char* what) {
    return std::string(K<T>::name) + " " + net.name() + " " + what;
}

// forward / loss_and_grad / hvp of T tasks on the path the rule picks (or forced tiled), with
// [T,P] or broadcast [P] parameters and direction; `expect_fused`: the path the rule must pick.
template <typename T>
static void op_case(const Net& net, size_t tasks, size_t n, bool broadcast, bool v_rows, bool forced_tiled,
                    std::optional<bool> expect_fused = std::nullopt, double scale = 0.3) {
    const size_t pn = net.P;
    std::vector<double> p64 = normal_vec(broadcast ? pn : tasks * pn, scale), x64 = normal_vec(tasks * n * net.in()),
                        y64 = net.loss == 0 ? normal_vec(tasks * n * net.out()) : std::vector<double>{},
                        v64 = normal_vec(v_rows ? tasks * pn : pn);
    OpIn<T> in{tasks, n, broadcast, as<T>(p64), as<T>(x64), as<T>(y64), as<T>(v64),
               net.loss == 1 ? labels_vec(tasks * n, net.out()) : Dev<unsigned>{}, v_rows};
    // f64 reference per task.
    std::vector<double> out64(tasks * n * net.out()), loss64(tasks), grad64(tasks * pn, 0.0), hv64(tasks * pn, 0.0);
    for (size_t t = 0; t < tasks; ++t) {
        const double* p = p64.data() + (broadcast ? 0 : t * pn);
        const double* v = v64.data() + (v_rows ? t * pn : 0);
        const double* x = x64.data() + t * n * net.in();
        const double* y = net.loss == 0 ? y64.data() + t * n * net.out() : nullptr;
        const unsigned* l = net.loss == 1 ? in.labels.data() + t * n : nullptr;
        loss64[t] = ref_task(net, p, nullptr, x, y, l, (int)n, grad64.data() + t * pn, nullptr,
                             out64.data() + t * n * net.out());
        ref_task(net, p, v, x, y, l, (int)n, nullptr, hv64.data() + t * pn, nullptr);
    }
    g_force_tiled = forced_tiled;
    const OpOut<T> fwd = run_op<T>(FORWARD, net, in), grd = run_op<T>(GRAD, net, in), hvp = run_op<T>(HVP, net, in);
    g_force_tiled = false;
    char buf[160];
    std::snprintf(buf, sizeof buf, "T=%zu n=%zu %s%s [%s]", tasks, n, broadcast ? "p[P] " : "", v_rows ? "" : "v[P] ",
                  fwd.fused ? "fused mlp_op" : forced_tiled ? "forced tiled" : "tiled (too large)");
    const std::string s = tag<T>(net, buf);
    if (expect_fused) check(s + " path chosen by the fused-size rule", fwd.fused == *expect_fused);
    compare(s + " forward", fwd.out, out64, K<T>::tol);
    compare(s + " loss", grd.losses, loss64, K<T>::tol);
    compare(s + " grad", grd.out, grad64, K<T>::tol);
    compare(s + " hvp", hvp.out, hv64, K<T>::tol);
}

template <typename T>
static void bits_equal(const std::string& what, const Dev<T>& a, const Dev<T>& b) {
    check(what, a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

struct MetaPaths { bool fused, tiled, naive, determinism; };

// The meta-gradient of one batch on the automatic path, the forced tiled path and the naive
// reference path, each against f64, and the automatic against the naive reference.
template <typename T>
static void meta_case(const Net& net, size_t tasks, size_t ns, size_t nq, int k, bool second, MetaPaths paths,
                      std::optional<bool> expect_fused = std::nullopt, double lr = 0.05) {
    const size_t in = net.in(), no = net.out();
    std::vector<double> th64 = init_params(net), xs64 = normal_vec(tasks * ns * in), xq64 = normal_vec(tasks * nq * in),
                        ys64 = net.loss == 0 ? normal_vec(tasks * ns * no) : std::vector<double>{},
                        yq64 = net.loss == 0 ? normal_vec(tasks * nq * no) : std::vector<double>{};
    Batch<T> b{tasks, ns, nq, as<T>(xs64), as<T>(ys64), as<T>(xq64), as<T>(yq64),
               net.loss == 1 ? labels_vec(tasks * ns, no) : Dev<unsigned>{},
               net.loss == 1 ? labels_vec(tasks * nq, no) : Dev<unsigned>{}};
    const Dev<T> theta = as<T>(th64);
    const MetaRef want = ref_meta(net, k, lr, second, th64, (int)tasks, (int)ns, (int)nq, xs64, ys64, b.ls, xq64, yq64, b.lq);
    char buf[160];
    std::snprintf(buf, sizeof buf, "T=%zu ns=%zu nq=%zu k=%d %s", tasks, ns, nq, k, second ? "second" : "first");
    const std::string s = tag<T>(net, buf);
    const double tol = K<T>::tol;
    auto check_all = [&](const std::string& path, const MetaOut<T>& got) {
        compare(s + " " + path + " grad", got.grad, want.grad, tol);
        compare(s + " " + path + " per-task losses", got.losses, want.losses, tol);
        compare(s + " " + path + " adapted", got.adapted, want.adapted, tol);
        compare(s + " " + path + " meta-loss", std::vector<double>{got.loss}, {want.loss}, tol);
        if (got.fused && k > 1) compare(s + " " + path + " stored iterates", got.iterates, want.iterates, tol);
    };
    std::optional<MetaOut<T>> naive;
    if (paths.naive) {
        naive = meta_gradient<T>(net, k, lr, second, theta, b, Path::Reference);
        check_all("naive reference", *naive);
    }
    if (paths.fused) {
        const MetaOut<T> a = meta_gradient<T>(net, k, lr, second, theta, b, Path::Auto);
        if (expect_fused) check(s + " auto path is " + (*expect_fused ? "fused" : "tiled"), a.fused == *expect_fused);
        const std::string name = a.fused ? "auto (fused)" : "auto (tiled)";
        check_all(name, a);
        if (a.mean_in_launch) {
            check(s + " " + name + " mean over tasks in the launch = maml_mean_rows (bits)", a.mean_bits_match);
            check(s + " " + name + " block counter back at 0", a.counter_rearmed);
        }
        if (naive) compare(s + " " + name + " vs naive grad", a.grad, doubles(naive->grad, net.P), tol);
        if (paths.determinism) {
            g_schedule_rng.seed(emu_seed() + 977);
            const MetaOut<T> again = meta_gradient<T>(net, k, lr, second, theta, b, Path::Auto);
            bits_equal(s + " " + name + " same bits under another schedule", a.grad, again.grad);
            bits_equal(s + " " + name + " losses same bits", a.losses, again.losses);
        }
    }
    if (paths.tiled) {
        g_force_tiled = true;
        const MetaOut<T> t = meta_gradient<T>(net, k, lr, second, theta, b, Path::Auto);
        g_force_tiled = false;
        check_all("forced tiled", t);
        if (naive) compare(s + " forced tiled vs naive grad", t.grad, doubles(naive->grad, net.P), tol);
        if (paths.determinism) {
            g_schedule_rng.seed(emu_seed() + 1931);
            g_force_tiled = true;
            const MetaOut<T> again = meta_gradient<T>(net, k, lr, second, theta, b, Path::Auto);
            g_force_tiled = false;
            bits_equal(s + " forced tiled same bits under another schedule", t.grad, again.grad);
        }
    }
}

// Non-finite inputs have no status path in these kernels (they propagate); what must hold is
// that a NaN in one task's input stays in that task: the other tasks' losses, gradients, H v,
// adapted parameters match f64 on every path (tasks share no buffer region, the tiled product
// zero-fills its tile tails instead of reading a neighbour's rows).
template <typename T>
static void nan_isolation_case(const Net& net, bool forced_tiled) {
    const size_t tasks = 3, n = 5, pn = net.P, in = net.in(), no = net.out();
    std::vector<double> p64 = normal_vec(tasks * pn, 0.3), x64 = normal_vec(tasks * n * in),
                        y64 = net.loss == 0 ? normal_vec(tasks * n * no) : std::vector<double>{},
                        v64 = normal_vec(tasks * pn);
    x64[n * in + 2 * in] = NAN;  // task 1, sample 2
    OpIn<T> op{tasks, n, false, as<T>(p64), as<T>(x64), as<T>(y64), as<T>(v64),
               net.loss == 1 ? labels_vec(tasks * n, no) : Dev<unsigned>{}, true};
    g_force_tiled = forced_tiled;
    const OpOut<T> grd = run_op<T>(GRAD, net, op), hvp = run_op<T>(HVP, net, op);
    g_force_tiled = false;
    const std::string s = tag<T>(net, grd.fused ? "NaN in task 1's x [fused mlp_op]" : "NaN in task 1's x [forced tiled]");
    check(s + " task 1 loss is NaN", std::isnan((double)grd.losses[1]));
    for (size_t t : {0, 2}) {
        std::vector<double> g(pn, 0.0), hv(pn, 0.0);
        const double* x = x64.data() + t * n * in;
        const double* y = net.loss == 0 ? y64.data() + t * n * no : nullptr;
        const unsigned* l = net.loss == 1 ? op.labels.data() + t * n : nullptr;
        const double loss = ref_task(net, p64.data() + t * pn, nullptr, x, y, l, (int)n, g.data(), nullptr, nullptr);
        ref_task(net, p64.data() + t * pn, v64.data() + t * pn, x, y, l, (int)n, nullptr, hv.data(), nullptr);
        const std::string st = s + " task " + std::to_string(t);
        compare(st + " loss", std::vector<T>{grd.losses[t]}, {loss}, K<T>::tol);
        compare(st + " grad", std::vector<T>(grd.out.begin() + t * pn, grd.out.begin() + (t + 1) * pn), g, K<T>::tol);
        compare(st + " hvp", std::vector<T>(hvp.out.begin() + t * pn, hvp.out.begin() + (t + 1) * pn), hv, K<T>::tol);
    }
    // The meta-gradient with the NaN in task 1's support set: tasks 0 and 2 unaffected.
    std::vector<double> th64 = init_params(net), xq64 = normal_vec(tasks * n * in),
                        yq64 = net.loss == 0 ? normal_vec(tasks * n * no) : std::vector<double>{};
    Batch<T> b{tasks, n, n, as<T>(x64), as<T>(y64), as<T>(xq64), as<T>(yq64),
               net.loss == 1 ? labels_vec(tasks * n, no) : Dev<unsigned>{},
               net.loss == 1 ? labels_vec(tasks * n, no) : Dev<unsigned>{}};
    const Dev<T> theta = as<T>(th64);
    const MetaRef want = ref_meta(net, 2, 0.05, true, th64, (int)tasks, (int)n, (int)n, x64, y64, b.ls, xq64, yq64, b.lq);
    g_force_tiled = forced_tiled;
    const MetaOut<T> m = meta_gradient<T>(net, 2, 0.05, true, theta, b, Path::Auto);
    g_force_tiled = false;
    const std::string sm = tag<T>(net, m.fused ? "NaN in task 1's support x [fused maml_meta]" : "NaN in task 1's support x [forced tiled]");
    check(sm + " task 1 loss is NaN", std::isnan((double)m.losses[1]));
    for (size_t t : {0, 2}) {
        const std::string st = sm + " task " + std::to_string(t);
        compare(st + " loss", std::vector<T>{m.losses[t]}, {want.losses[t]}, K<T>::tol);
        compare(st + " adapted", std::vector<T>(m.adapted.begin() + t * pn, m.adapted.begin() + (t + 1) * pn),
                std::vector<double>(want.adapted.begin() + t * pn, want.adapted.begin() + (t + 1) * pn), K<T>::tol);
    }
}

// The f64 reference against central differences of itself (loss -> gradient, gradient -> H v).
static void reference_self_check() {
    g_self_check = true;
    for (int act = 0; act < 4; ++act)
        for (int loss = 0; loss < 2; ++loss) {
            const Net net({3, 6, 5, 4}, act, loss);
            const int n = 5, P = net.P;
            std::vector<double> p = normal_vec(P, 0.7), x = normal_vec(n * 3), y = normal_vec(n * 4), v = normal_vec(P);
            const Dev<unsigned> lab = labels_vec(n, 4);
            std::vector<double> g(P, 0.0), hv(P, 0.0);
            ref_task(net, p.data(), v.data(), x.data(), y.data(), lab.data(), n, g.data(), hv.data(), nullptr);
            auto at = [&](double eps, std::vector<double>* grad) {
                std::vector<double> q(P);
                for (int i = 0; i < P; ++i) q[i] = p[i] + eps * v[i];
                return ref_task(net, q.data(), nullptr, x.data(), y.data(), lab.data(), n, grad ? grad->data() : nullptr,
                                nullptr, nullptr);
            };
            const double eps = 1e-5;
            double gv = 0;
            for (int i = 0; i < P; ++i) gv += g[i] * v[i];
            const double fd = (at(eps, nullptr) - at(-eps, nullptr)) / (2 * eps);
            std::vector<double> gp(P, 0.0), gm(P, 0.0), fdh(P);
            at(eps, &gp), at(-eps, &gm);
            for (int i = 0; i < P; ++i) fdh[i] = (gp[i] - gm[i]) / (2 * eps);
            const std::string s = "f64 reference " + net.name();
            compare(s + " grad.v vs central differences", std::vector<double>{gv}, {fd}, 1e-7);
            compare(s + " H v vs central differences of the gradient", hv, fdh, 1e-6);
        }
    g_self_check = false;
}

// Every activation x loss on a small net: the ops on both paths with [T,P] and [P] rows, and the
// meta-gradient at k in {1, 2, 5}, first and second order, on the three paths.
template <typename T>
static void run_dtype_full() {
    for (int act = 0; act < 4; ++act)
        for (int loss = 0; loss < 2; ++loss) {
            const Net net({3, 7, 5, 4}, act, loss);
            for (bool tiled : {false, true}) {
                op_case<T>(net, 3, 6, false, true, tiled);
                op_case<T>(net, 3, 5, true, false, tiled);
            }
            for (int k : {1, 2, 5})
                for (bool second : {false, true}) meta_case<T>(net, 3, 6, 9, k, second, {true, true, true, k == 2});
        }
    // The sinusoid benchmark shape, as in cuda_meta_gradient_matches_reference_kernel_and_cpu.
    const Net sinus({1, 40, 40, 1}, 0, 0);
    for (auto [k, second] : {std::pair{1, true}, {5, true}, {3, false}})
        meta_case<T>(sinus, 25, 10, 13, k, second, {true, true, true, k == 5}, true);
    // Just inside and just outside the fused-size rule: the meta-gradient (3 vectors) and the
    // ops (none); the automatic path must switch to tiled one sample later.
    const size_t meta_rows = largest_fused_rows<T>(sinus, 3), op_rows_ = largest_fused_rows<T>(sinus, 0);
    std::printf("-- fused-size rule (227 KiB): sinusoid %s meta-gradient up to %zu samples, ops up to %zu\n",
                K<T>::name, meta_rows, op_rows_);
    meta_case<T>(sinus, 2, meta_rows, meta_rows - 3, 2, true, {true, false, false, false}, true);
    meta_case<T>(sinus, 2, meta_rows - 3, meta_rows + 1, 2, true, {true, false, false, false}, false);
    op_case<T>(sinus, 2, op_rows_, false, true, false, true);
    op_case<T>(sinus, 2, op_rows_ + 1, false, true, false, false);
    // The GPU tests' edge shapes: one support sample; an input wider than every layer; one layer.
    meta_case<T>(Net({3, 20, 11, 4}, 1, 0), 4, 1, 4, 3, true, {true, true, true, false});
    meta_case<T>(Net({100, 8, 3}, 2, 1), 3, 4, 4, 2, true, {true, true, true, false});
    meta_case<T>(Net({5, 3}, 3, 1), 1, 2, 5, 2, true, {true, true, true, false});
    // cuda_broadcast_rows_and_single_samples_match_cpu and cuda_forward_grad_hvp_match_cpu.
    for (bool tiled : {false, true}) {
        op_case<T>(Net({2, 3, 1}, 0, 0), 1, 1, true, false, tiled, std::nullopt, 1.0);
        op_case<T>(Net({4, 9, 7, 3}, 2, 1), 3, 2, true, false, tiled, std::nullopt, 1.0);
        op_case<T>(Net({3, 20, 11, 4}, 2, 0), 4, 17, false, true, tiled);
        op_case<T>(Net({6, 9, 5}, 3, 1), 4, 17, false, true, tiled);
        op_case<T>(Net({64, 256, 256, 10}, 1, 1), 4, 17, false, true, tiled);  // f32 fused, f64 tiled
    }
    // Parameters and direction broadcast differently; a single class under cross-entropy (zero
    // loss, gradient and H v: compared absolutely); NaN in one task's input.
    for (bool tiled : {false, true}) {
        op_case<T>(Net({3, 7, 5, 4}, 1, 0), 3, 4, true, true, tiled);
        op_case<T>(Net({3, 7, 5, 4}, 2, 1), 3, 4, false, false, tiled);
        op_case<T>(Net({4, 5, 1}, 1, 1), 2, 3, false, true, tiled);
        nan_isolation_case<T>(Net({3, 7, 5, 4}, 2, 1), tiled);
        nan_isolation_case<T>(Net({2, 6, 3}, 3, 0), tiled);
    }
}

// The GPU tests' shapes that only fit the tiled path, and the lowered grid caps.
static void run_large_and_strides() {
    // 16-300-300-4: several partial 64-wide tiles, 64 samples a full one (about 2 MiB of
    // workspace per task: automatic = tiled).
    meta_case<float>(Net({16, 300, 300, 4}, 1, 0), 3, 64, 67, 2, true, {true, false, true, false}, false);
    meta_case<double>(Net({70, 130, 65, 11}, 2, 1), 5, 150, 153, 3, true, {true, false, true, false}, false);
    for (int act : {1, 2, 3})
        meta_case<double>(Net({5, 33, 17, 7}, act, 1), 9, 13, 16, 2, true, {true, true, true, false});
}

// Grid caps lowered to 2 blocks (1-D grids, the tiled product's x, y and z): every grid-stride
// loop of the per-layer kernels and of maml_mean_rows takes several turns.
template <typename T>
static void run_strides() {
    g_max_blocks = 2, g_grid_yz = 2, g_grid_x_max = 2;
    std::printf("-- %s with grid caps lowered to 2 blocks (grid-stride loops)\n", K<T>::name);
    meta_case<T>(Net({1, 3, 1}, 0, 0), 700, 2, 5, 2, true, {false, true, true, false});
    meta_case<T>(Net({7, 150, 130, 3}, 3, 1), 3, 70, 70, 1, true, {false, true, true, false});
    op_case<T>(Net({7, 150, 130, 3}, 1, 0), 3, 70, true, true, true);
    g_max_blocks = 65535, g_grid_yz = 65535, g_grid_x_max = 2147483647;
}

// Every kernel of the dtype at least once, both paths, both losses, broadcast and not.
template <typename T>
static void run_dtype_quick() {
    op_case<T>(Net({3, 7, 5, 4}, 2, 1), 3, 6, false, true, false);
    op_case<T>(Net({3, 7, 5, 4}, 3, 0), 3, 5, true, false, true);
    meta_case<T>(Net({3, 7, 5, 4}, 1, 1), 3, 6, 9, 2, true, {true, true, true, true});
    meta_case<T>(Net({3, 7, 5, 4}, 2, 0), 2, 5, 4, 1, false, {true, true, false, false});
    const Net sinus({1, 40, 40, 1}, 0, 0);
    meta_case<T>(sinus, 25, 10, 13, 5, true, {true, false, false, false}, true);
    const size_t meta_rows = largest_fused_rows<T>(sinus, 3);
    meta_case<T>(sinus, 1, meta_rows, meta_rows, 1, true, {true, false, false, false}, true);
    meta_case<T>(sinus, 1, meta_rows + 1, 3, 1, true, {true, false, false, false}, false);
}

// `random N [seed]`: N cases drawn at random, each an op case (forward, gradient, HVP) and a
// meta-gradient (fused, tiled and naive paths) of a random MLP (1 to 3 layers of width 1 to 48,
// every activation and loss), tasks, sample counts and inner steps; beyond the fixed cases above.
template <typename T>
static void random_case(std::mt19937_64& r) {
    std::vector<int> sizes(2 + r() % 3);
    for (auto& w : sizes) w = 1 + (int)(r() % (r() % 4 == 0 ? 48 : 9));
    const Net net(sizes, (int)(r() % 4), (int)(r() % 2));
    const size_t tasks = 1 + r() % 5, n = 1 + r() % 12;
    op_case<T>(net, tasks, n, r() % 2, r() % 2, r() % 4 == 0);
    const int k = 1 + (int)(r() % 4);
    meta_case<T>(net, tasks, 1 + r() % 10, 1 + r() % 10, k, r() % 4 != 0, {true, true, true, false});
}

static void run_random(RandomRun run) {
    std::mt19937_64 r(run.seed);
    for (int i = 0; i < run.cases; ++i) {
        std::printf("-- random case %d of %d (seed %llu)\n", i + 1, run.cases, run.seed);
        if (r() % 2) random_case<float>(r);
        else random_case<double>(r);
    }
}

int main(int argc, char** argv) {
    const bool quick = argc > 1 && std::string(argv[1]) == "quick";
    const auto start = std::chrono::steady_clock::now();
    reference_self_check();
    if (const auto run = random_run(argc, argv)) {
        run_random(*run);
        return finish(start);
    }
    if (quick) {
        run_dtype_quick<float>();
        run_dtype_quick<double>();
    } else {
        run_dtype_full<float>();
        run_dtype_full<double>();
        run_large_and_strides();
        run_strides<float>();
        run_strides<double>();
    }
    // Every kernel of maml.cu, both dtypes.
    static const char* kernels[] = {"maml_meta", "mlp_op", "maml_gemm_tiled", "maml_gemm_naive", "maml_bias_act",
                                    "maml_r_bias_act", "maml_loss_rows", "maml_task_loss", "maml_col_sum",
                                    "maml_act_back", "maml_sgd_step", "maml_descend", "maml_mean_rows"};
    int missing = 0;
    for (const char* k : kernels)
        for (const char* d : {"f32", "f64"})
            if (std::find(g_launched.begin(), g_launched.end(), std::string(k) + "_" + d) == g_launched.end())
                std::printf("kernel %s_%s never launched\n", k, d), ++missing;
    check("every one of the 26 kernels launched", missing == 0);
    return finish(start);
}
