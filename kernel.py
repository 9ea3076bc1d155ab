"""
NAtS sparse attention: the plain-PyTorch reference and the public entry point.

Every key j carries a one-hot type per KV head (0 Global, 1 Local, 2 Sliding) that decides
which later queries may see it (../shared/NATS_SPEC.md, sections 2-3):

    Global   seen by every later query
    Local    seen up to and including the next Global token's own query
    Sliding  seen by the W+1 queries j .. j+W

So key j is visible to exactly the queries j .. last_visible_query[j]: one integer per key
describes the whole mask. The reference below builds the full T x T relaxed mask instead, so
that autograd gives the token types the gradient the spec defines.
"""
import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

GLOBAL, LOCAL, SLIDING = 0, 1, 2
LOG2E = math.log2(math.e)

# -----------------------------------------------------------------------------
# O(T) per-key metadata shared by the model, the kernel and the tests


def next_global(is_global):
    """f_j: the first Global position >= j, or T if none. is_global: bool [..., T] -> long [..., T]."""
    T = is_global.shape[-1]
    pos = torch.arange(T, device=is_global.device).expand_as(is_global)
    candidate = torch.where(is_global, pos, torch.full_like(pos, T))
    return candidate.flip(-1).cummin(-1).values.flip(-1)


def reach_by_type(token_types, window):
    """The last query that would see key j as each type (spec section 2): long [..., T, 3].

    Global: the end; Local: the next Global token (inclusive, from the hard types); Sliding: j + W.
    """
    T = token_types.shape[-2]
    pos = torch.arange(T, device=token_types.device)
    local = next_global(token_types.argmax(-1) == GLOBAL).clamp(max=T - 1)
    return torch.stack(torch.broadcast_tensors(torch.full_like(local, T - 1), local,
                                               (pos + window).clamp(max=T - 1)), dim=-1)


def last_visible_query(token_types, window):
    """The last query that sees key j: key j is visible to queries j .. this. Returns long [..., T]."""
    return reach_by_type(token_types, window).gather(-1, token_types.argmax(-1, keepdim=True)).squeeze(-1)


def visible_mask(token_types, window):
    """The hard mask: bool [..., T, T], True where query i sees key j."""
    T = token_types.shape[-2]
    last = last_visible_query(token_types, window).unsqueeze(-2)
    i = torch.arange(T, device=token_types.device)[:, None]
    j = torch.arange(T, device=token_types.device)[None, :]
    return (j <= i) & (i <= last)


def kv_lengths(token_types, window):
    """Column lengths n_j of spec section 4: how many queries see key j.

    The length of each type comes from the hard types (no gradient through f_j); the one-hot
    types carry the straight-through gradient, so the sparsity term trains the scorer.
    """
    pos = torch.arange(token_types.shape[-2], device=token_types.device)[:, None]
    lengths = reach_by_type(token_types, window) - pos + 1
    return (token_types * lengths.to(token_types.dtype)).sum(-1)


# -----------------------------------------------------------------------------
# The reference: spec sections 2-3 in plain PyTorch, O(T^2) memory


def relaxed_mask(token_types, window):
    """M_ij(y) = [i >= j] (g_j + l_j prod_{j<k<i} (1 - g_k) + s_j [i - j <= W]), spec section 3.

    Equals the hard mask at one-hot y. The product is one cumprod down the rows: row i
    multiplies in (1 - g_{i-1}) for every column j < i - 1.
    """
    g, l, s = token_types.unbind(-1)
    T = g.shape[-1]
    i = torch.arange(T, device=g.device)[:, None]
    j = torch.arange(T, device=g.device)[None, :]
    g_prev = F.pad(g, (1, 0))[..., :-1, None]  # g_{i-1} for row i
    local_alive = torch.where(i - 1 > j, 1 - g_prev, torch.ones_like(g_prev)).cumprod(-2)
    mask = g[..., None, :] + l[..., None, :] * local_alive + s[..., None, :] * (i - j <= window)
    return mask * (j <= i)


def nats_attention_reference(q, k, v, token_types, window):
    """NAtS attention in plain PyTorch; autograd gives q, k, v and the token types their gradients.

    q: [B, H, T, D]; k, v: [B, H_kv, T, D] with H % H_kv == 0 (query heads of a group share
    their KV head's types); token_types: one-hot float [B, H_kv, T, 3]. Returns [B, H, T, D].
    Softmax and mask run in float32 (float64 for float64 inputs), the products in the input dtype.
    """
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    q = q.reshape(B, H_kv, H // H_kv, T, D)  # grouped-query heads: [B, H_kv, group, T, D]
    k, v = k.unsqueeze(2), v.unsqueeze(2)
    scores = (q @ k.transpose(-1, -2)).to(acc) * D**-0.5
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    pi = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)  # causal softmax
    mask = relaxed_mask(token_types.to(acc), window).unsqueeze(2)
    # rho_i: the share of the causal mass row i keeps. Scaling the mask gradient by it turns the
    # exact dL/dM (unbounded for masked keys with large scores) into pi_ij (dP_ij - Dl_i).
    rho = (mask * pi).sum(-1, keepdim=True).detach()
    mask = mask.detach() + rho * (mask - mask.detach())
    kept = mask * pi
    attn = kept / kept.sum(-1, keepdim=True)
    return (attn.to(v.dtype) @ v).reshape(B, H, T, D)


# -----------------------------------------------------------------------------
# The Triton kernel: never an N x N tensor in memory, only O(T) metadata per (batch, KV head)
#
# Key j is visible to queries j .. last_q[j]. The forward keeps two log-sum-exps per query row
# (log2 domain): LSE_M over the visible keys (the output's softmax) and, when gradients are
# needed, LSE_F over all causal keys, whose softmax pi gives the mask gradient
# G_ij = pi_ij (dP_ij - Dl_i) of spec section 3. Inference skips every tile with nothing
# visible and visits the Global keys through a gathered list, so a query tile reads only the
# Globals before it plus the few nearby tiles where Local and Sliding keys still live.


@triton.jit
def _softmax_update(acc, m_i, l_i, s, visible, v, PRECISION: tl.constexpr):
    """One FlashAttention-2 step over a key tile, counting only the visible entries.
    m_i starts at a finite -1e30, so rows with nothing visible yet stay NaN-free."""
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _nats_fwd_kernel(Q, K, V, O, LSE_M, LSE_F, LAST_Q, TILE_LAST_Q, GLOBAL_POS, N_GLOBAL_UPTO,
                     sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_t,
                     H, H_KV, T, N_TILES, scale_log2,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     TRAINING: tl.constexpr, PRECISION: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    hkv = h // (H // H_KV)  # the KV head of this query head
    kv = b * H_KV + hkv  # its row in the [B, H_kv, ...] metadata
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
    K += b * sk_b + hkv * sk_h
    V += b * sv_b + hkv * sv_h
    LAST_Q += kv * T
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    end_m = tl.minimum(start_m + BLOCK_M, T)
    if TRAINING:  # every causal tile: LSE_F needs all of them, P @ V only the visible ones
        mf_i = tl.full([BLOCK_M], -1e30, tl.float32)
        lf_i = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, end_m, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = tl.load(K + offs_n[None, :] * sk_t + offs_d[:, None], mask=offs_n[None, :] < T, other=0.0)
            s = tl.dot(q, k, input_precision=PRECISION) * scale_log2
            causal = offs_n[None, :] <= offs_m[:, None]
            s_causal = tl.where(causal, s, float("-inf"))
            mf_new = tl.maximum(mf_i, tl.max(s_causal, 1))
            lf_i = lf_i * tl.math.exp2(mf_i - mf_new) + tl.sum(tl.math.exp2(s_causal - mf_new[:, None]), 1)
            mf_i = mf_new
            if tl.load(TILE_LAST_Q + kv * N_TILES + start_n // BLOCK_N) >= start_m:
                last_q = tl.load(LAST_Q + offs_n, mask=offs_n < T, other=-1)
                v = tl.load(V + offs_n[:, None] * sv_t + offs_d[None, :], mask=offs_n[:, None] < T, other=0.0)
                visible = causal & (offs_m[:, None] <= last_q[None, :])
                acc, m_i, l_i = _softmax_update(acc, m_i, l_i, s, visible, v, PRECISION)
        tl.store(LSE_F + (b * H + h) * T + offs_m, mf_i + tl.math.log2(lf_i), mask=offs_m < T)
    else:
        # Global keys before this tile's last query, gathered from their list
        n_global = tl.load(N_GLOBAL_UPTO + kv * T + end_m - 1)
        for start_g in range(0, n_global, BLOCK_N):
            offs_g = start_g + tl.arange(0, BLOCK_N)
            pos = tl.load(GLOBAL_POS + kv * T + offs_g, mask=offs_g < n_global, other=T)
            k = tl.load(K + pos[None, :] * sk_t + offs_d[:, None], mask=pos[None, :] < T, other=0.0)
            v = tl.load(V + pos[:, None] * sv_t + offs_d[None, :], mask=pos[:, None] < T, other=0.0)
            s = tl.dot(q, k, input_precision=PRECISION) * scale_log2
            acc, m_i, l_i = _softmax_update(acc, m_i, l_i, s, pos[None, :] <= offs_m[:, None], v, PRECISION)
        # Local and Sliding keys (LAST_Q is -1 for Globals here): only tiles that reach this one
        for start_n in range(0, end_m, BLOCK_N):
            if tl.load(TILE_LAST_Q + kv * N_TILES + start_n // BLOCK_N) >= start_m:
                offs_n = start_n + tl.arange(0, BLOCK_N)
                last_q = tl.load(LAST_Q + offs_n, mask=offs_n < T, other=-1)
                k = tl.load(K + offs_n[None, :] * sk_t + offs_d[:, None], mask=offs_n[None, :] < T, other=0.0)
                v = tl.load(V + offs_n[:, None] * sv_t + offs_d[None, :], mask=offs_n[:, None] < T, other=0.0)
                s = tl.dot(q, k, input_precision=PRECISION) * scale_log2
                visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] <= last_q[None, :])
                acc, m_i, l_i = _softmax_update(acc, m_i, l_i, s, visible, v, PRECISION)
    l_i = tl.where(offs_m < T, l_i, 1.0)  # rows past the end see nothing
    o = acc / l_i[:, None]
    tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=offs_m[:, None] < T)
    tl.store(LSE_M + (b * H + h) * T + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < T)


@triton.jit
def _nats_bwd_dkdv_kernel(Q, K, V, DO, LSE_M, LSE_F, DELTA, DK, DV, COLSUM,
                          LAST_Q, SEG_END, NEXT_SEG_END,
                          sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t,
                          H, H_KV, T, window, scale_log2, scale,
                          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          PRECISION: tl.constexpr):
    """dK, dV and four column sums of G for one key tile, over all query heads of its group.

    The column sums c(limit) = sum_{i=j}^{limit} G_ij give the token-type gradients: rows up to
    the segment end (Local), the next segment's end (the cross term X of a Global), j + W
    (Sliding) and T - 1 (Global). They need every causal tile; dK and dV only the visible ones.
    """
    start_n = tl.program_id(0) * BLOCK_N
    b, hkv = tl.program_id(1) // H_KV, tl.program_id(1) % H_KV
    kv = b * H_KV + hkv
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k = tl.load(K + b * sk_b + hkv * sk_h + offs_n[:, None] * sk_t + offs_d[None, :], mask=offs_n[:, None] < T, other=0.0)
    v = tl.load(V + b * sv_b + hkv * sv_h + offs_n[:, None] * sv_t + offs_d[None, :], mask=offs_n[:, None] < T, other=0.0)
    last_q = tl.load(LAST_Q + kv * T + offs_n, mask=offs_n < T, other=-1)
    seg_end = tl.load(SEG_END + kv * T + offs_n, mask=offs_n < T, other=-1)
    next_seg_end = tl.load(NEXT_SEG_END + kv * T + offs_n, mask=offs_n < T, other=-1)
    slide_end = offs_n + window
    tile_last_q = tl.max(last_q, 0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    c_all = tl.zeros([BLOCK_N], tl.float32)
    c_seg = tl.zeros([BLOCK_N], tl.float32)
    c_next = tl.zeros([BLOCK_N], tl.float32)
    c_slide = tl.zeros([BLOCK_N], tl.float32)
    group = H // H_KV
    for h in range(hkv * group, hkv * group + group):
        row = (b * H + h) * T
        for start_m in range(start_n // BLOCK_M * BLOCK_M, T, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            in_rows = offs_m < T
            q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :], mask=in_rows[:, None], other=0.0)
            do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_t + offs_d[None, :], mask=in_rows[:, None], other=0.0)
            lse_f = tl.load(LSE_F + row + offs_m, mask=in_rows, other=0.0)
            delta = tl.load(DELTA + row + offs_m, mask=in_rows, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            causal = (offs_n[None, :] <= offs_m[:, None]) & in_rows[:, None]
            dp_minus_delta = tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None]
            g = tl.where(causal, tl.math.exp2(s - lse_f[:, None]), 0.0) * dp_minus_delta
            c_all += tl.sum(g, 0)
            c_seg += tl.sum(tl.where(offs_m[:, None] <= seg_end[None, :], g, 0.0), 0)
            c_next += tl.sum(tl.where(offs_m[:, None] <= next_seg_end[None, :], g, 0.0), 0)
            c_slide += tl.sum(tl.where(offs_m[:, None] <= slide_end[None, :], g, 0.0), 0)
            if tile_last_q >= start_m:
                lse_m = tl.load(LSE_M + row + offs_m, mask=in_rows, other=0.0)
                visible = causal & (offs_m[:, None] <= last_q[None, :])
                p = tl.where(visible, tl.math.exp2(s - lse_m[:, None]), 0.0)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
                ds = p * dp_minus_delta
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    in_keys = offs_n < T
    tl.store(DK + kv * T * D + offs_n[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=in_keys[:, None])
    tl.store(DV + kv * T * D + offs_n[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=in_keys[:, None])
    tl.store(COLSUM + (kv * 4 + 0) * T + offs_n, c_all, mask=in_keys)
    tl.store(COLSUM + (kv * 4 + 1) * T + offs_n, c_seg, mask=in_keys)
    tl.store(COLSUM + (kv * 4 + 2) * T + offs_n, c_next, mask=in_keys)
    tl.store(COLSUM + (kv * 4 + 3) * T + offs_n, c_slide, mask=in_keys)


@triton.jit
def _nats_bwd_dq_kernel(Q, K, V, DO, LSE_M, LSE_F, DELTA, DQ, LOCAL_ROWSUM,
                        LAST_Q, TILE_LAST_Q, KIND,
                        sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t,
                        H, H_KV, T, N_TILES, scale_log2, scale,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        PRECISION: tl.constexpr):
    """dQ for one query tile, and R_i = sum of G_ij over the visible Local keys of row i
    (for the cross term X of non-Global tokens). Only tiles with something visible."""
    start_m = tl.program_id(0) * BLOCK_M
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    hkv = h // (H // H_KV)
    kv = b * H_KV + hkv
    row = (b * H + h) * T
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    in_rows = offs_m < T
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :], mask=in_rows[:, None], other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_t + offs_d[None, :], mask=in_rows[:, None], other=0.0)
    lse_m = tl.load(LSE_M + row + offs_m, mask=in_rows, other=0.0)
    lse_f = tl.load(LSE_F + row + offs_m, mask=in_rows, other=0.0)
    delta = tl.load(DELTA + row + offs_m, mask=in_rows, other=0.0)
    K += b * sk_b + hkv * sk_h
    V += b * sv_b + hkv * sv_h
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    local_rowsum = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):
        if tl.load(TILE_LAST_Q + kv * N_TILES + start_n // BLOCK_N) >= start_m:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = tl.load(K + offs_n[:, None] * sk_t + offs_d[None, :], mask=offs_n[:, None] < T, other=0.0)
            v = tl.load(V + offs_n[:, None] * sv_t + offs_d[None, :], mask=offs_n[:, None] < T, other=0.0)
            last_q = tl.load(LAST_Q + kv * T + offs_n, mask=offs_n < T, other=-1)
            is_local = tl.load(KIND + kv * T + offs_n, mask=offs_n < T, other=-1) == 1
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] <= last_q[None, :])
            dp_minus_delta = tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None]
            ds = tl.where(visible, tl.math.exp2(s - lse_m[:, None]), 0.0) * dp_minus_delta
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
            pi_local = tl.where(visible & is_local[None, :], tl.math.exp2(s - lse_f[:, None]), 0.0)
            local_rowsum += tl.sum(pi_local * dp_minus_delta, 1)
    tl.store(DQ + (b * H + h) * T * D + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=in_rows[:, None])
    tl.store(LOCAL_ROWSUM + row + offs_m, local_rowsum, mask=in_rows)


# -----------------------------------------------------------------------------
# The autograd wrapper: O(T) metadata in, the kernels, the type gradients out

BLOCK_M, BLOCK_N = 64, 64
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def key_metadata(token_types, window):
    """Per (batch, KV head, key) integers the kernels rebuild the mask and the type gradients from."""
    B, H_kv, T, _ = token_types.shape
    kind = token_types.detach().argmax(-1)
    is_global = kind == GLOBAL
    pos = torch.arange(T, device=kind.device)
    last_q = last_visible_query(token_types.detach(), window)
    # seg_end: the next Global strictly after j (T-1 if none), the last row a Local j would see;
    # next_seg_end: where the following segment ends, if seg_end is a Global that closes it.
    f = next_global(is_global)
    seg_end = F.pad(f[..., 1:], (0, 1), value=T).clamp(max=T - 1)
    seg_end_is_global = is_global.gather(-1, seg_end) & (seg_end > pos)
    next_seg_end = torch.where(seg_end_is_global, seg_end.gather(-1, seg_end), seg_end)
    # inference: Global keys gathered into a sorted list, Local/Sliding keys in their tiles
    global_pos = torch.where(is_global, pos, T).sort(-1).values
    n_global_upto = is_global.cumsum(-1)
    last_q_local = torch.where(is_global, -1, last_q)
    as_int = lambda t: t.to(torch.int32).contiguous()
    return dict(kind=as_int(kind), last_q=as_int(last_q), seg_end=as_int(seg_end),
                next_seg_end=as_int(next_seg_end), tile_last_q=as_int(tile_max(last_q)),
                global_pos=as_int(global_pos), n_global_upto=as_int(n_global_upto),
                last_q_local=as_int(last_q_local), tile_last_q_local=as_int(tile_max(last_q_local)))


def tile_max(last_q):
    """The latest query any key of each BLOCK_N tile reaches: tiles before a query tile whose
    value is smaller hold nothing visible to it."""
    T = last_q.shape[-1]
    padded = F.pad(last_q, (0, -T % BLOCK_N), value=-1)
    return padded.view(*last_q.shape[:-1], -1, BLOCK_N).amax(-1)


def _launch_forward(q, k, v, meta, training):
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse_m = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    lse_f = torch.empty_like(lse_m) if training else lse_m
    last_q, tile_last_q = ((meta["last_q"], meta["tile_last_q"]) if training
                           else (meta["last_q_local"], meta["tile_last_q_local"]))
    grid = (triton.cdiv(T, BLOCK_M), B * H)
    _nats_fwd_kernel[grid](
        q, k, v, o, lse_m, lse_f, last_q, tile_last_q, meta["global_pos"], meta["n_global_upto"],
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        H, H_kv, T, tile_last_q.shape[-1], D**-0.5 * LOG2E,
        D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, TRAINING=training, PRECISION=_precision(q),
        num_warps=4, num_stages=2)
    return o, lse_m, lse_f


def _launch_backward(q, k, v, o, do, lse_m, lse_f, meta, window):
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    delta = (do.float() * o.float()).sum(-1)  # Dl_i = dO_i . O_i
    dq = torch.empty(B, H, T, D, device=q.device, dtype=q.dtype)
    dk = torch.empty(B, H_kv, T, D, device=q.device, dtype=k.dtype)
    dv = torch.empty_like(dk)
    colsum = torch.empty(B, H_kv, 4, T, device=q.device, dtype=torch.float32)
    local_rowsum = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    common = dict(D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PRECISION=_precision(q), num_warps=4, num_stages=2)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    _nats_bwd_dkdv_kernel[(triton.cdiv(T, BLOCK_N), B * H_kv)](
        q, k, v, do, lse_m, lse_f, delta, dk, dv, colsum, meta["last_q"], meta["seg_end"], meta["next_seg_end"],
        *strides, H, H_kv, T, window, D**-0.5 * LOG2E, D**-0.5, **common)
    _nats_bwd_dq_kernel[(triton.cdiv(T, BLOCK_M), B * H)](
        q, k, v, do, lse_m, lse_f, delta, dq, local_rowsum, meta["last_q"], meta["tile_last_q"], meta["kind"],
        *strides, H, H_kv, T, meta["tile_last_q"].shape[-1], D**-0.5 * LOG2E, D**-0.5, **common)
    diag = _diagonal_of_g(q, k, v, do, delta, lse_f)
    return dq, dk, dv, type_gradients(colsum, local_rowsum.view(B, H_kv, H // H_kv, T).sum(2), diag, meta)


def _diagonal_of_g(q, k, v, do, delta, lse_f):
    """G_jj = pi_jj (dP_jj - Dl_j), summed over each KV head's query heads: [B, H_kv, T]."""
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    shape = (B, H_kv, H // H_kv, T, D)
    s_diag = (q.float().view(shape) * k.float().unsqueeze(2)).sum(-1) * (D**-0.5 * LOG2E)
    dp_diag = (do.float().view(shape) * v.float().unsqueeze(2)).sum(-1)
    g = torch.exp2(s_diag - lse_f.view(shape[:4])) * (dp_diag - delta.view(shape[:4]))
    return g.sum(2)


def type_gradients(colsum, local_rowsum, diag, meta):
    """Spec section 3's per-token gradients from O(T) sums the kernels produced.

    c_all, c_seg, c_next, c_slide: column sums of G up to T-1, the segment end F_j, the next
    segment's end, and j + W. dl = c_seg, ds = c_slide, dg = c_all - X with the cross term
      Global j:      X_j = sum over the Local j' it closes of (c_next - c_seg)_j'
      non-Global j:  X_j = sum_{j' in (p_j, j)} l_j' c_seg_j' - sum_{i in (p_j, j]} R_i + l_j G_jj
    where p_j is the last Global before j and R_i sums G over the visible Local keys of row i
    (an inclusion-exclusion of the entries with j' < j < i inside j's segment).
    """
    c_all, c_seg, c_next, c_slide = colsum.double().unbind(2)
    kind, seg_end = meta["kind"].long(), meta["seg_end"].long()
    is_global, is_local = kind == GLOBAL, kind == LOCAL
    T = kind.shape[-1]
    pos = torch.arange(T, device=kind.device)
    prev_global = F.pad(torch.where(is_global, pos, -1).cummax(-1).values[..., :-1], (1, 0), value=-1)
    closes = is_local & is_global.gather(-1, seg_end) & (seg_end > pos)
    x_global = torch.zeros_like(c_all).scatter_add(-1, seg_end, torch.where(closes, c_next - c_seg, 0.0))
    prefix = lambda x: F.pad(x.cumsum(-1), (1, 0))  # prefix(x)[k] = sum_{t < k} x_t
    col, row = prefix(torch.where(is_local, c_seg, 0.0)), prefix(local_rowsum.double())
    start = prev_global + 1
    x_other = (col[..., :T] - col.gather(-1, start)) - (row[..., 1:] - row.gather(-1, start)) \
        + torch.where(is_local, diag.double(), 0.0)
    cross = torch.where(is_global, x_global, x_other)
    return torch.stack([c_all - cross, c_seg, c_slide], dim=-1)


def _precision(q):
    return "ieee" if q.dtype == torch.float32 else "tf32"


class NAtSAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, token_types, window):
        meta = key_metadata(token_types, window)
        o, lse_m, lse_f = _launch_forward(q, k, v, meta, training=True)
        ctx.save_for_backward(q, k, v, o, lse_m, lse_f)
        ctx.meta, ctx.window, ctx.types_dtype = meta, window, token_types.dtype
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse_m, lse_f = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq, dk, dv, dtypes = _launch_backward(q, k, v, o, do, lse_m, lse_f, ctx.meta, ctx.window)
        return dq, dk, dv, dtypes.to(ctx.types_dtype), None


def nats_attention_triton(q, k, v, token_types, window):
    """The Triton kernel behind nats_attention: training forward + backward, or inference forward."""
    B, H, T, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"the Triton kernel supports head_dim in {SUPPORTED_HEAD_DIMS}, got {D}; "
                         f"pass impl='reference' for other sizes")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the Triton kernel supports {SUPPORTED_DTYPES}, got {q.dtype}; "
                         f"pass impl='reference' for float64")
    if not (q.is_cuda or INTERPRETING):
        raise ValueError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before import); "
                         "pass impl='reference' on CPU")
    if INTERPRETING and q.dtype == torch.bfloat16:  # the interpreter's bf16 arithmetic is wrong
        return nats_attention_triton(q.float(), k.float(), v.float(), token_types, window).to(q.dtype)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, token_types)):
        return NAtSAttention.apply(q, k, v, token_types, window)
    return _launch_forward(q, k, v, key_metadata(token_types, window), training=False)[0]


# -----------------------------------------------------------------------------
# The public entry point


def check_inputs(q, k, v, token_types, window):
    """Raise a ValueError that says what to pass instead of a malformed input."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-d [batch, heads, seq, head_dim]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (T, D):
        raise ValueError(f"k and v must both be [batch={B}, kv_heads, seq={T}, head_dim={D}] to match "
                         f"q {tuple(q.shape)}; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if H_kv == 0 or H % H_kv:
        raise ValueError(f"the {H} query heads must split evenly over the {H_kv} KV heads")
    if token_types.shape != (B, H_kv, T, 3):
        raise ValueError(f"token_types must be one-hot [batch, kv_heads, seq, 3] = {(B, H_kv, T, 3)}; "
                         f"got {tuple(token_types.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not token_types.dtype.is_floating_point:
        raise ValueError(f"token_types must be floating (one-hot, carrying gradients); got {token_types.dtype}")
    if len({q.device, k.device, v.device, token_types.device}) != 1:
        raise ValueError(f"all inputs must be on one device; got q {q.device}, k {k.device}, "
                         f"v {v.device}, token_types {token_types.device}")
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0; got {window!r}")


def nats_attention(q, k, v, token_types, window, impl="auto"):
    """NAtS attention: see nats_attention_reference for the arguments.

    impl: "triton" (the kernel), "reference" (plain PyTorch, O(T^2) memory), or "auto": the
    kernel on CUDA, the reference elsewhere.
    """
    check_inputs(q, k, v, token_types, window)
    if impl == "auto":
        impl = "triton" if q.is_cuda else "reference"
    if impl == "triton":
        return nats_attention_triton(q, k, v, token_types, window)
    if impl == "reference":
        return nats_attention_reference(q, k, v, token_types, window)
    raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")


# -----------------------------------------------------------------------------
# Benchmark: python kernel.py on a GPU


def benchmark(lengths=(1024, 4096, 8192, 16384), head_dims=(64, 128), batch=2, heads=16, window=16):
    """One table, everything timed in this run with triton.testing.do_bench (median): this kernel,
    dense causal SDPA, FlexAttention with the same mask, and the reference where it fits."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention)
    mixes = {"5/15/80": (0.05, 0.15, 0.80), "20/40/40": (0.2, 0.4, 0.4), "all G": (1.0, 0.0, 0.0)}
    bench = lambda fn, grads=(): triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=list(grads),
                                                        return_mode="median")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16, "
          f"B={batch} H={heads} W={window}; ratio = time / dense SDPA (same pass); TFLOP/s counts a dense "
          f"causal attention's FLOPs (fwd 2 B H T^2 D, fwd+bwd 3.5x that)")
    print(f"| {'D':>3} | {'T':>5} | {'mix':8} | {'kv':>5} | {'what':28} | {'ms':>8} | {'ratio':>6} | {'TFLOP/s':>7} |")
    print("|" + "|".join("-" * w for w in (5, 7, 10, 7, 30, 10, 8, 9)) + "|")
    for D in head_dims:
        for T in lengths:
            gen = torch.Generator(device="cuda").manual_seed(T + D)
            q, k, v, do = (torch.randn(batch, heads, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
                           for _ in range(4))
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            fwd_flops = 2 * batch * heads * T * T * D

            def row(mix, kv, what, ms, base_ms, flops):
                print(f"| {D:>3} | {T:>5} | {mix:8} | {kv:>5} | {what:28} | {ms:8.3f} | {ms / base_ms:6.2f} | "
                      f"{flops / ms / 1e9:7.1f} |", flush=True)

            sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
            dense_fwd = bench(sdpa)
            dense_fb = bench(lambda: sdpa().backward(do), (q, k, v))
            row("-", "1.00", "dense SDPA fwd", dense_fwd, dense_fwd, fwd_flops)
            row("-", "1.00", "dense SDPA fwd+bwd", dense_fb, dense_fb, 3.5 * fwd_flops)
            for mix, probs in mixes.items():
                kind = torch.multinomial(torch.tensor(probs, device="cuda"), batch * heads * T, replacement=True,
                                         generator=gen).view(batch, heads, T)
                kind[..., 0] = GLOBAL
                types = F.one_hot(kind, 3).to(torch.bfloat16).requires_grad_()
                kv = f"{kv_lengths(types.detach().float(), window).sum().item() / (batch * heads * T * (T + 1) / 2):.2f}"
                nats = lambda: nats_attention(q, k, v, types, window)
                row(mix, kv, "NAtS train fwd", bench(nats), dense_fwd, fwd_flops)
                row(mix, kv, "NAtS fwd+bwd (with dtypes)", bench(lambda: nats().backward(do), (q, k, v, types)),
                    dense_fb, 3.5 * fwd_flops)
                with torch.no_grad():
                    row(mix, kv, "NAtS inference fwd", bench(nats), dense_fwd, fwd_flops)
                last_q = last_visible_query(types.detach(), window)
                mask_mod = lambda b, h, i, j: (j <= i) & (i <= last_q[b, h, j])
                build = lambda: create_block_mask(mask_mod, batch, heads, T, T, device="cuda")
                block_mask = build()
                flex_fwd = lambda: flex(q, k, v, block_mask=block_mask)
                row(mix, kv, "Flex fwd", bench(flex_fwd), dense_fwd, fwd_flops)
                row(mix, kv, "Flex fwd+bwd (no dtypes)", bench(lambda: flex_fwd().backward(do), (q, k, v)),
                    dense_fb, 3.5 * fwd_flops)
                row(mix, kv, "Flex block-mask build", bench(build), dense_fwd, fwd_flops)
                if T <= 4096:  # the reference holds several B x H x T x T float32 tensors
                    ref = lambda: nats_attention(q, k, v, types, window, impl="reference")
                    row(mix, kv, "reference fwd+bwd", bench(lambda: ref().backward(do), (q, k, v, types)),
                        dense_fb, 3.5 * fwd_flops)
                del types, block_mask
            del q, k, v, do
            torch.cuda.empty_cache()


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("the benchmark needs a CUDA GPU; the tests (pytest) check the kernel on CPU")
    benchmark()
