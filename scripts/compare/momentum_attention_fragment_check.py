#!/usr/bin/env python3
"""Checks the tensor-core fragment addressing of kernels/momentum_attention.cu without a GPU.

Emulates `ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16` and `mma.sync.aligned.m16n8k16`
with the fragment layouts of the PTX ISA, then runs the kernel's exact shared-memory address
formulas on small integer tiles and compares against plain matrix products:
  - forward_mma at its two tile shapes (64 queries × 64 keys at D = 64/128, × 32 keys at
    D = 256): S = Q Kᵀ (A from Q rows, B from K rows) and O = P V (A from the S accumulators,
    B from V by .trans);
  - backward_mma: dQ = dS K with dSᵀ stored [key][query] (A by .trans) and K by .trans;
  - backward_mma (D = 64, 64 keys × 32 queries) and backward_mma_wide (D = 256, 32 × 32), each
    emulated whole, warp by warp: Sᵀ = K Qᵀ and dPᵀ = V dOᵀ from the accumulators, Pᵀ and dSᵀ
    (here Sᵀ and dPᵀ themselves) to the A fragments of dV += Pᵀ dO and dK += dSᵀ Q (registers in
    backward_mma; staged [key][query] in shared memory and read back by ldmatrix in
    backward_mma_wide), dQ = dS K from the staged dSᵀ; the accumulators land in full matrices
    through the epilogue's (stage_fragments) and the dQ atomics' index formulas, so every
    element must be written, and written once.
Pure Python, no dependencies; prints OK or MISMATCH per part (exit status 1 on a mismatch).
This is a check of index math under the documented layouts, not a substitute for the GPU tests.
"""
import sys

import random
random.seed(1)

def ldmatrix_x4(smem, addrs, trans=False):
    # addrs[lane] = flat element index of the row start that lane provides
    regs = [[None]*4 for _ in range(32)]
    for i in range(4):
        rows = [[smem[addrs[8*i+j] + c] for c in range(8)] for j in range(8)]
        for l in range(32):
            if not trans:
                regs[l][i] = (rows[l//4][2*(l%4)], rows[l//4][2*(l%4)+1])
            else:
                regs[l][i] = (rows[2*(l%4)][l//4], rows[2*(l%4)+1][l//4])
    return regs

def mma(c, a, b0, b1):
    # c[lane] = [4 floats]; a[lane] = 4 pairs; b0[lane], b1[lane] = pairs
    A = [[0]*16 for _ in range(16)]; B = [[0]*8 for _ in range(16)]
    for l in range(32):
        g, t = l//4, l%4
        for e in range(2):
            A[g][2*t+e] = a[l][0][e]; A[g+8][2*t+e] = a[l][1][e]
            A[g][2*t+8+e] = a[l][2][e]; A[g+8][2*t+8+e] = a[l][3][e]
            B[2*t+e][g] = b0[l][e]; B[2*t+8+e][g] = b1[l][e]
    C = [[sum(A[i][k]*B[k][j] for k in range(16)) for j in range(8)] for i in range(16)]
    for l in range(32):
        g, t = l//4, l%4
        c[l][0] += C[g][2*t]; c[l][1] += C[g][2*t+1]; c[l][2] += C[g+8][2*t]; c[l][3] += C[g+8][2*t+1]

def rnd(n): return [random.randint(-3, 3) for _ in range(n)]

PAD = 8


def check_forward(D, BR, BC):
    """forward_mma's S = Q Kᵀ and O += P V for one 64-row query tile (P = S here)."""
    LD = D + PAD
    Q = [rnd(D) for _ in range(BR)]; K = [rnd(D) for _ in range(BC)]; V = [rnd(D) for _ in range(BC)]
    q_s = [0]*(BR*LD); k_s = [0]*(BC*LD); v_s = [0]*(BC*LD)
    for r in range(BR):
        for c in range(D): q_s[r*LD+c] = Q[r][c]
    for r in range(BC):
        for c in range(D): k_s[r*LD+c] = K[r][c]; v_s[r*LD+c] = V[r][c]
    S = [[sum(Q[i][d]*K[j][d] for d in range(D)) for j in range(BC)] for i in range(BR)]
    O = [[sum(S[i][j]*V[j][c] for j in range(BC)) for c in range(D)] for i in range(BR)]
    ok = True
    for warp in range(4):
        NT_S = BC//8
        s = [[[0.0]*4 for _ in range(32)] for _ in range(NT_S)]
        for kk in range(0, D, 16):
            a = ldmatrix_x4(q_s, [(warp*16 + l%16)*LD + kk + (l//16)*8 for l in range(32)])
            for n in range(0, NT_S, 2):
                b = ldmatrix_x4(k_s, [(n*8 + (l//16)*8 + l%8)*LD + kk + ((l//8)%2)*8 for l in range(32)])
                mma(s[n], a, [b[l][0] for l in range(32)], [b[l][1] for l in range(32)])
                mma(s[n+1], a, [b[l][2] for l in range(32)], [b[l][3] for l in range(32)])
        # check S = Q K^T
        for n in range(NT_S):
            for l in range(32):
                g, c4 = l//4, l%4
                for e in range(4):
                    row = warp*16 + g + 8*(e//2); col = n*8 + 2*c4 + e%2
                    if s[n][l][e] != S[row][col]: ok = False
        # P V with P = S (packed as A from the C fragments)
        NT_O = D//8
        o = [[[0.0]*4 for _ in range(32)] for _ in range(NT_O)]
        for m in range(BC//16):
            a = [[(s[2*m][l][0], s[2*m][l][1]), (s[2*m][l][2], s[2*m][l][3]),
                  (s[2*m+1][l][0], s[2*m+1][l][1]), (s[2*m+1][l][2], s[2*m+1][l][3])] for l in range(32)]
            for n in range(0, NT_O, 2):
                b = ldmatrix_x4(v_s, [(m*16 + ((l//8)%2)*8 + l%8)*LD + n*8 + (l//16)*8 for l in range(32)], trans=True)
                mma(o[n], a, [b[l][0] for l in range(32)], [b[l][1] for l in range(32)])
                mma(o[n+1], a, [b[l][2] for l in range(32)], [b[l][3] for l in range(32)])
        for n in range(NT_O):
            for l in range(32):
                g, c4 = l//4, l%4
                for e in range(4):
                    row = warp*16 + g + 8*(e//2); col = n*8 + 2*c4 + e%2
                    if o[n][l][e] != O[row][col]: ok = False
    print(f"forward S and PV fragments (D={D}, {BR} queries x {BC} keys):", "OK" if ok else "MISMATCH")
    return ok


# FwdTile: 64 query rows; 64 keys per tile at D = 64 and 128, 32 at D = 256.
forward_ok = all([check_forward(64, 64, 64), check_forward(256, 64, 32)])
D = 32

# Backward dQ = dS K with dS^T stored as ds_s[key][query] (LDS = BRb + PAD), BC keys = 64.
BRb, BCb, Db = 32, 64, 32
LDS = BRb + PAD; LDb = Db + PAD
DST = [rnd(BRb) for _ in range(BCb)]  # dS^T [key][query]
Kb = [rnd(Db) for _ in range(BCb)]
ds_s = [0]*(BCb*LDS); kb_s = [0]*(BCb*LDb)
for r in range(BCb):
    for c in range(BRb): ds_s[r*LDS+c] = DST[r][c]
    for c in range(Db): kb_s[r*LDb+c] = Kb[r][c]
ok = True
for warp in range(4):
    NT_Q = Db//16
    qb, cb = (warp%2)*16, (warp//2)*(Db//2)
    dq = [[[0.0]*4 for _ in range(32)] for _ in range(NT_Q)]
    for kk in range(0, BCb, 16):
        a = ldmatrix_x4(ds_s, [(kk + (l//16)*8 + l%8)*LDS + qb + ((l//8)%2)*8 for l in range(32)], trans=True)
        for n in range(0, NT_Q, 2):
            b = ldmatrix_x4(kb_s, [(kk + ((l//8)%2)*8 + l%8)*LDb + cb + n*8 + (l//16)*8 for l in range(32)], trans=True)
            mma(dq[n], a, [b[l][0] for l in range(32)], [b[l][1] for l in range(32)])
            mma(dq[n+1], a, [b[l][2] for l in range(32)], [b[l][3] for l in range(32)])
    for n in range(NT_Q):
        for l in range(32):
            g, c4 = l//4, l%4
            for h in range(2):
                for e in range(2):
                    qrow = qb + g + 8*h; col = cb + n*8 + 2*c4 + e
                    want = sum(DST[key][qrow]*Kb[key][col] for key in range(BCb))
                    if dq[n][l][2*h+e] != want: ok = False
print("backward dQ fragments:", "OK" if ok else "MISMATCH")
dq_ok = ok


# ---------------------------------------------------------------- whole backward tiles
def zeros_acc(nt):
    return [[[0] * 4 for _ in range(32)] for _ in range(nt)]

def tile_smem(M, rows, ld):
    """M ([rows][cols]) stored row-major with row stride ld, like the kernel's shared tiles."""
    sm = [0] * (rows * ld)
    for r in range(rows):
        for c in range(len(M[r])): sm[r * ld + c] = M[r][c]
    return sm

def a_from_acc(acc, m):
    """A fragment of k-step m from two n8 accumulator tiles (the kernel's pack2 pairs)."""
    return [[(acc[2*m][l][0], acc[2*m][l][1]), (acc[2*m][l][2], acc[2*m][l][3]),
             (acc[2*m+1][l][0], acc[2*m+1][l][1]), (acc[2*m+1][l][2], acc[2*m+1][l][3])] for l in range(32)]

def mma_pair(acc, n, a, b):
    mma(acc[n], a, [b[l][0] for l in range(32)], [b[l][1] for l in range(32)])
    mma(acc[n+1], a, [b[l][2] for l in range(32)], [b[l][3] for l in range(32)])

def stage(out, acc, row0, col0, counts):
    """stage_fragments: acc[n][l] → out[row0 + g + 8h][col0 + 8n + 2c4 + e]."""
    for n in range(len(acc)):
        for l in range(32):
            g, c4 = l // 4, l % 4
            for h in range(2):
                for e in range(2):
                    r, c = row0 + g + 8*h, col0 + n*8 + 2*c4 + e
                    out[r][c] += acc[n][l][2*h + e]; counts[r][c] += 1

def matmul(A, B):
    return [[sum(A[i][k] * B[k][j] for k in range(len(B))) for j in range(len(B[0]))] for i in range(len(A))]

def transpose(M):
    return [list(r) for r in zip(*M)]

def check_backward(name, D, BC, BR, wide):
    LD = D + PAD; LDS = BR + PAD
    K = [rnd(D) for _ in range(BC)]; V = [rnd(D) for _ in range(BC)]
    Q = [rnd(D) for _ in range(BR)]; G = [rnd(D) for _ in range(BR)]
    k_s, v_s, q_s, g_s = tile_smem(K, BC, LD), tile_smem(V, BC, LD), tile_smem(Q, BR, LD), tile_smem(G, BR, LD)
    ST = matmul(K, transpose(Q)); DPT = matmul(V, transpose(G))   # [key][query]
    want_dv, want_dk, want_dq = matmul(ST, G), matmul(DPT, Q), matmul(transpose(DPT), K)
    dv = [[0]*D for _ in range(BC)]; dk = [[0]*D for _ in range(BC)]; dq = [[0]*D for _ in range(BR)]
    cnt_v = [[0]*D for _ in range(BC)]; cnt_k = [[0]*D for _ in range(BC)]; cnt_q = [[0]*D for _ in range(BR)]
    ok = True
    p_s = [0] * (BC * LDS); ds_s = [0] * (BC * LDS)
    per_warp = []
    for warp in range(4):
        if wide:   # phase 1: 16 keys × 16 queries per warp
            kr, qc, nt_s = (warp % 2) * 16, (warp // 2) * 16, 2
        else:      # 16 keys × all BR queries per warp
            kr, qc, nt_s = warp * 16, 0, BR // 8
        s = zeros_acc(nt_s); dp = zeros_acc(nt_s)
        for kk in range(0, D, 16):
            a_k = ldmatrix_x4(k_s, [(kr + l % 16) * LD + kk + (l // 16) * 8 for l in range(32)])
            a_v = ldmatrix_x4(v_s, [(kr + l % 16) * LD + kk + (l // 16) * 8 for l in range(32)])
            for n in range(0, nt_s, 2):
                rows = [(qc + n * 8 + (l // 16) * 8 + l % 8) * LD + kk + ((l // 8) % 2) * 8 for l in range(32)]
                mma_pair(s, n, a_k, ldmatrix_x4(q_s, rows))
                mma_pair(dp, n, a_v, ldmatrix_x4(g_s, rows))
        for n in range(nt_s):            # accumulator positions: key kr + g + 8(e/2), query qc + 8n + 2c4 + e%2
            for l in range(32):
                g, c4 = l // 4, l % 4
                for e in range(4):
                    key, col = kr + g + 8 * (e // 2), qc + n * 8 + 2 * c4 + e % 2
                    if s[n][l][e] != ST[key][col] or dp[n][l][e] != DPT[key][col]: ok = False
                    # dSᵀ (and, wide, Pᵀ) stores: [key_row * LDS + qc + 8n + 2c4 + e]
                    ds_s[key * LDS + col] = dp[n][l][e]
                    if wide: p_s[key * LDS + col] = s[n][l][e]
        per_warp.append((s, dp))
    # (shared memory complete: the kernel's __syncthreads)
    for warp in range(4):
        s, dp = per_warp[warp]
        if wide:   # phase 2: keys kr, columns cb..cb+D/2, A from the staged Pᵀ / dSᵀ
            kr, cb, nt_d = (warp % 2) * 16, (warp // 2) * (D // 2), D // 16
        else:
            kr, cb, nt_d = warp * 16, 0, D // 8
        dv_acc, dk_acc = zeros_acc(nt_d), zeros_acc(nt_d)
        for m in range(BR // 16):
            if wide:
                addr = [(kr + l % 16) * LDS + m * 16 + (l // 16) * 8 for l in range(32)]
                a_p, a_ds = ldmatrix_x4(p_s, addr), ldmatrix_x4(ds_s, addr)
            else:
                a_p, a_ds = a_from_acc(s, m), a_from_acc(dp, m)
            for n in range(0, nt_d, 2):
                rows = [(m * 16 + ((l // 8) % 2) * 8 + l % 8) * LD + cb + n * 8 + (l // 16) * 8 for l in range(32)]
                mma_pair(dv_acc, n, a_p, ldmatrix_x4(g_s, rows, trans=True))
                mma_pair(dk_acc, n, a_ds, ldmatrix_x4(q_s, rows, trans=True))
        stage(dv, dv_acc, kr, cb, cnt_v); stage(dk, dk_acc, kr, cb, cnt_k)
        # phase 3: dQ = dS K, queries qb, columns from cb
        if wide:
            qb, cb, passes, nt_q = (warp % 2) * 16, (warp // 2) * (D // 2), 2, D // 32
        else:
            qb, cb, passes, nt_q = (warp % 2) * 16, (warp // 2) * (D // 2), 1, D // 16
        for pss in range(passes):
            c0 = cb + pss * nt_q * 8
            acc = zeros_acc(nt_q)
            for kk in range(0, BC, 16):
                a = ldmatrix_x4(ds_s, [(kk + (l // 16) * 8 + l % 8) * LDS + qb + ((l // 8) % 2) * 8 for l in range(32)], trans=True)
                for n in range(0, nt_q, 2):
                    b = ldmatrix_x4(k_s, [(kk + ((l // 8) % 2) * 8 + l % 8) * LD + c0 + n * 8 + (l // 16) * 8 for l in range(32)], trans=True)
                    mma_pair(acc, n, a, b)
            stage(dq, acc, qb, c0, cnt_q)   # the atomics' index formula is stage_fragments' one
    for got, want, cnt in [(dv, want_dv, cnt_v), (dk, want_dk, cnt_k), (dq, want_dq, cnt_q)]:
        if got != want or any(c != 1 for row in cnt for c in row): ok = False
    print(f"{name} (D={D}, {BC} keys x {BR} queries):", "OK" if ok else "MISMATCH")
    return ok

bwd_ok = check_backward("backward_mma", 64, 64, 32, wide=False)
wide_ok = check_backward("backward_mma_wide", 256, 32, 32, wide=True)
sys.exit(0 if ok and forward_ok and dq_ok and bwd_ok and wide_ok else 1)
