#!/usr/bin/env python3
"""A pure-Python emulation of the fused MAML kernels of kernels/maml.cu (`maml_meta_<T>` and
`mlp_op_<T>`), written line for line from the CUDA source: the same shared-memory carve-up
(`carve`, `act_offset`, theta/g/hv at the front of the meta workspace), the same thread-strided
loops, the same `__syncthreads()` points, and the host's workspace size (`net_config` in
src/ops/maml/cuda.rs).

It checks two things a first GPU run would otherwise find:
  * index math: the emulated meta-gradient and HVP against central finite differences of an
    independent f64 reference (every activation, both losses, tails: one sample, support and
    query sizes that differ, one layer), and every shared-memory word read before it is
    written (the workspace starts as NaN, like the poisoned buffers of the tests);
  * races: shared memory remembers, per word, which thread last wrote and read it in the
    current barrier interval; a read of a word another thread wrote, or a write of a word
    another thread read or wrote, in the same interval is a missing __syncthreads().

It cannot see CUDA-specific faults (launch configuration, alignment, the driver); it runs each
barrier interval's threads in a shuffled order to expose order dependence. The mean over tasks
that maml_meta's last block takes (`mean_by_last_block`) is not emulated here: the per-task
gradients are what it checks; scripts/emulate/maml.cpp runs the kernel itself and holds that
mean to maml_mean_rows' bits.

    python3 scripts/compare/maml_fused_emulation.py     # exit 1 on any mismatch or race
"""
import math
import random
import sys

random.seed(3)
BLOCK = 64  # threads per block (the kernels use 256; fewer keeps this fast, same code paths)

# ------------------------------------------------------------------ shared memory with checks

class RaceError(Exception):
    pass


class Block:
    """The current thread and barrier interval of the block being emulated."""
    tid = 0
    interval = 0


class Shared:
    def __init__(self, n):
        self.v = [float("nan")] * n
        self.w_tid = [-1] * n
        self.w_int = [-1] * n
        self.r_tid = [-1] * n  # -2: several readers
        self.r_int = [-1] * n

    def read(self, a):
        if not 0 <= a < len(self.v):
            raise IndexError(f"shared read at {a} outside [0, {len(self.v)})")
        if self.w_int[a] == Block.interval and self.w_tid[a] != Block.tid:
            raise RaceError(f"thread {Block.tid} reads word {a} written by thread {self.w_tid[a]} "
                            "in the same barrier interval")
        if self.r_int[a] == Block.interval and self.r_tid[a] != Block.tid:
            self.r_tid[a] = -2
        else:
            self.r_tid[a], self.r_int[a] = Block.tid, Block.interval
        return self.v[a]

    def write(self, a, x):
        if not 0 <= a < len(self.v):
            raise IndexError(f"shared write at {a} outside [0, {len(self.v)})")
        if self.w_int[a] == Block.interval and self.w_tid[a] != Block.tid:
            raise RaceError(f"threads {self.w_tid[a]} and {Block.tid} write word {a} in one interval")
        if self.r_int[a] == Block.interval and self.r_tid[a] != Block.tid:
            raise RaceError(f"thread {Block.tid} writes word {a} that another thread read "
                            "in the same barrier interval")
        self.v[a], self.w_tid[a], self.w_int[a] = x, Block.tid, Block.interval


class Global:
    def __init__(self, values):
        self.v = list(values)

    def read(self, a):
        if not 0 <= a < len(self.v):
            raise IndexError(f"global read at {a} outside [0, {len(self.v)})")
        return self.v[a]

    def write(self, a, x):
        if not 0 <= a < len(self.v):
            raise IndexError(f"global write at {a} outside [0, {len(self.v)})")
        self.v[a] = x


class Ptr:
    def __init__(self, mem, off=0):
        self.mem, self.off = mem, off

    def __add__(self, k):
        return Ptr(self.mem, self.off + k)

    def __getitem__(self, i):
        return self.mem.read(self.off + i)

    def __setitem__(self, i, x):
        self.mem.write(self.off + i, x)


def sync():
    Block.interval += 1


def threads():
    """The block's threads for one barrier interval, in a shuffled order."""
    order = list(range(BLOCK))
    random.shuffle(order)
    for t in order:
        Block.tid = t
        yield t


def block_sum(local_by_thread):
    # mk::block_sum: warp sums, a barrier, lane 0 of each warp writes scratch, a barrier, and
    # every thread reads all of scratch. Its barriers end the interval of the caller's writes.
    sync()
    sync()
    return sum(local_by_thread)


# ------------------------------------------------------------------ activations

GELU_C, GELU_A = 0.7978845608028654, 0.044715


def act_value(act, z):
    if act == 0:
        return z if z > 0 else 0.0
    if act == 1:
        return math.tanh(z)
    if act == 2:
        return 0.5 * z * (1 + math.tanh(GELU_C * (z + GELU_A * z ** 3)))
    return (z if z > 0 else 0.0) + math.log1p(math.exp(-abs(z)))


def act_derivs(act, z):
    if act == 0:
        return (1.0 if z > 0 else 0.0), 0.0
    if act == 1:
        t = math.tanh(z)
        d1 = 1 - t * t
        return d1, -2 * t * d1
    if act == 2:
        c, a = GELU_C, GELU_A
        t = math.tanh(c * (z + a * z ** 3))
        s2 = 1 - t * t
        du = c * (1 + 3 * a * z * z)
        ddu = 6 * c * a * z
        return 0.5 * (1 + t) + 0.5 * z * s2 * du, s2 * (du + 0.5 * z * (ddu - 2 * t * du * du))
    s = 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))
    return s, s * (1 - s)


# ------------------------------------------------------------------ the block engine (maml.cu)

class Cfg:
    def __init__(self, sizes, act, loss, rows, vectors):
        # net_config in src/ops/maml/cuda.rs
        self.layers = len(sizes) - 1
        self.act, self.loss = act, loss
        self.params = sum(sizes[l + 1] * (sizes[l] + 1) for l in range(self.layers))
        self.rows = rows
        self.act_elems = rows * sum(sizes[1:])
        self.wide = rows * max(sizes[1:])
        self.ws_elems = 4 * self.act_elems + 4 * self.wide + 32 + vectors * self.params


class Work:
    pass


def carve(base, c):
    w = Work()
    w.scratch = base
    base = base + 32
    w.z = base; base = base + c.act_elems
    w.rz = base; base = base + c.act_elems
    w.h = base; base = base + c.act_elems
    w.rh = base; base = base + c.act_elems
    w.delta = base; base = base + c.wide
    w.delta_b = base; base = base + c.wide
    w.rdelta = base; base = base + c.wide
    w.rdelta_b = base
    return w


def act_offset(sizes, l, rows):
    return sum(sizes[j + 1] for j in range(l)) * rows


def forward(c, sizes, w_off, p, v, x, n, w):
    for l in range(c.layers):
        fi, fo = sizes[l], sizes[l + 1]
        W = p + w_off[l]
        b = W + fo * fi
        inp = x if l == 0 else w.h + act_offset(sizes, l - 1, c.rows)
        rin = None if l == 0 else w.rh + act_offset(sizes, l - 1, c.rows)
        out = act_offset(sizes, l, c.rows)
        hidden = l + 1 < c.layers
        for tid in threads():
            for idx in range(tid, n * fo, BLOCK):
                s = idx // fo
                o = idx - s * fo
                xr, wr = inp + s * fi, W + o * fi
                start = 0 if fi & 1 else o % fi
                acc = b[o]
                kk = start
                for _ in range(fi):
                    acc += xr[kk] * wr[kk]
                    kk += 1
                    if kk == fi:
                        kk = 0
                w.z[out + idx] = acc
                racc = 0.0
                if v is not None:
                    V = v + w_off[l]
                    vr = V + o * fi
                    rxr = rin + s * fi if rin is not None else None
                    racc = V[fo * fi + o]
                    kk = start
                    for _ in range(fi):
                        racc += xr[kk] * vr[kk]
                        if rxr is not None:
                            racc += rxr[kk] * wr[kk]
                        kk += 1
                        if kk == fi:
                            kk = 0
                    w.rz[out + idx] = racc
                if hidden:
                    w.h[out + idx] = act_value(c.act, acc)
                    if v is not None:
                        d1, _ = act_derivs(c.act, acc)
                        w.rh[out + idx] = d1 * racc
        sync()


def loss_head(c, sizes, y, labels, n, r, w):
    width = sizes[c.layers]
    out = act_offset(sizes, c.layers - 1, c.rows)
    z, rz = w.z + out, w.rz + out
    local = [0.0] * BLOCK
    if c.loss == 0:
        scale = 2.0 / (n * width)
        for tid in threads():
            for idx in range(tid, n * width, BLOCK):
                e = z[idx] - y[idx]
                local[tid] += e * e
                w.delta[idx] = scale * e
                if r:
                    w.rdelta[idx] = scale * rz[idx]
            local[tid] /= n * width
    else:
        inv_n = 1.0 / n
        for tid in threads():
            for s in range(tid, n, BLOCK):
                zr = z + s * width
                label = labels[s]
                m = zr[0]
                for j in range(1, width):
                    m = max(m, zr[j])
                total = sum(math.exp(zr[j] - m) for j in range(width))
                inv = 1 / total
                p_rz = 0.0
                if r:
                    for j in range(width):
                        p_rz += math.exp(zr[j] - m) * inv * rz[s * width + j]
                for j in range(width):
                    prob = math.exp(zr[j] - m) * inv
                    w.delta[s * width + j] = inv_n * (prob - (1.0 if j == label else 0.0))
                    if r:
                        w.rdelta[s * width + j] = inv_n * prob * (rz[s * width + j] - p_rz)
                local[tid] += (math.log(total) + m - zr[label]) * inv_n
    total = block_sum(local)
    sync()
    return total


def backward(c, sizes, w_off, p, v, hv, x, n, grad, w):
    delta, delta_b, rdelta, rdelta_b = w.delta, w.delta_b, w.rdelta, w.rdelta_b
    for l in range(c.layers - 1, -1, -1):
        fi, fo = sizes[l], sizes[l + 1]
        W = p + w_off[l]
        inp = x if l == 0 else w.h + act_offset(sizes, l - 1, c.rows)
        rin = None if l == 0 else w.rh + act_offset(sizes, l - 1, c.rows)
        for tid in threads():
            for idx in range(tid, fo * fi, BLOCK):
                o = idx // fi
                i = idx - o * fi
                acc = racc = 0.0
                for s in range(n):
                    d = delta[s * fo + o]
                    a = inp[s * fi + i]
                    acc += d * a
                    if v is not None:
                        racc += rdelta[s * fo + o] * a
                        if rin is not None:
                            racc += d * rin[s * fi + i]
                if grad is not None:
                    grad[w_off[l] + idx] = acc
                if v is not None:
                    hv[w_off[l] + idx] = racc
            for o in range(tid, fo, BLOCK):
                acc = racc = 0.0
                for s in range(n):
                    acc += delta[s * fo + o]
                    if v is not None:
                        racc += rdelta[s * fo + o]
                if grad is not None:
                    grad[w_off[l] + fo * fi + o] = acc
                if v is not None:
                    hv[w_off[l] + fo * fi + o] = racc
            if l > 0:
                below = act_offset(sizes, l - 1, c.rows)
                V = v + w_off[l] if v is not None else None
                for idx in range(tid, n * fi, BLOCK):
                    s = idx // fi
                    i = idx - s * fi
                    g = rg = 0.0
                    for o in range(fo):
                        d = delta[s * fo + o]
                        g += d * W[o * fi + i]
                        if V is not None:
                            rg += rdelta[s * fo + o] * W[o * fi + i] + d * V[o * fi + i]
                    d1, d2 = act_derivs(c.act, w.z[below + idx])
                    delta_b[idx] = g * d1
                    if V is not None:
                        rdelta_b[idx] = rg * d1 + g * d2 * w.rz[below + idx]
        sync()
        delta, delta_b = delta_b, delta
        rdelta, rdelta_b = rdelta_b, rdelta


def block_copy(dst, src, n):
    for tid in threads():
        for i in range(tid, n, BLOCK):
            dst[i] = src[i]


def maml_meta(task, cfg, sizes, w_off, params, xs, ys, ls, xq, yq, lq, iterates, adapted, grads, losses, smem):
    c = cfg["net"]
    P, in_w, out_w = c.params, sizes[0], sizes[c.layers]
    base = Ptr(smem)
    theta, g, hv = base, base + P, base + 2 * P
    w = carve(base + 3 * P, c)
    lr = cfg["lr"]
    x_s = xs + task * cfg["support"] * in_w
    x_q = xq + task * cfg["query"] * in_w
    y_s = ys + task * cfg["support"] * out_w if c.loss == 0 else None
    y_q = yq + task * cfg["query"] * out_w if c.loss == 0 else None
    l_s = ls + task * cfg["support"] if c.loss == 1 else None
    l_q = lq + task * cfg["query"] if c.loss == 1 else None
    my_iterates = iterates + task * (cfg["steps"] - 1) * P
    my_adapted = adapted + task * P

    block_copy(theta, params, P)
    sync()
    for j in range(cfg["steps"]):
        forward(c, sizes, w_off, theta, None, x_s, cfg["support"], w)
        loss_head(c, sizes, y_s, l_s, cfg["support"], False, w)
        backward(c, sizes, w_off, theta, None, None, x_s, cfg["support"], hv, w)
        keep = my_iterates + j * P if j + 1 < cfg["steps"] else my_adapted
        for tid in threads():
            for i in range(tid, P, BLOCK):
                nxt = theta[i] - lr * hv[i]
                theta[i] = nxt
                keep[i] = nxt
        sync()
    forward(c, sizes, w_off, theta, None, x_q, cfg["query"], w)
    loss = loss_head(c, sizes, y_q, l_q, cfg["query"], False, w)
    backward(c, sizes, w_off, theta, None, None, x_q, cfg["query"], g, w)
    if cfg["second"]:
        for j in range(cfg["steps"] - 1, -1, -1):
            block_copy(theta, params if j == 0 else my_iterates + (j - 1) * P, P)
            sync()
            forward(c, sizes, w_off, theta, g, x_s, cfg["support"], w)
            loss_head(c, sizes, y_s, l_s, cfg["support"], True, w)
            backward(c, sizes, w_off, theta, g, hv, x_s, cfg["support"], None, w)
            for tid in threads():
                for i in range(tid, P, BLOCK):
                    g[i] = g[i] - lr * hv[i]
            sync()
    block_copy(grads + task * P, g, P)
    losses[task] = loss


def mlp_op(task, c, mode, n, sizes, w_off, params, p_stride, v, v_stride, x, y, labels, out, losses, smem):
    P, in_w, out_w = c.params, sizes[0], sizes[c.layers]
    w = carve(Ptr(smem), c)
    p = params + task * p_stride
    vt = v + task * v_stride if mode == 2 else None
    xt = x + task * n * in_w
    forward(c, sizes, w_off, p, vt, xt, n, w)
    if mode == 0:
        z = w.z + act_offset(sizes, c.layers - 1, c.rows)
        block_copy(out + task * n * out_w, z, n * out_w)
        return
    yt = y + task * n * out_w if c.loss == 0 else None
    lt = labels + task * n if c.loss == 1 else None
    loss = loss_head(c, sizes, yt, lt, n, mode == 2, w)
    row = out + task * P
    if mode == 1:
        backward(c, sizes, w_off, p, None, None, xt, n, row, w)
        losses[task] = loss
    else:
        backward(c, sizes, w_off, p, vt, row, xt, n, None, w)


# ------------------------------------------------------------------ independent f64 reference

def ref_forward(sizes, act, p, xrow):
    h, off = list(xrow), 0
    for l in range(len(sizes) - 1):
        fi, fo = sizes[l], sizes[l + 1]
        z = [p[off + fo * fi + o] + sum(p[off + o * fi + i] * h[i] for i in range(fi)) for o in range(fo)]
        off += fo * (fi + 1)
        h = z if l + 2 == len(sizes) else [act_value(act, v) for v in z]
    return h


def ref_loss(sizes, act, loss, p, x, y, n):
    d_in, d_out = sizes[0], sizes[-1]
    total = 0.0
    for s in range(n):
        o = ref_forward(sizes, act, p, x[s * d_in:(s + 1) * d_in])
        if loss == 0:
            total += sum((o[j] - y[s * d_out + j]) ** 2 for j in range(d_out)) / (n * d_out)
        else:
            m = max(o)
            total += (math.log(sum(math.exp(v - m) for v in o)) + m - o[y[s]]) / n
    return total


def ref_grad(sizes, act, loss, p, x, y, n):
    """The gradient of ref_loss by plain backpropagation, sample by sample."""
    d_in, d_out, layers = sizes[0], sizes[-1], len(sizes) - 1
    offs = w_offsets(sizes)
    grad = [0.0] * len(p)
    for s in range(n):
        hs, zs = [list(x[s * d_in:(s + 1) * d_in])], []
        for l in range(layers):
            fi, fo, off = sizes[l], sizes[l + 1], offs[l]
            z = [p[off + fo * fi + o] + sum(p[off + o * fi + i] * hs[-1][i] for i in range(fi)) for o in range(fo)]
            zs.append(z)
            hs.append(z if l + 1 == layers else [act_value(act, v) for v in z])
        o = zs[-1]
        if loss == 0:
            d = [2 * (o[j] - y[s * d_out + j]) / (n * d_out) for j in range(d_out)]
        else:
            m = max(o)
            e = [math.exp(v - m) for v in o]
            d = [(e[j] / sum(e) - (1.0 if j == y[s] else 0.0)) / n for j in range(d_out)]
        for l in range(layers - 1, -1, -1):
            fi, fo, off = sizes[l], sizes[l + 1], offs[l]
            for o_ in range(fo):
                grad[off + fo * fi + o_] += d[o_]
                for i in range(fi):
                    grad[off + o_ * fi + i] += d[o_] * hs[l][i]
            if l > 0:
                d = [sum(d[o_] * p[off + o_ * fi + i] for o_ in range(fo)) * act_derivs(act, zs[l - 1][i])[0]
                     for i in range(fi)]
    return grad


def fd_grad(f, p, eps):
    out = []
    for i in range(len(p)):
        a, b = list(p), list(p)
        a[i] += eps
        b[i] -= eps
        out.append((f(a) - f(b)) / (2 * eps))
    return out


def rel_err(a, b):
    num = math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))
    den = math.sqrt(sum(y * y for y in b)) or 1.0
    return num / den if all(math.isfinite(x) for x in a) else float("inf")


# ------------------------------------------------------------------ the checks

def problem(sizes, loss, tasks, n, scale=0.6):
    P = sum(sizes[l + 1] * (sizes[l] + 1) for l in range(len(sizes) - 1))
    x = [random.gauss(0, 1) for _ in range(tasks * n * sizes[0])]
    if loss == 0:
        y = [random.gauss(0, 1) for _ in range(tasks * n * sizes[-1])]
    else:
        y = [random.randrange(sizes[-1]) for _ in range(tasks * n)]
    return P, x, y


def w_offsets(sizes):
    offs, off = [], 0
    for l in range(len(sizes) - 1):
        offs.append(off)
        off += sizes[l + 1] * (sizes[l] + 1)
    return offs


def check_meta(sizes, act, loss, tasks, ns, nq, steps, second, lr=0.1):
    P, xs, ys = problem(sizes, loss, tasks, ns)
    _, xq, yq = problem(sizes, loss, tasks, nq)
    theta = [0.6 * random.gauss(0, 1) for _ in range(P)]
    c = Cfg(sizes, act, loss, max(ns, nq), 3)
    cfg = dict(net=c, support=ns, query=nq, steps=steps, second=second, lr=lr)
    nan = float("nan")
    iterates = Global([nan] * max(1, tasks * (steps - 1) * P))
    adapted, grads, losses = Global([nan] * (tasks * P)), Global([nan] * (tasks * P)), Global([nan] * tasks)
    yv, lv = (Global(ys), None) if loss == 0 else (None, Global(ys))
    yqv, lqv = (Global(yq), None) if loss == 0 else (None, Global(yq))
    for t in range(tasks):
        maml_meta(t, cfg, sizes, w_offsets(sizes), Ptr(Global(theta)), Ptr(Global(xs)),
                  Ptr(yv) if yv else None, Ptr(lv) if lv else None, Ptr(Global(xq)),
                  Ptr(yqv) if yqv else None, Ptr(lqv) if lqv else None, Ptr(iterates), Ptr(adapted),
                  Ptr(grads), Ptr(losses), Shared(c.ws_elems))
    worst = 0.0
    for t in range(tasks):
        d_in, d_out = sizes[0], sizes[-1]
        txs, txq = xs[t * ns * d_in:(t + 1) * ns * d_in], xq[t * nq * d_in:(t + 1) * nq * d_in]
        stride = d_out if loss == 0 else 1
        tys, tyq = ys[t * ns * stride:(t + 1) * ns * stride], yq[t * nq * stride:(t + 1) * nq * stride]

        def adapt(p):
            for _ in range(steps):
                g = ref_grad(sizes, act, loss, p, txs, tys, ns)
                p = [a - lr * b for a, b in zip(p, g)]
            return p

        def meta_loss(p):
            return ref_loss(sizes, act, loss, adapt(p), txq, tyq, nq)

        got = grads.v[t * P:(t + 1) * P]
        if second:
            want = fd_grad(meta_loss, theta, 1e-5)
        else:
            want = ref_grad(sizes, act, loss, adapt(theta), txq, tyq, nq)
        want_loss = meta_loss(theta)
        worst = max(worst, rel_err(got, want), abs(losses.v[t] - want_loss) / abs(want_loss))
        worst = max(worst, rel_err(adapted.v[t * P:(t + 1) * P], adapt(theta)))
    return worst


def check_ops(sizes, act, loss, tasks, n, broadcast):
    P, x, y = problem(sizes, loss, tasks, n)
    rows_p = 1 if broadcast else tasks
    params = [0.6 * random.gauss(0, 1) for _ in range(rows_p * P)]
    v = [random.gauss(0, 1) for _ in range(rows_p * P)]
    stride = 0 if broadcast else P
    c = Cfg(sizes, act, loss, n, 0)
    nan = float("nan")
    yv, lv = (Ptr(Global(y)), None) if loss == 0 else (None, Ptr(Global(y)))
    outs = {}
    for mode, length in [(0, tasks * n * sizes[-1]), (1, tasks * P), (2, tasks * P)]:
        out, losses = Global([nan] * length), Global([nan] * tasks)
        for t in range(tasks):
            mlp_op(t, c, mode, n, sizes, w_offsets(sizes), Ptr(Global(params)), stride, Ptr(Global(v)), stride,
                   Ptr(Global(x)), yv, lv, Ptr(out), Ptr(losses), Shared(c.ws_elems))
        outs[mode] = (out.v, losses.v)
    worst = 0.0
    d_in, d_out = sizes[0], sizes[-1]
    for t in range(tasks):
        p = params[(t * stride):(t * stride) + P]
        vt = v[(t * stride):(t * stride) + P]
        xt = x[t * n * d_in:(t + 1) * n * d_in]
        st = d_out if loss == 0 else 1
        yt = y[t * n * st:(t + 1) * n * st]
        fwd = [o for s in range(n) for o in ref_forward(sizes, act, p, xt[s * d_in:(s + 1) * d_in])]
        worst = max(worst, rel_err(outs[0][0][t * n * d_out:(t + 1) * n * d_out], fwd))
        f = lambda q: ref_loss(sizes, act, loss, q, xt, yt, n)
        worst = max(worst, abs(outs[1][1][t] - f(p)) / abs(f(p)))
        grad_check = fd_grad(f, p, 1e-6)
        worst = max(worst, rel_err(outs[1][0][t * P:(t + 1) * P], grad_check))
        worst = max(worst, rel_err(ref_grad(sizes, act, loss, p, xt, yt, n), grad_check))
        eps = 1e-5
        gp = ref_grad(sizes, act, loss, [a + eps * b for a, b in zip(p, vt)], xt, yt, n)
        gm = ref_grad(sizes, act, loss, [a - eps * b for a, b in zip(p, vt)], xt, yt, n)
        hv_fd = [(a - b) / (2 * eps) for a, b in zip(gp, gm)]
        worst = max(worst, rel_err(outs[2][0][t * P:(t + 1) * P], hv_fd))
    return worst


def main():
    failures = 0
    cases = []
    for act in range(4):
        for loss in range(2):
            cases.append(("meta", [3, 5, 4, 3], act, loss, 2, 3, 4, 2, True))
    cases += [
        ("meta", [1, 6, 6, 1], 0, 0, 2, 1, 2, 3, True),   # sinusoid-like, one support sample
        ("meta", [2, 4, 3], 1, 0, 1, 3, 3, 1, False),     # first order, k = 1
        ("meta", [4, 3], 3, 1, 2, 2, 5, 2, True),         # one layer, input wider than output
        ("meta", [9, 4, 3], 2, 1, 2, 3, 2, 2, True),      # input wider than every layer
        ("meta", [2, 70, 2], 1, 0, 1, 2, 2, 1, True),     # more outputs than threads per block
        ("ops", [3, 5, 4, 3], 2, 1, 2, 3, True),
        ("ops", [3, 5, 4, 2], 3, 0, 2, 1, False),
        ("ops", [2, 7, 3], 1, 0, 3, 2, True),
    ]
    for case in cases:
        kind, sizes = case[0], case[1]
        try:
            if kind == "meta":
                _, _, act, loss, tasks, ns, nq, steps, second = case
                err = check_meta(sizes, act, loss, tasks, ns, nq, steps, second)
            else:
                _, _, act, loss, tasks, n, broadcast = case
                err = check_ops(sizes, act, loss, tasks, n, broadcast)
            ok = err < 1e-5
            print(f"{'ok  ' if ok else 'FAIL'} {case}: worst relative error {err:.2e}")
        except (RaceError, IndexError) as e:
            ok = False
            print(f"FAIL {case}: {type(e).__name__}: {e}")
        failures += not ok
    print("all fused-kernel emulations match" if failures == 0 else f"{failures} case(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
