#!/usr/bin/env python3
"""Checks the tensor-core fragment addressing of `core_mma` in kernels/linear_attention.cu
without a GPU.

Emulates `ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16` and
`mma.sync.aligned.m16n8k16.row.col` with the fragment layouts of the PTX ISA (A: a0..a7 over
rows g, g+8 and columns 2t.., 2t+8..; B: b0..b3 over rows 2t.., 2t+8.. and column g; C/D: c0..c3
over rows g, g+8 and columns 2t, 2t+1, with g = lane/4, t = lane%4), loads the operands with the
address formulas of `frag_a`, `frag_a_trans`, `frag_b_pair` and `frag_b_pair_trans` in
kernels/tensor_core.cuh (padded strides ldq = dkp + 8 and ldt = 64 + 8), runs one chunk of the
kernel's three products with its warp tiling on small integer tiles, and compares against plain
matrix products, for both chunk sizes C (64 rows for Dk ≤ 128, 32 above):
  O = φ(Q)·S, A = mask(φ(Q) φ(K)ᵀ)   (one pass over the key dimension; 8 warps, each a
                                     16×(C/2) block: rows 16·(w % (C/16)), columns
                                     (C/2)·(w / (C/16)); with C = 32 the warps past column C
                                     have no scores)
  O += A·V                           (same tiling over the 64 columns of the v tile)
  S += φ(K)ᵀ V                       (16×32 units of S distributed over the warps)
for key widths that are and are not multiples of 16 and for a full and a ragged chunk; and that
the swizzled f32 state and output tiles (`sf_index`, `os_index`) serve the fragment-layout
float2 accesses without bank conflicts. Pure Python, no dependencies; exit status 1 on a mismatch. A check of index math under the
documented layouts, not a substitute for the GPU tests.
"""
import random
import sys

random.seed(3)
TILE, PAD = 64, 8


def ldmatrix_x4(smem, addrs, trans=False):
    """Per lane, 4 registers of 2 halves; addrs[lane] = flat index of the row lane provides."""
    regs = [[None] * 4 for _ in range(32)]
    for i in range(4):
        rows = [[smem[addrs[8 * i + j] + c] for c in range(8)] for j in range(8)]
        for l in range(32):
            if trans:
                regs[l][i] = (rows[2 * (l % 4)][l // 4], rows[2 * (l % 4) + 1][l // 4])
            else:
                regs[l][i] = (rows[l // 4][2 * (l % 4)], rows[l // 4][2 * (l % 4) + 1])
    return regs


def mma(d, a, b0, b1):
    """d[lane] (4 accumulators) += A·B for one warp; a[lane] = 4 pairs, b0[lane], b1[lane] pairs."""
    A = [[None] * 16 for _ in range(16)]
    B = [[None] * 8 for _ in range(16)]
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for e in range(2):
            A[g][2 * t + e] = a[lane][0][e]
            A[g + 8][2 * t + e] = a[lane][1][e]
            A[g][2 * t + 8 + e] = a[lane][2][e]
            A[g + 8][2 * t + 8 + e] = a[lane][3][e]
            B[2 * t + e][g] = b0[lane][e]
            B[2 * t + 8 + e][g] = b1[lane][e]
    prod = [[sum(A[i][k] * B[k][j] for k in range(16)) for j in range(8)] for i in range(16)]
    for lane in range(32):
        g, t = lane // 4, lane % 4
        d[lane][0] += prod[g][2 * t]
        d[lane][1] += prod[g][2 * t + 1]
        d[lane][2] += prod[g + 8][2 * t]
        d[lane][3] += prod[g + 8][2 * t + 1]


# kernels/tensor_core.cuh's fragment loads: the address each lane gives ldmatrix.
def frag_a(m, ld, r0, k0):
    return ldmatrix_x4(m, [(r0 + l % 16) * ld + k0 + (l // 16) * 8 for l in range(32)])


def frag_a_trans(m, ld, r0, k0):
    return ldmatrix_x4(m, [(k0 + (l // 16) * 8 + l % 8) * ld + r0 + ((l // 8) % 2) * 8 for l in range(32)], True)


def frag_b_pair(m, ld, k0, n0):
    return ldmatrix_x4(m, [(n0 + (l // 16) * 8 + l % 8) * ld + k0 + ((l // 8) % 2) * 8 for l in range(32)])


def frag_b_pair_trans(m, ld, k0, n0):
    return ldmatrix_x4(m, [(k0 + ((l // 8) % 2) * 8 + l % 8) * ld + n0 + (l // 16) * 8 for l in range(32)], True)


def mma_pair(d, nt, a, b):
    """The kernel's two mma per B pair: tiles nt and nt + 1."""
    mma(d[nt], a, [r[0] for r in b], [r[1] for r in b])
    mma(d[nt + 1], a, [r[2] for r in b], [r[3] for r in b])


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
    # O = Q·S and the scores QKᵀ in one pass over the key dimension, then O += mask(QKᵀ)·V;
    # 8 warps of 16×(C/2).
    acc_o, warps = {}, []
    for warp in range(8):
        wr, wc = (warp % row_groups) * 16, (warp // row_groups) * warp_cols
        sc = [[[0] * 4 for _ in range(32)] for _ in range(nts)]
        o = [[[0] * 4 for _ in range(32)] for _ in range(nts)]
        for k0 in range(0, dkp, 16):
            a = frag_a(Qh, ldq, wr, k0)
            for np in range(nts // 2):
                if wc < C:
                    mma_pair(sc, 2 * np, a, frag_b_pair(Kh, ldq, k0, wc + 16 * np))
                mma_pair(o, 2 * np, a, frag_b_pair_trans(Sh, ldt, k0, wc + 16 * np))
        if wc < C:
            for nt in range(nts):
                for l in range(32):
                    g, t = l // 4, l % 4
                    for e in range(4):
                        i, s = wr + g + (8 if e >= 2 else 0), wc + 8 * nt + 2 * t + (e & 1)
                        Ah[i * ldt + s] = sc[nt][l][e] if s <= i else 0
        warps.append((wr, wc, o))
    for wr, wc, o in warps:  # after the barrier: every warp's scores are in Ah
        for k0 in range(0, C, 16):
            a = frag_a(Ah, ldt, wr, k0)
            for np in range(nts // 2):
                mma_pair(o, 2 * np, a, frag_b_pair_trans(Vh, ldt, k0, wc + 16 * np))
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
    # S += φ(K)ᵀV: (dkp/16)·2 units of 16×32 over the warps.
    Sf = [row[:] for row in S]
    units = (dkp // 16) * (TILE // 32)
    for warp in range(8):
        for u in range(warp, units, 8):
            r0, n0 = (u // (TILE // 32)) * 16, (u % (TILE // 32)) * 32
            d = [[[Sf[r0 + l // 4 + (8 if e >= 2 else 0)][n0 + 8 * nt + 2 * (l % 4) + (e & 1)] for e in range(4)]
                  for l in range(32)] for nt in range(4)]
            for k0 in range(0, C, 16):
                a = frag_a_trans(Kh, ldq, r0, k0)
                for np in range(2):
                    mma_pair(d, 2 * np, a, frag_b_pair_trans(Vh, ldt, k0, n0 + 16 * np))
            for nt in range(4):
                for l in range(32):
                    for e in range(4):
                        Sf[r0 + l // 4 + (8 if e >= 2 else 0)][n0 + 8 * nt + 2 * (l % 4) + (e & 1)] = d[nt][l][e]
    for c in range(dkp):
        for j in range(TILE):
            if Sf[c][j] != S[c][j] + sum(K[i][c] * V[i][j] for i in range(C)):
                ok = False
    if len(acc_o) != C * TILE:
        ok = False  # some output element no warp wrote
    print(f"C={C} dk={dk:3} rows={n:2} v-tile width={w:2}: {'OK' if ok else 'MISMATCH'}")
    return ok


def sf_index(c, j):
    """kernels/linear_attention.cu's swizzled f32 tiles, os_index = sf_index (rows of TILE floats)."""
    return c * TILE + (j ^ ((c & 3) << 3))


def state_tile_banks():
    """The state update's float2 accesses to the f32 state tile and the output's float2 stores
    (lane (g, t): rows r0 + g (+ 8), columns n0 + 8·nt + 2t) must be conflict-free: a 64-bit access is served per half-warp, 16
    lanes × 2 words on 32 distinct banks. Also the row-wise copies (32 consecutive columns of a
    row per warp) and that the swizzle is a permutation of each row."""
    ok = True
    for c in range(64):
        ok &= sorted(sf_index(c, j) for j in range(TILE)) == list(range(c * TILE, (c + 1) * TILE))
        for j0 in (0, 32):
            ok &= len({sf_index(c, j0 + j) % 32 for j in range(32)}) == 32
    for r0 in range(0, 256, 16):
        for n0 in (0, 32):
            for nt in range(4):
                for half in (0, 1):
                    for phase in (range(16), range(16, 32)):
                        banks = set()
                        for lane in phase:
                            g, t = lane // 4, lane % 4
                            w = sf_index(r0 + g + 8 * half, n0 + 8 * nt + 2 * t)
                            banks |= {w % 32, (w + 1) % 32}
                        ok &= len(banks) == 32
    print(f"state/output tile swizzle: {'conflict-free' if ok else 'BANK CONFLICTS'}")
    return ok


cases = [(64, 6, 64, 64), (64, 40, 37, 9), (64, 16, 1, 64), (64, 128, 64, 33),
         (32, 136, 32, 64), (32, 250, 17, 40), (32, 256, 32, 64)]
results = [check(*case) for case in cases] + [state_tile_banks()]
sys.exit(0 if all(results) else 1)
