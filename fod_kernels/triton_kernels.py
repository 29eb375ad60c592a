"""Triton kernels of the I2Correlation operator (spec sections 1, 3, 4).

FlashAttention-2 style: no L x L matrix ever reaches global memory. Every
kernel takes the pointers of up to two branches (suffix 0 and 1, the intra and
inter branch of the fused call) and picks its branch from ``program_id(2)``, so
both branches run in one launch.

Layouts: q, out, dq, g_out (B,H,L,D); k, v, dk, dv (Bk,H,L,D); sigma, dsigma (B,H,L,2) are
addressed through their (batch, head, row) strides, with the last dimension contiguous, so that
a module's (B,L,H,D) projections viewed as (B,H,L,D) are read in place, without copies. The
k/v batch stride is passed as 0 for a batch-shared memory (Bk = 1). Row vectors (lse, the
statistics, the backward's ROW buffer) are the launcher's own contiguous (B,H,L) tensors.

The element terms follow csrc/i2corr_math.h: with p, t the probabilities,
lp = log(p + eps), lt = log(t + eps), pe = p / (p + eps), te = t / (t + eps),
and for eps = 0 exactly lp = s - lse, lt = l - logZ, pe = te = 1.

Keys: the plain path (EXT = False: S == L, no key_padding_mask) is the kernel as it was before masks
existed. EXT = True is the general one: k, v hold S = m * L keys (key j at grid position j % L), and every
branch reads a uint8 mask (1 or B, S) (nonzero = ignore; an all-kept one where the caller gave none):
masked keys leave both softmaxes, and the prior's normaliser is a running log-sum-exp over the kept keys
(_prior_norm), kept as (lmax, lz). sigma is read as max(sigma, SIGMA_MIN), and dsigma is 0 below
SIGMA_MIN (the gradient of clamp_min).

All three kernels compute the scores as dot(q, trans(k)) * scale, so that forward and backward
see the same s. Arithmetic is fp32 throughout (statistics, accumulators, exp/log); dots take
the input dtype (p and ds are cast to it for the second product, as in
FlashAttention) and accumulate in fp32. ``PREC`` is the dot input precision for
fp32 inputs ("ieee" by default, "tf32" on request).
"""
import triton
import triton.language as tl

from ._validate import SIGMA_MIN as _SIGMA_MIN

NEG = tl.constexpr(-1.0e30)  # score of a masked key: exp underflows to 0 without inf - inf
SIGMA_MIN = tl.constexpr(_SIGMA_MIN)  # the prior reads max(sigma, SIGMA_MIN); dsigma is 0 below it


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST (set under the interpreter for bfloat16 only, whose dot it
    cannot do) multiplies the same values as fp32: bf16 products are exact in fp32, so nothing changes."""
    if UPCAST:
        res = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        res = tl.dot(a, b, input_precision=PREC)
    return res


@triton.jit
def _axis_log_norm(center, c, n, BLOCK_G: tl.constexpr):
    """log sum_{r<n} exp(-(center - r)^2 c) per row; the r = center term is 1, so no shift is needed."""
    z = tl.zeros_like(center)
    for r0 in range(0, n, BLOCK_G):
        r = r0 + tl.arange(0, BLOCK_G)
        d = center[:, None] - r[None, :].to(tl.float32)
        w = tl.exp(-d * d * c[:, None])
        z += tl.sum(tl.where(r[None, :] < n, w, 0.0), axis=1)
    return tl.log(z)


@triton.jit
def _log_norm(sy, sx, offs_m, rows, cols, BLOCK_G: tl.constexpr):
    """logZ of the separable Gaussian prior, and the coefficients cy = 1/(2 sy^2), cx = 1/(2 sx^2)."""
    cy = 0.5 / (sy * sy)
    cx = 0.5 / (sx * sx)
    ri = (offs_m // cols).to(tl.float32)
    ci = (offs_m % cols).to(tl.float32)
    logz = _axis_log_norm(ri, cy, rows, BLOCK_G) + _axis_log_norm(ci, cx, cols, BLOCK_G)
    return logz, cy, cx


@triton.jit
def _keys(offs_n, S, L, cols, MK, EXT: tl.constexpr):
    """Which keys of a tile count and their grid row and column. EXT: inside S and not masked (MK is the
    row's uint8 mask, nonzero = ignore), key j at position j % L of its image; else S = L, no mask."""
    keep = offs_n < S
    if EXT:
        keep = keep & (tl.load(MK + offs_n, mask=keep, other=1) == 0)
        jl = offs_n % L
    else:
        jl = offs_n
    return keep, (jl // cols).to(tl.float32), (jl % cols).to(tl.float32)


@triton.jit
def _log_prior(lw, lmax, lz, EXT: tl.constexpr):
    """log t from the log-weights (tile) and the row normaliser (lmax, lz broadcast to the tile)."""
    if EXT:
        res = (lw - lmax) - lz
    else:
        res = lw - lz
    return res


@triton.jit
def _prior_norm(sy, sx, offs_m, rows, cols, S, L, MK, EXT: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """(lmax, lz, cy, cx) with log t_ij = _log_prior(l_ij, lmax, lz). Plain path: lz = the separable logZ
    (lmax unused). EXT (a mask, or S = m * L): the prior does not factorise: lmax is the largest l of a kept
    key and lz = log sum exp(l - lmax) over the kept keys, kept apart as in log_softmax (lmax + lz in one
    number would cost ulp(|l|) in every log t, and with a masked own cell and tiny widths |l| ~ 1e9). A row
    with no kept key gives NaN."""
    logz, cy, cx = _log_norm(sy, sx, offs_m, rows, cols, BLOCK_G)
    if EXT:
        ri = (offs_m // cols).to(tl.float32)
        ci = (offs_m % cols).to(tl.float32)
        mx = tl.full([BLOCK_M], float("-inf"), tl.float32)
        z = tl.zeros([BLOCK_M], tl.float32)
        for n0 in range(0, S, BLOCK_N):
            keep, rj, cj = _keys(n0 + tl.arange(0, BLOCK_N), S, L, cols, MK, EXT)
            dy = ri[:, None] - rj[None, :]
            dx = ci[:, None] - cj[None, :]
            lw = tl.where(keep[None, :], -dy * dy * cy[:, None] - dx * dx * cx[:, None], float("-inf"))
            m_new = tl.maximum(mx, tl.max(lw, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf before a kept key
            z = z * tl.exp(mx - m_safe) + tl.sum(tl.exp(lw - m_safe[:, None]), axis=1)
            mx = m_new
        lmax = mx
        lz = tl.log(z)
    else:
        lmax = logz
        lz = logz
    return lmax, lz, cy, cx


@triton.jit
def _load_sigma(SG, offs_m, ss_l, mask_m):
    """The widths of a query tile as the prior uses them: max(sigma, SIGMA_MIN), in fp32."""
    sy = tl.load(SG + offs_m * ss_l, mask=mask_m, other=1.0).to(tl.float32)
    sx = tl.load(SG + offs_m * ss_l + 1, mask=mask_m, other=1.0).to(tl.float32)
    return tl.maximum(sy, SIGMA_MIN), tl.maximum(sx, SIGMA_MIN)


@triton.jit
def _log_terms(p, t, lp_exact, lt_exact, eps, EPS_ZERO: tl.constexpr):
    """i2c::log_terms: (lp, lt, pe, te) from p, t and their exact logs."""
    if EPS_ZERO:
        lp = lp_exact
        lt = lt_exact
        pe = tl.full(p.shape, 1.0, tl.float32)
        te = tl.full(p.shape, 1.0, tl.float32)
    else:
        pp = p + eps
        tt = t + eps
        lp = tl.log(pp)
        lt = tl.log(tt)
        pe = p / pp
        te = t / tt
    return lp, lt, pe, te


@triton.jit
def _pick3(first, a0, b0, c0, a1, b1, c1):
    """The (batch, head, row) strides of branch 0 or 1. A select, not an if: a stride of 1 is a
    compile-time constant in one branch and a runtime integer in the other, which an if cannot join."""
    return tl.where(first, a0, a1), tl.where(first, b0, b1), tl.where(first, c0, c1)


# ---------------------------------------------------------------------------
# Forward: pass 1 (lse, out), logZ, pass 2 (K, E, R1, R2).
# Integer arguments that only bound loops and masks (sizes, grid shape) are not specialised, so one
# compiled variant serves every L, grid and batch. The strides of q, k, v, out and their gradients are
# (their 16-divisibility tells the compiler which row loads it may vectorise); those of sigma and dsigma
# are not, nor is the alignment of their pointers: two floats per row, never vectorised, and an odd L
# would otherwise double the variants.
# ---------------------------------------------------------------------------
_SIGMA_STRIDES = [f"ss_{d}{i}" for i in (0, 1) for d in "bhl"]
_DSIGMA_STRIDES = [f"sds_{d}{i}" for i in (0, 1) for d in "bhl"]
# Per branch: the key count S = m * L and the mask's batch stride (0: one mask for the batch).
_KEY_ARGS = [f"{n}{i}" for i in (0, 1) for n in ("S", "sm_b")]


@triton.jit
def _pick_mask(first, M0, M1):
    if first:
        M = M0
    else:
        M = M1
    return M


@triton.jit(do_not_specialize=["H", "L", "D", "rows", "cols", *_SIGMA_STRIDES, *_KEY_ARGS],
            do_not_specialize_on_alignment=["SG0", "SG1", "M0", "M1"])
def fwd_kernel(Q0, K0, V0, SG0, OUT0, LSE0, KL0, ENT0, RA0, RB0, M0,
               Q1, K1, V1, SG1, OUT1, LSE1, KL1, ENT1, RA1, RB1, M1,
               sq_b0, sq_h0, sq_l0, sk_b0, sk_h0, sk_l0, sv_b0, sv_h0, sv_l0, ss_b0, ss_h0, ss_l0,
               so_b0, so_h0, so_l0, S0, sm_b0,
               sq_b1, sq_h1, sq_l1, sk_b1, sk_h1, sk_l1, sv_b1, sv_h1, sv_l1, ss_b1, ss_h1, ss_l1,
               so_b1, so_h1, so_l1, S1, sm_b1,
               H, L, D, rows, cols, scale, eps,
               STATS: tl.constexpr, EPS_ZERO: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
               EXT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    first = tl.program_id(2) == 0
    if first:
        Q, K, V, SG, OUT, LSE, KL, ENT, RA, RB = Q0, K0, V0, SG0, OUT0, LSE0, KL0, ENT0, RA0, RB0
    else:
        Q, K, V, SG, OUT, LSE, KL, ENT, RA, RB = Q1, K1, V1, SG1, OUT1, LSE1, KL1, ENT1, RA1, RB1
    sq_b, sq_h, sq_l = _pick3(first, sq_b0, sq_h0, sq_l0, sq_b1, sq_h1, sq_l1)
    sk_b, sk_h, sk_l = _pick3(first, sk_b0, sk_h0, sk_l0, sk_b1, sk_h1, sk_l1)
    sv_b, sv_h, sv_l = _pick3(first, sv_b0, sv_h0, sv_l0, sv_b1, sv_h1, sv_l1)
    ss_b, ss_h, ss_l = _pick3(first, ss_b0, ss_h0, ss_l0, ss_b1, ss_h1, ss_l1)
    so_b, so_h, so_l = _pick3(first, so_b0, so_h0, so_l0, so_b1, so_h1, so_l1)
    if EXT:
        S = tl.where(first, S0, S1)
    else:
        S = L
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    row0 = bh.to(tl.int64) * L  # first row of (b, h) in the (B, H, L) row vectors
    Q += b * sq_b + h * sq_h
    K += b * sk_b + h * sk_h  # sk_b = 0 for a batch-shared memory
    V += b * sv_b + h * sv_h
    SG += b * ss_b + h * ss_h
    OUT += b * so_b + h * so_h
    MK = _pick_mask(first, M0, M1)
    if EXT:
        MK += b * tl.where(first, sm_b0, sm_b1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < L
    mask_d = offs_d < D
    q = tl.load(Q + offs_m[:, None] * sq_l + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    # Pass 1: online softmax: lse, and out with rescaling when there is no second pass. With the
    # statistics, out is accumulated in pass 2 from the exact p = exp(s - lse) instead: then out, R1, R2
    # and the backward's recomputed p all rest on one p, and Dfull = <g_out, out> + a R1 + e R2 cancels
    # against p * u in ds to rounding (the rescaled p of pass 1 differs by ulps of |s|, which with
    # large logits does not cancel against the large log terms). Masked keys score -inf (a row without a
    # kept key ends with l_i = 0: NaN, as the reference's); padding beyond S scores NEG.
    m_i = tl.full([BLOCK_M], NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, S, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < S
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + offs_n[:, None] * sk_l + offs_d[None, :], mask=mask_nd, other=0.0)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * scale
        s = tl.where(mask_n[None, :], s, NEG)
        if EXT:
            keep, rj, cj = _keys(offs_n, S, L, cols, MK, EXT)
            s = tl.where(keep[None, :] | ~mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        pexp = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pexp, axis=1)
        if not STATS:
            v = tl.load(V + offs_n[:, None] * sv_l + offs_d[None, :], mask=mask_nd, other=0.0)
            acc = acc * alpha[:, None] + _dot(pexp.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new
    log_l = tl.log(l_i)
    inv_l = 1.0 / l_i
    lse = m_i + log_l
    tl.store(LSE + row0 + offs_m, lse, mask=mask_m)
    o_ptrs = OUT + offs_m[:, None] * so_l + offs_d[None, :]
    if not STATS:
        tl.store(o_ptrs, (acc / l_i[:, None]).to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    else:
        # Pass 2: exact p and t; out, and the row sums of the element terms.
        sy, sx = _load_sigma(SG, offs_m, ss_l, mask_m)
        lmax, lz, cy, cx = _prior_norm(sy, sx, offs_m, rows, cols, S, L, MK, EXT, BLOCK_M, BLOCK_N, BLOCK_G)
        ri = (offs_m // cols).to(tl.float32)
        ci = (offs_m % cols).to(tl.float32)
        kl = tl.zeros([BLOCK_M], tl.float32)
        ent = tl.zeros([BLOCK_M], tl.float32)
        r1 = tl.zeros([BLOCK_M], tl.float32)
        r2 = tl.zeros([BLOCK_M], tl.float32)
        for n0 in range(0, S, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < S
            mask_nd = mask_n[:, None] & mask_d[None, :]
            k = tl.load(K + offs_n[:, None] * sk_l + offs_d[None, :], mask=mask_nd, other=0.0)
            s = _dot(q, tl.trans(k), PREC, UPCAST) * scale
            s = tl.where(mask_n[None, :], s, NEG)
            keep, rj, cj = _keys(offs_n, S, L, cols, MK, EXT)
            if EXT:
                s = tl.where(keep[None, :] | ~mask_n[None, :], s, float("-inf"))
            dy = ri[:, None] - rj[None, :]
            dx = ci[:, None] - cj[None, :]
            lw = -dy * dy * cy[:, None] - dx * dx * cx[:, None]
            # p from the row max and sum, not from lse: s - m is exact and Sum_j p = 1 to rounding, which
            # out, R1, R2 (hence Dfull) rely on; exp(s - lse) would carry lse's rounding, ulp(|lse|).
            sm = s - m_i[:, None]
            p = tl.exp(sm) * inv_l[:, None]
            lt_x = _log_prior(lw, lmax[:, None], lz[:, None], EXT)
            t = tl.exp(lt_x)
            lp, lt, pe, te = _log_terms(p, t, sm - log_l[:, None], lt_x, eps, EPS_ZERO)
            v = tl.load(V + offs_n[:, None] * sv_l + offs_d[None, :], mask=mask_nd, other=0.0)
            acc += _dot(p.to(v.dtype), v, PREC, UPCAST)
            valid = keep[None, :]
            t = tl.where(valid, t, 0.0)
            kl += tl.sum(tl.where(valid, (p - t) * (lp - lt), 0.0), axis=1)
            ent += tl.sum(tl.where(valid, -p * lp, 0.0), axis=1)
            r1 += tl.sum(tl.where(valid, p * (lp - lt) + pe * (p - t), 0.0), axis=1)
            r2 += tl.sum(tl.where(valid, -p * (lp + pe), 0.0), axis=1)
        tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
        tl.store(KL + row0 + offs_m, kl, mask=mask_m)
        tl.store(ENT + row0 + offs_m, ent, mask=mask_m)
        tl.store(RA + row0 + offs_m, r1, mask=mask_m)
        tl.store(RB + row0 + offs_m, r2, mask=mask_m)


# ---------------------------------------------------------------------------
# Backward. ROW: float32 (n_branches, 7, B, H, L) holding lse, dfull, g_kl_attn, g_kl_prior, g_ent, lz, lmax
# (the prior's normaliser, log t = (l - lmax) - lz, written by logz_kernel); NROW = B*H*L, the stride
# between its slots.
# ---------------------------------------------------------------------------
@triton.jit
def _load_row_stats(ROWB, rr, mask_m, NROW, EXT: tl.constexpr):
    """The rows rr of a branch's ROW slots (ROWB): lse, dfull, g_kl_attn, g_ent, lz, lmax (lmax = lz on the
    plain path, where log t = l - lz). g_kl_prior (slot 3) is the dq kernel's alone."""
    lse = tl.load(ROWB + rr, mask=mask_m, other=0.0)
    dfull = tl.load(ROWB + NROW + rr, mask=mask_m, other=0.0)
    g_kl_attn = tl.load(ROWB + 2 * NROW + rr, mask=mask_m, other=0.0)
    g_ent = tl.load(ROWB + 4 * NROW + rr, mask=mask_m, other=0.0)
    lz = tl.load(ROWB + 5 * NROW + rr, mask=mask_m, other=0.0)
    if EXT:
        lmax = tl.load(ROWB + 6 * NROW + rr, mask=mask_m, other=0.0)
    else:
        lmax = lz
    return lse, dfull, g_kl_attn, g_ent, lz, lmax


@triton.jit
def _dscore(p, t, lp, lt, pe, gv, dfull, g_kl_attn, g_ent, valid):
    """dS (spec section 3): p (gv - dfull) + g_kl_attn (p (lp - lt) + pe (p - t)) - g_ent p (lp + pe), 0 outside
    valid. The row terms dfull, g_kl_attn, g_ent come broadcast to the tile's orientation."""
    ds = p * (gv - dfull) + g_kl_attn * (p * (lp - lt) + pe * (p - t)) - g_ent * p * (lp + pe)
    return tl.where(valid, ds, 0.0)


@triton.jit(do_not_specialize=["H", "NROW", "L", "rows", "cols", *_SIGMA_STRIDES, *_KEY_ARGS],
            do_not_specialize_on_alignment=["SG0", "SG1", "M0", "M1"])
def logz_kernel(SG0, SG1, M0, M1, ROW, ss_b0, ss_h0, ss_l0, ss_b1, ss_h1, ss_l1, S0, sm_b0, S1, sm_b1,
                H, NROW, L, rows, cols, EXT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_G: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    br = tl.program_id(2)
    first = br == 0
    if first:
        SG = SG0
    else:
        SG = SG1
    ss_b, ss_h, ss_l = _pick3(first, ss_b0, ss_h0, ss_l0, ss_b1, ss_h1, ss_l1)
    SG += (bh // H).to(tl.int64) * ss_b + (bh % H).to(tl.int64) * ss_h
    if EXT:
        S = tl.where(first, S0, S1)
    else:
        S = L
    MK = _pick_mask(first, M0, M1)
    if EXT:
        MK += (bh // H).to(tl.int64) * tl.where(first, sm_b0, sm_b1)
    row0 = bh.to(tl.int64) * L
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < L
    sy, sx = _load_sigma(SG, offs_m, ss_l, mask_m)
    lmax, lz, cy, cx = _prior_norm(sy, sx, offs_m, rows, cols, S, L, MK, EXT, BLOCK_M, BLOCK_N, BLOCK_G)
    tl.store(ROW + (br.to(tl.int64) * 7 + 5) * NROW + row0 + offs_m, lz, mask=mask_m)
    if EXT:
        tl.store(ROW + (br.to(tl.int64) * 7 + 6) * NROW + row0 + offs_m, lmax, mask=mask_m)


@triton.jit(do_not_specialize=["BK0", "BK1", "B", "H", "L", "D", "rows", "cols", "NROW", *_SIGMA_STRIDES,
                               *_KEY_ARGS],
            do_not_specialize_on_alignment=["SG0", "SG1", "M0", "M1"])
def bwd_dkdv_kernel(Q0, K0, V0, SG0, DO0, DK0, DV0, M0, Q1, K1, V1, SG1, DO1, DK1, DV1, M1, ROW,
                    sq_b0, sq_h0, sq_l0, sk_b0, sk_h0, sk_l0, sv_b0, sv_h0, sv_l0, ss_b0, ss_h0, ss_l0,
                    sdo_b0, sdo_h0, sdo_l0, sdk_b0, sdk_h0, sdk_l0, sdv_b0, sdv_h0, sdv_l0, S0, sm_b0,
                    sq_b1, sq_h1, sq_l1, sk_b1, sk_h1, sk_l1, sv_b1, sv_h1, sv_l1, ss_b1, ss_h1, ss_l1,
                    sdo_b1, sdo_h1, sdo_l1, sdk_b1, sdk_h1, sdk_l1, sdv_b1, sdv_h1, sdv_l1, S1, sm_b1,
                    BK0, BK1, B, H, L, D, rows, cols, scale, eps, NROW,
                    EPS_ZERO: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, EXT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One key block of one (k-batch, head): dk, dv summed over the query blocks, and over the
    query batch when k, v are batch-shared (Bk = 1): a plain loop, deterministic, no atomics."""
    pid_n = tl.program_id(0)
    kbh = tl.program_id(1)
    br = tl.program_id(2)
    first = br == 0
    if first:
        Q, K, V, SG, DO, DK, DV = Q0, K0, V0, SG0, DO0, DK0, DV0
    else:
        Q, K, V, SG, DO, DK, DV = Q1, K1, V1, SG1, DO1, DK1, DV1
    BK = tl.where(first, BK0, BK1)
    sq_b, sq_h, sq_l = _pick3(first, sq_b0, sq_h0, sq_l0, sq_b1, sq_h1, sq_l1)
    sk_b, sk_h, sk_l = _pick3(first, sk_b0, sk_h0, sk_l0, sk_b1, sk_h1, sk_l1)
    sv_b, sv_h, sv_l = _pick3(first, sv_b0, sv_h0, sv_l0, sv_b1, sv_h1, sv_l1)
    ss_b, ss_h, ss_l = _pick3(first, ss_b0, ss_h0, ss_l0, ss_b1, ss_h1, ss_l1)
    sdo_b, sdo_h, sdo_l = _pick3(first, sdo_b0, sdo_h0, sdo_l0, sdo_b1, sdo_h1, sdo_l1)
    sdk_b, sdk_h, sdk_l = _pick3(first, sdk_b0, sdk_h0, sdk_l0, sdk_b1, sdk_h1, sdk_l1)
    sdv_b, sdv_h, sdv_l = _pick3(first, sdv_b0, sdv_h0, sdv_l0, sdv_b1, sdv_h1, sdv_l1)
    if EXT:
        S = tl.where(first, S0, S1)
    else:
        S = L
    sm_b = tl.where(first, sm_b0, sm_b1)
    MK = _pick_mask(first, M0, M1)
    kb = kbh // H
    h = kbh % H
    # Query batches this program sums over; none when this branch has fewer k batches than the grid.
    b_lo = tl.where(BK == 1, 0, kb)
    b_hi = tl.where(BK == 1, tl.where(kb == 0, B, 0), kb + 1)
    kb64 = kb.to(tl.int64)
    h64 = h.to(tl.int64)
    K += kb64 * sk_b + h64 * sk_h
    V += kb64 * sv_b + h64 * sv_h
    DK += kb64 * sdk_b + h64 * sdk_h
    DV += kb64 * sdv_b + h64 * sdv_h
    Q += h64 * sq_h
    DO += h64 * sdo_h
    SG += h64 * ss_h
    ROWB = ROW + br.to(tl.int64) * 7 * NROW

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < S  # programs past this branch's S (fused with a longer memory) touch nothing
    mask_d = offs_d < D
    # Programs past this branch's k batches (kb >= BK: a batch-shared branch fused with a Bk = B one)
    # must not touch K, V, DK, DV at all: their rows would lie beyond the tensors.
    mask_nd = mask_n[:, None] & mask_d[None, :] & (kb < BK)
    k = tl.load(K + offs_n[:, None] * sk_l + offs_d[None, :], mask=mask_nd, other=0.0)
    v = tl.load(V + offs_n[:, None] * sv_l + offs_d[None, :], mask=mask_nd, other=0.0)
    keep, rj, cj = _keys(offs_n, S, L, cols, MK, False)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    Qb = Q + b_lo.to(tl.int64) * sq_b  # advanced by one batch per iteration
    DOb = DO + b_lo.to(tl.int64) * sdo_b
    SGb = SG + b_lo.to(tl.int64) * ss_b
    if EXT:
        MKb = MK + b_lo.to(tl.int64) * sm_b
    for b in range(b_lo, b_hi):
        row0 = (b * H + h).to(tl.int64) * L
        if EXT:  # this query batch's mask row
            keep, rj, cj = _keys(offs_n, S, L, cols, MKb, EXT)
        for m0 in range(0, L, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < L
            mask_md = mask_m[:, None] & mask_d[None, :]
            q = tl.load(Qb + offs_m[:, None] * sq_l + offs_d[None, :], mask=mask_md, other=0.0)
            do = tl.load(DOb + offs_m[:, None] * sdo_l + offs_d[None, :], mask=mask_md, other=0.0)
            lse, dfull, g_kl_attn, g_ent, lz, lmax = _load_row_stats(ROWB, row0 + offs_m, mask_m, NROW, EXT)
            sy, sx = _load_sigma(SGb, offs_m, ss_l, mask_m)
            # Transposed tiles: keys along axis 0, queries along axis 1.
            # The scores exactly as the forward and the dq kernel compute them (same operand order), so that
            # p agrees bitwise with the p behind lse, R1, R2: with large logits a one-ulp change of s
            # would not cancel in p * (u - Dfull).
            s = tl.trans(_dot(q, tl.trans(k), PREC, UPCAST) * scale)
            dy = (offs_m // cols).to(tl.float32)[None, :] - rj[:, None]
            dx = (offs_m % cols).to(tl.float32)[None, :] - cj[:, None]
            lw = -dy * dy * (0.5 / (sy * sy))[None, :] - dx * dx * (0.5 / (sx * sx))[None, :]
            p = tl.exp(s - lse[None, :])
            lt_x = _log_prior(lw, lmax[None, :], lz[None, :], EXT)
            t = tl.exp(lt_x)
            lp, lt, pe, te = _log_terms(p, t, s - lse[None, :], lt_x, eps, EPS_ZERO)
            valid = keep[:, None] & mask_m[None, :]
            p = tl.where(valid, p, 0.0)
            gv = _dot(v, tl.trans(do), PREC, UPCAST)
            ds = _dscore(p, t, lp, lt, pe, gv, dfull[None, :], g_kl_attn[None, :], g_ent[None, :], valid)
            dv += _dot(p.to(do.dtype), do, PREC, UPCAST)
            dk += _dot(ds.to(q.dtype), q, PREC, UPCAST)
        Qb += sq_b
        DOb += sdo_b
        SGb += ss_b
        if EXT:
            MKb += sm_b
    dk = dk * scale
    tl.store(DK + offs_n[:, None] * sdk_l + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + offs_n[:, None] * sdv_l + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit(do_not_specialize=["H", "L", "D", "rows", "cols", "NROW", *_SIGMA_STRIDES, *_DSIGMA_STRIDES,
                               *_KEY_ARGS],
            do_not_specialize_on_alignment=["SG0", "SG1", "DS0", "DS1", "M0", "M1"])
def bwd_dq_kernel(Q0, K0, V0, SG0, DO0, DQ0, DS0, M0, Q1, K1, V1, SG1, DO1, DQ1, DS1, M1, ROW,
                  sq_b0, sq_h0, sq_l0, sk_b0, sk_h0, sk_l0, sv_b0, sv_h0, sv_l0, ss_b0, ss_h0, ss_l0,
                  sdo_b0, sdo_h0, sdo_l0, sdq_b0, sdq_h0, sdq_l0, sds_b0, sds_h0, sds_l0, S0, sm_b0,
                  sq_b1, sq_h1, sq_l1, sk_b1, sk_h1, sk_l1, sv_b1, sv_h1, sv_l1, ss_b1, ss_h1, ss_l1,
                  sdo_b1, sdo_h1, sdo_l1, sdq_b1, sdq_h1, sdq_l1, sds_b1, sds_h1, sds_l1, S1, sm_b1,
                  H, L, D, rows, cols, scale, eps, NROW,
                  EPS_ZERO: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, EXT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One query block: dq, and dsigma from the five row sums of spec section 3
    (W = sum tw, sum tw dy^2, sum tw dx^2, sum t dy^2, sum t dx^2; tw = i2c::tw_elem)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    br = tl.program_id(2)
    first = br == 0
    if first:
        Q, K, V, SG, DO, DQ, DS = Q0, K0, V0, SG0, DO0, DQ0, DS0
    else:
        Q, K, V, SG, DO, DQ, DS = Q1, K1, V1, SG1, DO1, DQ1, DS1
    sq_b, sq_h, sq_l = _pick3(first, sq_b0, sq_h0, sq_l0, sq_b1, sq_h1, sq_l1)
    sk_b, sk_h, sk_l = _pick3(first, sk_b0, sk_h0, sk_l0, sk_b1, sk_h1, sk_l1)
    sv_b, sv_h, sv_l = _pick3(first, sv_b0, sv_h0, sv_l0, sv_b1, sv_h1, sv_l1)
    ss_b, ss_h, ss_l = _pick3(first, ss_b0, ss_h0, ss_l0, ss_b1, ss_h1, ss_l1)
    sdo_b, sdo_h, sdo_l = _pick3(first, sdo_b0, sdo_h0, sdo_l0, sdo_b1, sdo_h1, sdo_l1)
    sdq_b, sdq_h, sdq_l = _pick3(first, sdq_b0, sdq_h0, sdq_l0, sdq_b1, sdq_h1, sdq_l1)
    sds_b, sds_h, sds_l = _pick3(first, sds_b0, sds_h0, sds_l0, sds_b1, sds_h1, sds_l1)
    if EXT:
        S = tl.where(first, S0, S1)
    else:
        S = L
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    row0 = bh.to(tl.int64) * L
    Q += b * sq_b + h * sq_h
    K += b * sk_b + h * sk_h  # sk_b = 0 for a batch-shared memory
    V += b * sv_b + h * sv_h
    SG += b * ss_b + h * ss_h
    DO += b * sdo_b + h * sdo_h
    DQ += b * sdq_b + h * sdq_h
    DS += b * sds_b + h * sds_h
    MK = _pick_mask(first, M0, M1)
    if EXT:
        MK += b * tl.where(first, sm_b0, sm_b1)
    ROWB = ROW + br.to(tl.int64) * 7 * NROW

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < L
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + offs_m[:, None] * sq_l + offs_d[None, :], mask=mask_md, other=0.0)
    do = tl.load(DO + offs_m[:, None] * sdo_l + offs_d[None, :], mask=mask_md, other=0.0)
    lse, dfull, g_kl_attn, g_ent, lz, lmax = _load_row_stats(ROWB, row0 + offs_m, mask_m, NROW, EXT)
    g_kl_prior = tl.load(ROWB + 3 * NROW + row0 + offs_m, mask=mask_m, other=0.0)
    sy, sx = _load_sigma(SG, offs_m, ss_l, mask_m)
    cy = 0.5 / (sy * sy)
    cx = 0.5 / (sx * sx)
    ri = (offs_m // cols).to(tl.float32)
    ci = (offs_m % cols).to(tl.float32)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    w_sum = tl.zeros([BLOCK_M], tl.float32)
    tw_dy = tl.zeros([BLOCK_M], tl.float32)
    tw_dx = tl.zeros([BLOCK_M], tl.float32)
    t_dy = tl.zeros([BLOCK_M], tl.float32)
    t_dx = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(0, S, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < S
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + offs_n[:, None] * sk_l + offs_d[None, :], mask=mask_nd, other=0.0)
        v = tl.load(V + offs_n[:, None] * sv_l + offs_d[None, :], mask=mask_nd, other=0.0)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * scale
        keep, rj, cj = _keys(offs_n, S, L, cols, MK, EXT)
        dy = ri[:, None] - rj[None, :]
        dx = ci[:, None] - cj[None, :]
        dy2 = dy * dy
        dx2 = dx * dx
        lw = -dy2 * cy[:, None] - dx2 * cx[:, None]
        p = tl.exp(s - lse[:, None])
        lt_x = _log_prior(lw, lmax[:, None], lz[:, None], EXT)
        t = tl.exp(lt_x)
        lp, lt, pe, te = _log_terms(p, t, s - lse[:, None], lt_x, eps, EPS_ZERO)
        valid = mask_m[:, None] & keep[None, :]
        p = tl.where(valid, p, 0.0)
        t = tl.where(valid, t, 0.0)
        gv = _dot(do, tl.trans(v), PREC, UPCAST)
        ds = _dscore(p, t, lp, lt, pe, gv, dfull[:, None], g_kl_attn[:, None], g_ent[:, None], valid)
        dq += _dot(ds.to(k.dtype), k, PREC, UPCAST)
        tw = tl.where(valid, t * (lt - lp) + te * (t - p), 0.0)
        w_sum += tl.sum(tw, axis=1)
        tw_dy += tl.sum(tw * dy2, axis=1)
        tw_dx += tl.sum(tw * dx2, axis=1)
        t_dy += tl.sum(t * dy2, axis=1)
        t_dx += tl.sum(t * dx2, axis=1)
    dq = dq * scale
    tl.store(DQ + offs_m[:, None] * sdq_l + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=mask_md)
    dsy = g_kl_prior * (tw_dy - w_sum * t_dy) / (sy * sy * sy)
    dsx = g_kl_prior * (tw_dx - w_sum * t_dx) / (sx * sx * sx)
    # clamp_min's gradient: 0 where the caller's sigma was raised to SIGMA_MIN
    dsy = tl.where(tl.load(SG + offs_m * ss_l, mask=mask_m, other=1.0).to(tl.float32) < SIGMA_MIN, 0.0, dsy)
    dsx = tl.where(tl.load(SG + offs_m * ss_l + 1, mask=mask_m, other=1.0).to(tl.float32) < SIGMA_MIN, 0.0, dsx)
    tl.store(DS + offs_m * sds_l, dsy.to(DS.dtype.element_ty), mask=mask_m)
    tl.store(DS + offs_m * sds_l + 1, dsx.to(DS.dtype.element_ty), mask=mask_m)
