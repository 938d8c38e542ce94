#!/usr/bin/env python3
"""Checks the index math of kernels/kmeans.cu's tensor-core assignment (tc::assign_l2) without a GPU.

Runs the kernel's exact formulas, block by block and lane by lane, on small integer inputs:
  - the loader: 16-byte chunks q = tid, tid + 256 → shared row q / 4, dims (q % 4)·8 of the
    k-slice, zeros outside x / the centroids (cp.async with src-size 0, or the register path);
    with x resident (D ≤ 128, assign_l2_mma_xres_*), x's whole tile once: q = tid + 256·s,
    s < 8 → row q / 16, dims (q % 16)·8, rows of 136 halfs, read at the step's k-slice offset;
  - the fragments: ldmatrix.x4 (non-transposed) at the kernel's per-lane addresses
    (a_row/a_col, b_row/b_col), fed to mma.m16n8k16 with the PTX ISA's A/B/C layouts;
  - the epilogue: column/row of every accumulator, ‖c‖² − 2x·c, padded centroids skipped,
    the running (value, index) minimum per slot, the xor-shuffle fold over the quad, the
    red_v/red_i rows, the fold over the 4 column warps, and ‖x‖² from the loaders' chunks.
The result (label, distance) must equal a brute-force argmin of ‖x − c‖² with ties to the lowest
index, exactly (integers make every sum exact). Cases cover N and K off the 128 tiles, several
centroid tiles, D off the 32-wide k-slice, D % 8 ≠ 0, and many exact ties (duplicated centroids
in different warps and tiles).
Pure Python, no dependencies; prints OK or MISMATCH per case (exit status 1 on a mismatch).
Also runs the SIMT kernel's formulas (simt::assign: loader row tid/2 and dims (tid&1)·4, the
transposed As/Bs tiles, rows ty·4 + i / 64 + ty·4 + i − 4 and columns alike, the epilogue and the
16-lane fold) for squared L2 and mean L1, the counting sort (tile histogram, the segmented
scan over tiles, the block scan of offsets, the stable scatter with match_any ranks) against a
stable sort, and the chunk partition of the two-stage segmented means (scan_chunks /
cluster_of_chunk / segment_partials' row range): every sorted row of every cluster is summed by
exactly one chunk of that cluster, chunks stay within the host's grid bound, in chunk order.
A check of index math under the documented layouts, not a substitute for the GPU tests.
"""
import random
import sys

BM, BN, BK, THREADS, LDS = 128, 128, 32, 256, 40
DMAX_RESIDENT, LDS_RESIDENT = 128, 136
INF = float("inf")
NONE = 0xFFFFFFFF


def ldmatrix_x4(smem, addrs):
    """Lane l gets, of matrix i, (row l // 4, columns 2(l % 4), +1); addrs[l] = row start of
    row l % 8 of matrix l // 8 (flat element index)."""
    regs = [[None] * 4 for _ in range(32)]
    for i in range(4):
        rows = [[smem[addrs[8 * i + j] + col] for col in range(8)] for j in range(8)]
        for l in range(32):
            regs[l][i] = (rows[l // 4][2 * (l % 4)], rows[l // 4][2 * (l % 4) + 1])
    return regs


def mma(c, a, b0, b1):
    """c[lane] += A·B with the m16n8k16 fragment layouts (A row-major, B column-major)."""
    A = [[0] * 16 for _ in range(16)]
    B = [[0] * 8 for _ in range(16)]
    for l in range(32):
        g, t = l // 4, l % 4
        for e in range(2):
            A[g][2 * t + e] = a[l][0][e]
            A[g + 8][2 * t + e] = a[l][1][e]
            A[g][2 * t + 8 + e] = a[l][2][e]
            A[g + 8][2 * t + 8 + e] = a[l][3][e]
            B[2 * t + e][g] = b0[l][e]
            B[2 * t + 8 + e][g] = b1[l][e]
    C = [[sum(A[i][q] * B[q][j] for q in range(16)) for j in range(8)] for i in range(16)]
    for l in range(32):
        g, t = l // 4, l % 4
        c[l][0] += C[g][2 * t]
        c[l][1] += C[g][2 * t + 1]
        c[l][2] += C[g + 8][2 * t]
        c[l][3] += C[g + 8][2 * t + 1]


def better_min(v, i, bv, bi):
    return v < bv or (v == bv and i < bi)


def load_chunk(smem, base, m, rows, d, r, kk):
    """8 elements of row r from dim kk into smem[base..base+8], zeros outside the matrix."""
    for e in range(8):
        smem[base + e] = m[r][kk + e] if (r < rows and kk + e < d) else 0


def run_block(x, c, n, k, d, block, labels, dist, resident):
    k_steps = (d + BK - 1) // BK
    c_tiles = (k + BN - 1) // BN
    steps = k_steps * c_tiles
    row0 = block * BM
    As = [None] * (BM * LDS_RESIDENT if resident else 2 * BM * LDS)
    Bs = [None] * (2 * BN * LDS)
    c_norm = [sum(v * v for v in row) for row in c]

    def ld_row(tid, s):
        return (tid >> 2) if s == 0 else ((tid + THREADS) >> 2)

    def ld_col(tid):
        return (tid & 3) * 8

    def issue(step, buf):
        ct, k0 = step // k_steps, (step % k_steps) * BK
        for tid in range(THREADS):
            for s in range(2):
                r, col = ld_row(tid, s), ld_col(tid)
                if not resident:
                    load_chunk(As, (buf * BM + r) * LDS + col, x, n, d, row0 + r, k0 + col)
                load_chunk(Bs, (buf * BN + r) * LDS + col, c, k, d, ct * BN + r, k0 + col)

    # Per thread state.
    best_v = [[INF] * 8 for _ in range(THREADS)]
    best_i = [[NONE] * 8 for _ in range(THREADS)]
    xn_part = [[0, 0] for _ in range(THREADS)]
    acc = [[[[0] * 4 for _ in range(32)] for _ in range(16)] for _ in range(8)]  # [warp][mt*4+nt][lane]

    if resident:  # x's whole tile, once: chunk q = tid + 256 s → row q // 16, dims (q % 16)·8
        for tid in range(THREADS):
            for s in range(8):
                q = tid + s * THREADS
                r, col = q >> 4, (q & 15) * 8
                load_chunk(As, r * LDS_RESIDENT + col, x, n, d, row0 + r, col)
    issue(0, 0)
    for step in range(steps):
        buf = step & 1
        a_base = (step % k_steps) * BK if resident else buf * BM * LDS
        a_ld = LDS_RESIDENT if resident else LDS
        # (cp.async wait + barrier)
        if step + 1 < steps:
            issue(step + 1, buf ^ 1)
            # The copy into buf ^ 1 must not touch buf: check the two halves are disjoint by
            # construction (buffers are separate index ranges).
        if not resident and step < k_steps:
            for tid in range(THREADS):
                for s in range(2):
                    base = a_base + ld_row(tid, s) * a_ld + ld_col(tid)
                    xn_part[tid][s] += sum(v * v for v in As[base:base + 8])
        for warp in range(8):
            warp_m, warp_n = warp >> 2, warp & 3
            for ks in (0, 16):
                a = []
                for mt in range(4):
                    addrs = []
                    for lane in range(32):
                        a_row = warp_m * 64 + (lane & 15)
                        a_col = (lane >> 4) * 8
                        addrs.append(a_base + (a_row + mt * 16) * a_ld + ks + a_col)
                    a.append(ldmatrix_x4(As, addrs))
                b = [None] * 4
                for p in range(2):
                    addrs = []
                    for lane in range(32):
                        b_row = warp_n * 32 + (lane >> 4) * 8 + (lane & 7)
                        b_col = ((lane >> 3) & 1) * 8
                        addrs.append((buf * BN + b_row + p * 16) * LDS + ks + b_col)
                    r = ldmatrix_x4(Bs, addrs)
                    b[2 * p] = ([r[l][0] for l in range(32)], [r[l][1] for l in range(32)])
                    b[2 * p + 1] = ([r[l][2] for l in range(32)], [r[l][3] for l in range(32)])
                for mt in range(4):
                    for nt in range(4):
                        mma(acc[warp][mt * 4 + nt], a[mt], b[nt][0], b[nt][1])
        if step % k_steps == k_steps - 1:
            c0 = (step // k_steps) * BN
            for warp in range(8):
                warp_n = warp & 3
                for lane in range(32):
                    tid = warp * 32 + lane
                    tig = lane & 3
                    for nt in range(4):
                        for e in range(2):
                            col = c0 + warp_n * 32 + nt * 8 + tig * 2 + e
                            if col >= k:
                                continue
                            cn = c_norm[col]
                            for mt in range(4):
                                for h in range(2):
                                    v = cn - 2 * acc[warp][mt * 4 + nt][lane][h * 2 + e]
                                    slot = mt * 2 + h
                                    if better_min(v, col, best_v[tid][slot], best_i[tid][slot]):
                                        best_v[tid][slot], best_i[tid][slot] = v, col
                acc[warp] = [[[0] * 4 for _ in range(32)] for _ in range(16)]

    x_norm = [None] * BM
    if resident:  # row tid from the resident tile, dims below k_steps·BK
        for tid in range(BM):
            x_norm[tid] = sum(v * v for v in As[tid * LDS_RESIDENT:tid * LDS_RESIDENT + k_steps * BK])
    # ‖x‖² over the quads of loader threads (xor 1, then xor 2).
    for warp in range(8 if not resident else 0):
        lanes = [warp * 32 + l for l in range(32)]
        for s in range(2):
            v = {t: xn_part[t][s] for t in lanes}
            v = {t: v[t] + v[warp * 32 + ((t - warp * 32) ^ 1)] for t in lanes}
            v = {t: v[t] + v[warp * 32 + ((t - warp * 32) ^ 2)] for t in lanes}
            for t in lanes:
                if (t & 3) == 0:
                    x_norm[ld_row(t, s)] = v[t]
    # Fold over the quad (shfl_argmin, lanes = 4), then red_v/red_i.
    red_v = [[None] * BM for _ in range(4)]
    red_i = [[None] * BM for _ in range(4)]
    for warp in range(8):
        warp_m, warp_n = warp >> 2, warp & 3
        for slot in range(8):
            bv = {l: best_v[warp * 32 + l][slot] for l in range(32)}
            bi = {l: best_i[warp * 32 + l][slot] for l in range(32)}
            off = 1
            while off < 4:
                nv, ni = dict(bv), dict(bi)
                for l in range(32):
                    ov, oi = bv[l ^ off], bi[l ^ off]
                    if better_min(ov, oi, bv[l], bi[l]):
                        nv[l], ni[l] = ov, oi
                bv, bi = nv, ni
                off <<= 1
            for l in range(32):
                g, tig = l >> 2, l & 3
                if tig == 0:
                    r = warp_m * 64 + (slot >> 1) * 16 + (slot & 1) * 8 + g
                    red_v[warp_n][r], red_i[warp_n][r] = bv[l], bi[l]
    for tid in range(BM):
        if row0 + tid >= n:
            continue
        v, i = red_v[0][tid], red_i[0][tid]
        for w in range(1, 4):
            if better_min(red_v[w][tid], red_i[w][tid], v, i):
                v, i = red_v[w][tid], red_i[w][tid]
        labels[row0 + tid] = i
        dist[row0 + tid] = max(x_norm[tid] + v, 0)


def check(name, n, k, d, seed, dup, resident):
    assert not resident or d <= DMAX_RESIDENT
    rng = random.Random(seed)
    x = [[rng.randint(-2, 2) for _ in range(d)] for _ in range(n)]
    c = [[rng.randint(-2, 2) for _ in range(d)] for _ in range(k)]
    for j in dup:  # duplicates of centroid dup[0] in other warps / tiles
        c[j] = list(c[dup[0]])
    for i in range(0, n, 7):  # some rows sit exactly on the duplicated centroid
        x[i] = list(c[dup[0]])
    labels, dist = [None] * n, [None] * n
    for block in range((n + BM - 1) // BM):
        run_block(x, c, n, k, d, block, labels, dist, resident)
    ok = True
    for i in range(n):
        all_d = [sum((x[i][e] - c[j][e]) ** 2 for e in range(d)) for j in range(k)]
        want = min(range(k), key=lambda j: (all_d[j], j))
        if labels[i] != want or dist[i] != all_d[want]:
            ok = False
            print(f"  row {i}: got ({labels[i]}, {dist[i]}), want ({want}, {all_d[want]})")
            break
    print(f"{name} [{'resident x' if resident else 'streamed x'}]: {'OK' if ok else 'MISMATCH'}")
    return ok


SIMT_BM, SIMT_BN, SIMT_BK, SIMT_PAD = 128, 128, 8, 4


def simt_block(x, c, n, k, d, block, labels, dist, l1):
    """simt::assign for one block, thread by thread (shared tiles as [buf][kk][row])."""
    k_steps = (d + SIMT_BK - 1) // SIMT_BK
    steps = k_steps * ((k + SIMT_BN - 1) // SIMT_BN)
    row0 = block * SIMT_BM
    c_norm = [sum(v * v for v in row) for row in c]
    W = SIMT_BM + SIMT_PAD
    As = [[[None] * W for _ in range(SIMT_BK)] for _ in range(2)]
    Bs = [[[None] * W for _ in range(SIMT_BK)] for _ in range(2)]

    def load4(m, rows, r, kk):
        return [m[r][kk + e] if (r < rows and kk + e < d) else 0 for e in range(4)]

    best_v = [[INF] * 8 for _ in range(256)]
    best_i = [[NONE] * 8 for _ in range(256)]
    xn_part = [0] * 256
    acc = [[[0] * 8 for _ in range(8)] for _ in range(256)]

    def fetch_stash(step, buf):
        ct, k0 = step // k_steps, (step % k_steps) * SIMT_BK
        for tid in range(256):
            load_row, load_k = tid >> 1, (tid & 1) * 4
            pa = load4(x, n, row0 + load_row, k0 + load_k)
            pb = load4(c, k, ct * SIMT_BN + load_row, k0 + load_k)
            if not l1 and ct == 0:
                xn_part[tid] += sum(v * v for v in pa)
            for e in range(4):
                As[buf][load_k + e][load_row] = pa[e]
                Bs[buf][load_k + e][load_row] = pb[e]

    fetch_stash(0, 0)
    for step in range(steps):
        buf = step & 1
        for tid in range(256):
            tx, ty = tid & 15, tid >> 4
            for kk in range(SIMT_BK):
                av = As[buf][kk][ty * 4:ty * 4 + 4] + As[buf][kk][64 + ty * 4:64 + ty * 4 + 4]
                bv = Bs[buf][kk][tx * 4:tx * 4 + 4] + Bs[buf][kk][64 + tx * 4:64 + tx * 4 + 4]
                for i in range(8):
                    for j in range(8):
                        acc[tid][i][j] += abs(av[i] - bv[j]) if l1 else av[i] * bv[j]
        if step + 1 < steps:
            fetch_stash(step + 1, buf ^ 1)
        if step % k_steps == k_steps - 1:
            c0 = (step // k_steps) * SIMT_BN
            for tid in range(256):
                tx = tid & 15
                for j in range(8):
                    col = c0 + (tx * 4 + j if j < 4 else 64 + tx * 4 + (j - 4))
                    if col >= k:
                        continue
                    for i in range(8):
                        v = acc[tid][i][j] / d if l1 else c_norm[col] - 2 * acc[tid][i][j]
                        if better_min(v, col, best_v[tid][i], best_i[tid][i]):
                            best_v[tid][i], best_i[tid][i] = v, col
                acc[tid] = [[0] * 8 for _ in range(8)]
    x_norm = [None] * SIMT_BM
    if not l1:
        for tid in range(256):
            if (tid & 1) == 0:
                x_norm[tid >> 1] = xn_part[tid] + xn_part[tid ^ 1]
    for warp in range(8):
        for i in range(8):
            bv = {l: best_v[warp * 32 + l][i] for l in range(32)}
            bi = {l: best_i[warp * 32 + l][i] for l in range(32)}
            off = 1
            while off < 16:
                nv, ni = dict(bv), dict(bi)
                for l in range(32):
                    if better_min(bv[l ^ off], bi[l ^ off], bv[l], bi[l]):
                        nv[l], ni[l] = bv[l ^ off], bi[l ^ off]
                bv, bi = nv, ni
                off <<= 1
            for l in range(32):
                tid = warp * 32 + l
                tx, ty = tid & 15, tid >> 4
                r = ty * 4 + i if i < 4 else 64 + ty * 4 + (i - 4)
                if tx == 0 and row0 + r < n:
                    labels[row0 + r] = bi[l]
                    dist[row0 + r] = bv[l] if l1 else max(x_norm[r] + bv[l], 0)


def check_simt(name, n, k, d, seed, l1):
    rng = random.Random(seed)
    x = [[rng.randint(-2, 2) for _ in range(d)] for _ in range(n)]
    c = [[rng.randint(-2, 2) for _ in range(d)] for _ in range(k)]
    for j in range(1, k, 3):
        c[j] = list(c[0])  # many exact ties
    labels, dist = [None] * n, [None] * n
    for block in range((n + SIMT_BM - 1) // SIMT_BM):
        simt_block(x, c, n, k, d, block, labels, dist, l1)
    ok = True
    for i in range(n):
        if l1:
            all_d = [sum(abs(x[i][e] - c[j][e]) for e in range(d)) / d for j in range(k)]
        else:
            all_d = [sum((x[i][e] - c[j][e]) ** 2 for e in range(d)) for j in range(k)]
        want = min(range(k), key=lambda j: (all_d[j], j))
        if labels[i] != want or dist[i] != all_d[want]:
            ok = False
            print(f"  row {i}: got ({labels[i]}, {dist[i]}), want ({want}, {all_d[want]})")
            break
    print(f"{name} [simt {'mean-L1' if l1 else 'squared L2'}]: {'OK' if ok else 'MISMATCH'}")
    return ok


def check_sort(name, labels, k, tile_rows):
    """tile_histogram → scan_tiles (8 segments per 32 clusters) → scan_offsets → stable_scatter."""
    n = len(labels)
    tiles = max(1, -(-n // tile_rows))
    cur = [0] * (tiles * k)
    for tile in range(tiles):
        for i in range(tile * tile_rows, min(n, tile * tile_rows + tile_rows)):
            cur[tile * k + labels[i]] += 1
    counts = [None] * k
    per = -(-tiles // 8)
    for block in range(-(-k // 32)):
        seg_sum = [[0] * 32 for _ in range(8)]
        bounds = [(min(tiles, w * per), min(tiles, min(tiles, w * per) + per)) for w in range(8)]
        for w in range(8):
            for lane in range(32):
                c = block * 32 + lane
                if c < k:
                    seg_sum[w][lane] = sum(cur[t * k + c] for t in range(*bounds[w]))
        for w in range(8):
            for lane in range(32):
                c = block * 32 + lane
                if c >= k:
                    continue
                running = sum(seg_sum[v][lane] for v in range(w))
                for t in range(*bounds[w]):
                    v = cur[t * k + c]
                    cur[t * k + c] = running
                    running += v
                if w == 0:
                    counts[c] = sum(seg_sum[v][lane] for v in range(8))
    offsets = [0] * (k + 1)
    for c in range(k):
        offsets[c + 1] = offsets[c] + counts[c]
    order = [None] * n
    for tile in range(tiles):
        begin, end = tile * tile_rows, min(n, tile * tile_rows + tile_rows)
        for base in range(begin, end, 32):
            lab = [labels[base + l] if base + l < end else 0xFFFFFFFF for l in range(32)]
            pos = {}
            for l in range(32):
                if lab[l] < k:
                    rank = sum(1 for m in range(l) if lab[m] == lab[l])
                    pos[l] = offsets[lab[l]] + cur[tile * k + lab[l]] + rank
            for l in range(32):
                if l in pos:
                    order[pos[l]] = base + l
            for c in set(v for v in lab if v < k):
                cur[tile * k + c] += lab.count(c)
    want = sorted(range(n), key=lambda i: (labels[i], i))
    ok = order == want and offsets[k] == n
    print(f"{name}: {'OK' if ok else 'MISMATCH'}")
    return ok


def check_segments(name, counts, chunk_rows):
    """Emulates scan_chunks_u32, cluster_of_chunk and segment_partials' [begin, end)."""
    k, n = len(counts), sum(counts)
    offsets = [0]
    for cnt in counts:
        offsets.append(offsets[-1] + cnt)
    chunk_start = [0]
    for c in range(k):
        chunk_start.append(chunk_start[-1] + (offsets[c + 1] - offsets[c] + chunk_rows - 1) // chunk_rows)
    chunks = chunk_start[k]
    max_chunks = -(-n // chunk_rows) + min(n, k)  # the host's grid bound
    ok = chunks <= max_chunks
    covered = [[] for _ in range(n)]
    for b in range(chunks):
        lo, hi = 0, k - 1
        while lo < hi:
            mid = lo + ((hi - lo + 1) >> 1)
            if chunk_start[mid] <= b:
                lo = mid
            else:
                hi = mid - 1
        c = lo
        ok &= chunk_start[c] <= b < chunk_start[c + 1]
        begin = offsets[c] + (b - chunk_start[c]) * chunk_rows
        end = min(offsets[c + 1], begin + chunk_rows)
        ok &= begin < end
        for j in range(begin, end):
            covered[j].append((c, b))
    for c in range(k):
        for j in range(offsets[c], offsets[c + 1]):
            ok &= len(covered[j]) == 1 and covered[j][0][0] == c
        bs = [covered[j][0][1] for j in range(offsets[c], offsets[c + 1])]
        ok &= bs == sorted(bs)  # rows in chunk order: the finish pass adds chunks in row order
    print(f"{name}: {'OK' if ok else 'MISMATCH'}")
    return ok


def main():
    cases = [
        ("N=130 K=200 D=40 (2 blocks, 2 centroid tiles, k-slice tail)", 130, 200, 40, 1, [5, 40, 77, 150, 199]),
        ("N=9 K=1 D=8", 9, 1, 8, 2, [0]),
        ("N=20 K=20 D=13 (D % 8 != 0: register path)", 20, 20, 13, 3, [3, 11, 19]),
        ("N=3 K=129 D=1", 3, 129, 1, 4, [64, 128]),
    ]
    results = [check(*case, resident) for case in cases for resident in (True, False)]
    streamed_only = [
        ("N=20 K=20 D=136 (D > 128: x streamed)", 20, 20, 136, 5, [1, 19]),
        ("N=7 K=9 D=130 (D > 128, D % 8 != 0)", 7, 9, 130, 6, [0, 8]),
    ]
    results += [check(*case, False) for case in streamed_only]
    results.append(check("N=5 K=3 D=128", 5, 3, 128, 7, [0, 2], True))
    simt_cases = [("N=130 K=140 D=13 (2 blocks, 2 tiles, k tail)", 130, 140, 13, 8), ("N=5 K=1 D=1", 5, 1, 1, 9)]
    results += [check_simt(*case, l1) for case in simt_cases for l1 in (False, True)]
    rng = random.Random(7)
    sort_cases = [
        ("sort: 20 tiles, 70 clusters (3 scan blocks)", [rng.randrange(70) for _ in range(5000)], 70, 256),
        ("sort: skewed, 3 tiles", [1 if rng.random() < 0.9 else rng.randrange(40) for _ in range(700)], 40, 256),
        ("sort: one tile, K = 1", [0] * 77, 1, 2048),
        ("sort: 9 tiles < 8 segments * 2", [rng.randrange(33) for _ in range(2100)], 33, 256),
    ]
    results += [check_sort(*case) for case in sort_cases]
    seg_cases = [
        ("segments: one huge cluster, empties around it", [0, 0, 5000, 0, 3, 0], 1024),
        ("segments: K = 1", [2049], 1024),
        ("segments: exact multiples", [1024, 2048, 0, 1], 1024),
        ("segments: random skew", [rng.choice([0, 1, 7, 300, 4000]) for _ in range(50)], 256),
        ("segments: all empty but last", [0] * 9 + [1], 1024),
    ]
    results += [check_segments(*case) for case in seg_cases]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
