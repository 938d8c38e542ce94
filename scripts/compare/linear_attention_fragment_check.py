#!/usr/bin/env python3
"""Checks the tensor-core fragment addressing of `core_mma` in kernels/linear_attention.cu
without a GPU.

Emulates `mma.sync.aligned.m16n8k16.row.col` with the fragment layouts of the PTX ISA (A: a0..a7
over rows g, g+8 and columns 2t.., 2t+8..; B: b0..b3 over rows 2t.., 2t+8.. and column g; C/D:
c0..c3 over rows g, g+8 and columns 2t, 2t+1, with g = lane/4, t = lane%4), packs the operands
with the kernel's `frag_a_rowmajor`, `frag_a_colmajor`, `frag_b_nmajor` and `frag_b_kmajor`
(the same shared-memory index formulas, padded strides ldq = dkp + 8 and ldt = 64 + 8), runs
one chunk of the kernel's three products with its warp tiling on small integer tiles, and
compares against plain matrix products, for both chunk sizes C (64 rows for Dk ≤ 128, 32 above):
  A = mask(φ(Q) φ(K)ᵀ)        (8 warps, each a 16×(C/2) block: rows 16·(w % (C/16)), columns
                               (C/2)·(w / (C/16)); with C = 32 the warps past column C idle)
  O = φ(Q)·S + A·V            (same tiling over the 64 columns of the v tile)
  S += φ(K)ᵀ V                (16×8 tiles distributed over the warps)
for key widths that are and are not multiples of 16 and for a full and a ragged chunk.
Pure Python, no dependencies; exit status 1 on a mismatch. A check of index math under the
documented layouts, not a substitute for the GPU tests.
"""
import random
import sys

random.seed(3)
TILE, PAD = 64, 8


def mma(d, a, b):
    """d[lane] (4 accumulators) += A·B for one warp; a[lane] = 4 packed pairs, b[lane] = 2."""
    A = [[None] * 16 for _ in range(16)]
    B = [[None] * 8 for _ in range(16)]
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for e in range(2):
            A[g][2 * t + e] = a[lane][0][e]
            A[g + 8][2 * t + e] = a[lane][1][e]
            A[g][2 * t + 8 + e] = a[lane][2][e]
            A[g + 8][2 * t + 8 + e] = a[lane][3][e]
            B[2 * t + e][g] = b[lane][0][e]
            B[2 * t + 8 + e][g] = b[lane][1][e]
    prod = [[sum(A[i][k] * B[k][j] for k in range(16)) for j in range(8)] for i in range(16)]
    for lane in range(32):
        g, t = lane // 4, lane % 4
        d[lane][0] += prod[g][2 * t]
        d[lane][1] += prod[g][2 * t + 1]
        d[lane][2] += prod[g + 8][2 * t]
        d[lane][3] += prod[g + 8][2 * t + 1]


# The kernel's fragment gathers; pack2(m, lo, hi) is the pair (m[lo], m[hi]).
def frag_a_rowmajor(m, ld, r0, k0, g, t):
    r, k = r0 + g, k0 + 2 * t
    return [(m[r * ld + k], m[r * ld + k + 1]), (m[(r + 8) * ld + k], m[(r + 8) * ld + k + 1]),
            (m[r * ld + k + 8], m[r * ld + k + 9]), (m[(r + 8) * ld + k + 8], m[(r + 8) * ld + k + 9])]


def frag_a_colmajor(m, ld, r0, k0, g, t):
    r, k = r0 + g, k0 + 2 * t
    return [(m[k * ld + r], m[(k + 1) * ld + r]), (m[k * ld + r + 8], m[(k + 1) * ld + r + 8]),
            (m[(k + 8) * ld + r], m[(k + 9) * ld + r]), (m[(k + 8) * ld + r + 8], m[(k + 9) * ld + r + 8])]


def frag_b_nmajor(m, ld, k0, n0, g, t):
    n, k = n0 + g, k0 + 2 * t
    return [(m[n * ld + k], m[n * ld + k + 1]), (m[n * ld + k + 8], m[n * ld + k + 9])]


def frag_b_kmajor(m, ld, k0, n0, g, t):
    n, k = n0 + g, k0 + 2 * t
    return [(m[k * ld + n], m[(k + 1) * ld + n]), (m[(k + 8) * ld + n], m[(k + 9) * ld + n])]


def check(C, dk, n, w):
    """One chunk of n ≤ C rows, key width dk, a v tile of w ≤ 64 columns."""
    row_groups = C // 16
    warp_cols = TILE * row_groups // 8
    nts = warp_cols // 8
    dkp = (dk + 15) // 16 * 16
    ldq, ldt = dkp + PAD, TILE + PAD
    rnd = lambda: random.randint(-3, 3)
    Q = [[rnd() if i < n and c < dk else 0 for c in range(dkp)] for i in range(C)]
    K = [[rnd() if i < n and c < dk else 0 for c in range(dkp)] for i in range(C)]
    V = [[rnd() if i < n and j < w else 0 for j in range(TILE)] for i in range(C)]
    S = [[rnd() if c < dk and j < w else 0 for j in range(TILE)] for c in range(dkp)]
    # Shared memory as the kernel stages it (padding filled with junk that must never be read
    # into a product: it would show up as a mismatch).
    Qh, Kh = [999] * (C * ldq), [999] * (C * ldq)
    Vh, Sh, Ah = [999] * (C * ldt), [999] * (dkp * ldt), [999] * (C * ldt)
    for i in range(C):
        for c in range(dkp):
            Qh[i * ldq + c], Kh[i * ldq + c] = Q[i][c], K[i][c]
        for j in range(TILE):
            Vh[i * ldt + j] = V[i][j]
    for c in range(dkp):
        for j in range(TILE):
            Sh[c * ldt + j] = S[c][j]

    ok = True
    # A = mask(QKᵀ) and O = Q·S + A·V, 8 warps of 16×(C/2).
    acc_o = {}
    for warp in range(8):
        wr, wc = (warp % row_groups) * 16, (warp // row_groups) * warp_cols
        if wc >= C:
            continue
        d = [[[0] * 4 for _ in range(32)] for _ in range(nts)]
        for k0 in range(0, dkp, 16):
            a = [frag_a_rowmajor(Qh, ldq, wr, k0, l // 4, l % 4) for l in range(32)]
            for nt in range(nts):
                b = [frag_b_nmajor(Kh, ldq, k0, wc + 8 * nt, l // 4, l % 4) for l in range(32)]
                mma(d[nt], a, b)
        for nt in range(nts):
            for l in range(32):
                g, t = l // 4, l % 4
                for e in range(4):
                    i, s = wr + g + (8 if e >= 2 else 0), wc + 8 * nt + 2 * t + (e & 1)
                    Ah[i * ldt + s] = d[nt][l][e] if s <= i else 0
    for warp in range(8):
        wr, wc = (warp % row_groups) * 16, (warp // row_groups) * warp_cols
        o = [[[0] * 4 for _ in range(32)] for _ in range(nts)]
        for k0 in range(0, dkp, 16):
            a = [frag_a_rowmajor(Qh, ldq, wr, k0, l // 4, l % 4) for l in range(32)]
            for nt in range(nts):
                b = [frag_b_kmajor(Sh, ldt, k0, wc + 8 * nt, l // 4, l % 4) for l in range(32)]
                mma(o[nt], a, b)
        for k0 in range(0, C, 16):
            a = [frag_a_rowmajor(Ah, ldt, wr, k0, l // 4, l % 4) for l in range(32)]
            for nt in range(nts):
                b = [frag_b_kmajor(Vh, ldt, k0, wc + 8 * nt, l // 4, l % 4) for l in range(32)]
                mma(o[nt], a, b)
        for nt in range(nts):
            for l in range(32):
                g, t = l // 4, l % 4
                for e in range(4):
                    i, j = wr + g + (8 if e >= 2 else 0), wc + 8 * nt + 2 * t + (e & 1)
                    acc_o[(i, j)] = o[nt][l][e]
    for i in range(C):
        for j in range(TILE):
            a_row = [sum(Q[i][c] * K[s][c] for c in range(dkp)) if s <= i else 0 for s in range(C)]
            want = sum(Q[i][c] * S[c][j] for c in range(dkp)) + sum(a_row[s] * V[s][j] for s in range(C))
            if acc_o.get((i, j)) != want:
                ok = False
    # S += φ(K)ᵀV: (dkp/16)·(64/8) tiles over the warps.
    Sf = [row[:] for row in S]
    tiles = (dkp // 16) * (TILE // 8)
    for warp in range(8):
        for tt in range(warp, tiles, 8):
            r0, n0 = (tt // (TILE // 8)) * 16, (tt % (TILE // 8)) * 8
            d = [[Sf[r0 + l // 4][n0 + 2 * (l % 4)], Sf[r0 + l // 4][n0 + 2 * (l % 4) + 1],
                  Sf[r0 + l // 4 + 8][n0 + 2 * (l % 4)], Sf[r0 + l // 4 + 8][n0 + 2 * (l % 4) + 1]]
                 for l in range(32)]
            for k0 in range(0, C, 16):
                a = [frag_a_colmajor(Kh, ldq, r0, k0, l // 4, l % 4) for l in range(32)]
                b = [frag_b_kmajor(Vh, ldt, k0, n0, l // 4, l % 4) for l in range(32)]
                mma(d, a, b)
            for l in range(32):
                g, t = l // 4, l % 4
                Sf[r0 + g][n0 + 2 * t], Sf[r0 + g][n0 + 2 * t + 1] = d[l][0], d[l][1]
                Sf[r0 + g + 8][n0 + 2 * t], Sf[r0 + g + 8][n0 + 2 * t + 1] = d[l][2], d[l][3]
    for c in range(dkp):
        for j in range(TILE):
            if Sf[c][j] != S[c][j] + sum(K[i][c] * V[i][j] for i in range(C)):
                ok = False
    if len(acc_o) != C * TILE:
        ok = False  # some output element no warp wrote
    print(f"C={C} dk={dk:3} rows={n:2} v-tile width={w:2}: {'OK' if ok else 'MISMATCH'}")
    return ok


cases = [(64, 6, 64, 64), (64, 40, 37, 9), (64, 16, 1, 64), (64, 128, 64, 33),
         (32, 136, 32, 64), (32, 250, 17, 40), (32, 256, 32, 64)]
results = [check(*case) for case in cases]
sys.exit(0 if all(results) else 1)
