#!/usr/bin/env python3
"""Checks the tensor-core fragment addressing of kernels/momentum_attention.cu without a GPU.

Emulates `ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16` and `mma.sync.aligned.m16n8k16`
with the fragment layouts of the PTX ISA, then runs the kernel's exact shared-memory address
formulas on small integer tiles and compares against plain matrix products:
  - forward_mma: S = Q Kᵀ (A from Q rows, B from K rows) and O = P V (A from the S
    accumulators, B from V by .trans) — the same patterns as the backward's Sᵀ = K Qᵀ,
    dPᵀ = V dOᵀ, dV += Pᵀ dO and dK += dSᵀ Q;
  - backward_mma: dQ = dS K with dSᵀ stored [key][query] (A by .trans) and K by .trans.
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

D, BR, BC, PAD = 32, 64, 32, 8   # small D keeps it fast; formulas are D-generic
LD = D + PAD
Q = [rnd(D) for _ in range(BR)]; K = [rnd(D) for _ in range(BC)]; V = [rnd(D) for _ in range(BC)]
q_s = [0]*(BR*LD); k_s = [0]*(BC*LD); v_s = [0]*(BC*LD)
for r in range(BR):
    for c in range(D): q_s[r*LD+c] = Q[r][c]
for r in range(BC):
    for c in range(D): k_s[r*LD+c] = K[r][c]; v_s[r*LD+c] = V[r][c]

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
                want = sum(Q[row][d]*K[col][d] for d in range(D))
                if s[n][l][e] != want: ok = False
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
                S_row = [sum(Q[row][d]*K[j][d] for d in range(D)) for j in range(BC)]
                want = sum(S_row[j]*V[j][col] for j in range(BC))
                if o[n][l][e] != want: ok = False
print("forward S and PV fragments:", "OK" if ok else "MISMATCH")
forward_ok = ok

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
sys.exit(0 if ok and forward_ok else 1)
