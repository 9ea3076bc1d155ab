"""
NAtS sparse attention: the plain-PyTorch reference, the Triton kernel, and their benchmark.

Every key j carries a one-hot type per KV head (0 Global, 1 Local, 2 Sliding) that decides
which later queries may see it (README, "How NAtS works"):

    Global   seen by every later query
    Local    seen up to and including the next Global token's own query
    Sliding  seen by the W+1 queries j .. j+W

So key j is visible to exactly the queries j .. last_visible_query[j]: one integer per key
describes the whole mask. The reference below builds the full T x T relaxed mask instead, so
that autograd gives the token types the gradient the method defines; the kernel must return
the same values and gradients from O(T) integers per (batch, KV head).
"""
import functools
import math
import numbers
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton wheels for macOS or Windows: the reference and the model still work

    class _NoTriton:
        """Stands in for triton and triton.language so the kernels below can be defined;
        nats_attention(impl="triton") says what is missing before one is called."""
        constexpr = None
        jit = staticmethod(lambda fn: fn)
        autotune = staticmethod(lambda *args, **kwargs: (lambda fn: fn))
        Config = staticmethod(lambda *args, **kwargs: None)

    triton = tl = _NoTriton
    HAS_TRITON = False
else:
    HAS_TRITON = True

GLOBAL, LOCAL, SLIDING = 0, 1, 2
LOG2E = math.log2(math.e)

# -----------------------------------------------------------------------------
# O(T) per-key metadata shared by the model, the kernel and the tests


def next_global(is_global):
    """f_j: the first Global position >= j, or T if none. is_global: bool [..., T] -> long [..., T]."""
    if not isinstance(is_global, torch.Tensor) or is_global.dtype != torch.bool or is_global.dim() < 1:
        got = (f"{is_global.dtype} of shape {tuple(is_global.shape)}" if isinstance(is_global, torch.Tensor) else
               type(is_global).__name__)
        raise ValueError(f"is_global must be a bool tensor [..., T] (True at Global tokens), e.g. "
                         f"token_types.argmax(-1) == GLOBAL; got {got}")
    T = is_global.shape[-1]
    pos = torch.arange(T, device=is_global.device).expand_as(is_global)
    candidate = torch.where(is_global, pos, torch.full_like(pos, T))
    return candidate.flip(-1).cummin(-1).values.flip(-1)


def reach_by_type(token_types, window):
    """The last query that would see key j as each type: long [..., T, 3] (README, How NAtS
    works, "Mask").

    Global: the end; Local: the next Global token (inclusive, from the hard types); Sliding: j + W.
    Raises ValueError for a window or types check_mask_args refuses.
    """
    check_mask_args(token_types, window)
    T = token_types.shape[-2]
    pos = torch.arange(T, device=token_types.device)
    local = next_global(token_types.argmax(-1) == GLOBAL).clamp(max=T - 1)
    sliding = (pos + min(window, T)).clamp(max=T - 1)  # a window past the sequence is the sequence: no overflow
    return torch.stack(torch.broadcast_tensors(torch.full_like(local, T - 1), local, sliding), dim=-1)


def check_mask_args(token_types, window):
    """Raise a ValueError for what the mask functions, nats_attention and its reference refuse:
    types that are not one-hot floats [..., T, 3] (the values read on the CPU only: on CUDA the
    read would sync every call), a window that is not an int >= 0."""
    if not isinstance(token_types, torch.Tensor) or token_types.dim() < 2 or token_types.shape[-1] != 3 \
            or not token_types.is_floating_point():
        raise ValueError(f"token_types must be one-hot floats [..., T, 3] (Global, Local, Sliding); got "
                         f"{getattr(token_types, 'dtype', type(token_types))} of shape "
                         f"{tuple(getattr(token_types, 'shape', ()))}; for type ids pass F.one_hot(kinds, 3).float()")
    if token_types.device.type == "cpu" and not torch.compiler.is_compiling() and not is_one_hot(token_types):
        raise ValueError("token_types must be one-hot along the last dim (a straight-through estimate such as "
                         "F.gumbel_softmax(logits, hard=True) is one); for probabilities pass "
                         "F.one_hot(probs.argmax(-1), 3).float()")
    check_window(window)


def last_visible_query(token_types, window):
    """The last query that sees key j: key j is visible to queries j .. this. Returns long [..., T].
    Integers hold no NaN: a NaN type reads as its argmax, Global (nats_attention and kv_lengths
    give NaN for it)."""
    return reach_by_type(token_types, window).gather(-1, token_types.argmax(-1, keepdim=True)).squeeze(-1)


def visible_mask(token_types, window):
    """The hard mask: bool [..., T, T], True where query i sees key j (NaN types: see last_visible_query)."""
    last = last_visible_query(token_types, window).unsqueeze(-2)  # checks the arguments first
    T = token_types.shape[-2]
    i = torch.arange(T, device=token_types.device)[:, None]
    j = torch.arange(T, device=token_types.device)[None, :]
    return (j <= i) & (i <= last)


def kv_lengths(token_types, window):
    """Column lengths n_j (README, How NAtS works, "Regulariser"): how many queries see key j.

    The length of each type comes from the hard types (no gradient through f_j); the one-hot
    types carry the straight-through gradient, so the sparsity term trains the scorer. NaN types
    give NaN lengths (see nats_attention). Returns [..., T], float32 (float64 for float64 types):
    bfloat16 would round a length of 299 to 300.
    """
    reach = reach_by_type(token_types, window)  # checks the arguments first
    pos = torch.arange(token_types.shape[-2], device=token_types.device)[:, None]
    lengths = reach - pos + 1
    acc = torch.promote_types(token_types.dtype, torch.float32)
    return (token_types.to(acc) * lengths.to(acc)).sum(-1)


# -----------------------------------------------------------------------------
# The reference: the method in plain PyTorch, O(T^2) memory


def relaxed_mask(token_types, window):
    """M_ij(y) = [i >= j] (g_j + l_j prod_{j<k<i} (1 - g_k) + s_j [i - j <= W]) (README, How NAtS
    works, "Relaxation").

    Equals the hard mask at one-hot y = (g, l, s). The product is one cumprod down the rows: row i
    multiplies in (1 - g_{i-1}) for every column j < i - 1.
    """
    check_mask_args(token_types, window)
    y_g, y_l, y_s = token_types.unbind(-1)
    T = y_g.shape[-1]
    window = min(window, T)  # the same mask, and no integer overflow for a huge one
    i = torch.arange(T, device=y_g.device)[:, None]
    j = torch.arange(T, device=y_g.device)[None, :]
    g_prev = F.pad(y_g, (1, 0))[..., :-1, None]  # g_{i-1} for row i
    local_alive = torch.where(i - 1 > j, 1 - g_prev, torch.ones_like(g_prev)).cumprod(-2)
    mask = y_g[..., None, :] + y_l[..., None, :] * local_alive + y_s[..., None, :] * (i - j <= window)
    return mask * (j <= i)


def nats_attention_reference(q, k, v, token_types, window):
    """NAtS attention in plain PyTorch; autograd gives q, k, v and the token types their gradients.

    q: [B, H, T, D]; k, v: [B, H_kv, T, D] with H % H_kv == 0 (query heads of a group share
    their KV head's types); token_types: one-hot float [B, H_kv, T, 3]. Returns [B, H, T, D].
    The products run in the input dtype (q scaled by 1/sqrt(D) first, so float16 scores stay
    finite as long as the true ones do), the softmax and the mask in float32 (float64 for
    float64 inputs).

    The output is a softmax over the visible keys alone, computed in log space: a masked key
    whose score dwarfs the visible ones cannot underflow them. The relaxed mask M enters
    through a term whose value is zero and whose gradient is the bounded form of dL/dM,
    G_ij = pi_ij (dP_ij - Dl_i), with pi the causal softmax (README, How NAtS works,
    "Relaxation").
    Raises ValueError for what nats_attention refuses (check_inputs).
    """
    check_inputs(q, k, v, token_types, window)
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    q = q.reshape(B, H_kv, H // H_kv, T, D) * D**-0.5  # grouped-query heads: [B, H_kv, group, T, D]
    k, v = k.unsqueeze(2), v.unsqueeze(2)
    scores = (q @ k.transpose(-1, -2)).to(acc)
    mask = relaxed_mask(token_types.to(acc), window).unsqueeze(2)
    visible = visible_mask(token_types, window).unsqueeze(2)  # from the argmax types, as the kernel
    attn = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    pi = torch.softmax(scores.detach().masked_fill(~causal, float("-inf")), dim=-1)
    # d/dM of (dm - attn * sum dm) summed against dP is pi_ij dP_ij - pi_ij sum_k attn_ik dP_ik
    dm = (mask - mask.detach()) * pi
    attn = attn + dm - attn.detach() * dm.sum(-1, keepdim=True)
    return (attn.to(v.dtype) @ v).reshape(B, H, T, D)


# -----------------------------------------------------------------------------
# The Triton kernel: never a T x T tensor in memory, only O(T) integers per (batch, KV head)
#
# For a query i and a key j <= i the causal triangle splits into three regions:
#   Global columns  j Global: seen by every later query. Few, so they are gathered into a list
#                   and read like a short dense attention.
#   the band        j not Global and i <= reach_j: Local keys up to their segment end, Sliding
#                   keys up to j + W. It lies near the diagonal; per-tile maxima of reach_j tell
#                   a query tile which key tiles can still hold something visible to it.
#   far             the rest, most of the triangle at a low kv share. Only training visits it:
#                   the forward for LSE_F, the log-sum-exp over all causal keys whose softmax
#                   pi gives the mask gradient G_ij = pi_ij (dP_ij - Dl_i); the backward for the
#                   column sums of G, which one tensor-core product per tile gives there:
#                   sum_i G_ij = v_j . (pi^T dO)_j - (pi^T Dl)_j.
# Softmaxes run in the log2 domain (exp2 with log2(e) folded into the scale). The visible sum
# keeps its own running max (LSE_M), apart from LSE_F: a masked key with a huge score must not
# underflow the visible ones.

REACH_GROUP = 16  # keys per entry of the per-tile reach maxima (_tile_max spells it out: jit code
                  # reads no Python globals); every BLOCK_N is a multiple of it
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(shapes):
    """Autotune configs from (BLOCK_M, BLOCK_N, num_warps, num_stages): queries x keys per tile.
    The interpreter runs one config, and small tiles there exercise every loop at test sizes."""
    if INTERPRETING:
        shapes = [(16, 16, 4, 1)]
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s) for m, n, w, s in shapes]


# The autotuner's candidates; on an H200 it picked 64 x 64 tiles, 128 x 64 for the training
# forward at T = 8192 (results/kernel.md). The forward and dQ walk key tiles for a query tile
# and need BLOCK_M % BLOCK_N == 0; the dK/dV kernels walk query tiles for a key tile and need
# BLOCK_N % BLOCK_M == 0, so one diagonal stretch of tiles holds every causal mask.
FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)])
DQ_CONFIGS = _configs([(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)])
DKDV_CONFIGS = _configs([(64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3)])
# The inference forward (a prompt's prefill) runs one config without a search, so a user's first
# sample waits for one compile, not four compiles and their timing; the autotuner's pick there.
FWD_INFERENCE = FWD_CONFIGS[-1]


@triton.jit
def _head(PTR, z, h, stride_z, stride_h):
    """PTR moved to batch z, head h of a strided [B, heads, ...] tensor. int64: z x stride_z can
    pass 2^31 for large inputs."""
    return PTR + tl.cast(z, tl.int64) * stride_z + tl.cast(h, tl.int64) * stride_h


@triton.jit
def _query_head(H, H_KV):
    """Grid axis 1 runs over batch x query heads: this program's batch, query head and KV head."""
    z, h = tl.program_id(1) // H, tl.program_id(1) % H
    return z, h, h // (H // H_KV)


@triton.jit
def _rows(PTR, offs, stride_t, offs_d, T):
    """Rows offs of a [T, D] matrix as a [len(offs), D] tile, zeros past T. int64 offsets:
    row x stride can pass 2^31 for large or strided inputs."""
    return tl.load(PTR + offs.to(tl.int64)[:, None] * stride_t + offs_d[None, :], mask=offs[:, None] < T,
                   other=0.0)


@triton.jit
def _scores(q, K, offs_n, stride_kt, offs_d, T, scale_log2, PRECISION: tl.constexpr):
    """The scores of the queries q against the keys offs_n, in the log2 domain: [BLOCK_M, len(offs_n)]."""
    return tl.dot(q, tl.trans(_rows(K, offs_n, stride_kt, offs_d, T)), input_precision=PRECISION) * scale_log2


@triton.jit
def _band_visible(i, j, last_q, CAUSAL: tl.constexpr):
    """Whether query i sees the Local or Sliding key j, whose last query is last_q (its segment end
    or j + W; -1 for a Global, which the band never shows). i and j broadcast against each other:
    [BLOCK_M, 1] queries and [1, BLOCK_N] keys, or transposed. CAUSAL also asks j <= i, which only
    a tile on the diagonal can break."""
    visible = i <= last_q
    if CAUSAL:
        visible = visible & (j <= i)
    return visible


@triton.jit
def _tile_max(BOUND, start_n, N_GROUPS, BLOCK_N: tl.constexpr):
    """The largest per-key bound of the keys start_n .. start_n + BLOCK_N, from maxima per 16 keys."""
    groups = start_n // 16 + tl.arange(0, BLOCK_N // 16)
    return tl.max(tl.load(BOUND + groups, mask=groups < N_GROUPS, other=-1), 0)


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
def _lse_update(mf_i, lf_i, s):
    """Online log-sum-exp (log2) of the scores s [BLOCK_M, BLOCK_N] into the running max and sum."""
    mf_new = tl.maximum(mf_i, tl.max(s, 1))
    return mf_new, lf_i * tl.math.exp2(mf_i - mf_new) + tl.sum(tl.math.exp2(s - mf_new[:, None]), 1)


@triton.jit
def _globals_before(N_GLOBAL_UPTO, start_m):
    """The number of Global keys before position start_m."""
    return tl.load(N_GLOBAL_UPTO + tl.maximum(start_m - 1, 0), mask=start_m > 0, other=0)


@triton.jit
def _fwd_global_tile(acc, m_i, l_i, q, K, V, GLOBAL_POS, start_g, n_global, offs_m, offs_d, T, stride_kt, stride_vt,
                     scale_log2, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One tile of gathered Global keys into the output; MASKED where it may hold keys after a query."""
    offs_g = start_g + tl.arange(0, BLOCK_N)
    pos = tl.load(GLOBAL_POS + offs_g, mask=offs_g < n_global, other=T)  # T: never visible
    s = _scores(q, K, pos, stride_kt, offs_d, T, scale_log2, PRECISION)
    visible = (pos[None, :] <= offs_m[:, None]) if MASKED else True
    return _softmax_update(acc, m_i, l_i, s, visible, _rows(V, pos, stride_vt, offs_d, T), PRECISION)


@triton.jit
def _fwd_band_tile(acc, m_i, l_i, mf_i, lf_i, q, K, V, LAST_Q_LOCAL, REACH_LOCAL, start_n, start_m, offs_m,
                   offs_d, T, N_GROUPS, stride_kt, stride_vt, scale_log2, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, TRAINING: tl.constexpr, PRECISION: tl.constexpr):
    """A key tile of the band: its visible Local and Sliding entries into the output, if the tile
    reaches this far; in training also every causal entry into LSE_F, reached or not. CAUSAL where
    the tile may hold keys after a query (off the diagonal every key precedes every query)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if TRAINING:
        s = _scores(q, K, offs_n, stride_kt, offs_d, T, scale_log2, PRECISION)
        if CAUSAL:
            mf_i, lf_i = _lse_update(mf_i, lf_i, tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf")))
        else:
            mf_i, lf_i = _lse_update(mf_i, lf_i, s)
    if _tile_max(REACH_LOCAL, start_n, N_GROUPS, BLOCK_N) >= start_m:
        last_q = tl.load(LAST_Q_LOCAL + offs_n, mask=offs_n < T, other=-1)
        if not TRAINING:  # inference computes the scores only for the tiles that reach these queries
            s = _scores(q, K, offs_n, stride_kt, offs_d, T, scale_log2, PRECISION)
        visible = _band_visible(offs_m[:, None], offs_n[None, :], last_q[None, :], CAUSAL)
        acc, m_i, l_i = _softmax_update(acc, m_i, l_i, s, visible, _rows(V, offs_n, stride_vt, offs_d, T),
                                        PRECISION)
    return acc, m_i, l_i, mf_i, lf_i


@triton.autotune(configs=FWD_CONFIGS, key=["T_BUCKET", "D", "TRAINING"])
@triton.jit
def _nats_fwd(Q, K, V, OUT, LSE_M, LSE_F, LAST_Q_LOCAL, REACH_LOCAL, BAND_START, GLOBAL_POS, N_GLOBAL_UPTO,
              stride_qz, stride_qh, stride_qt, stride_kz, stride_kh, stride_kt,
              stride_vz, stride_vh, stride_vt, stride_oz, stride_oh, stride_ot,
              H, H_KV, T, N_GROUPS, T_BUCKET, scale_log2,
              D: tl.constexpr, TRAINING: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """O and LSE_M (log2) for one query tile of one head; LSE_F too when TRAINING."""
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # the longest rows first: a shorter tail
    end_m = tl.minimum(start_m + BLOCK_M, T)
    z, h, h_kv = _query_head(H, H_KV)
    zh = (z * H + h).to(tl.int64)  # this head's row of LSE_M and LSE_F
    zh_kv = (z * H_KV + h_kv).to(tl.int64)  # its KV head's row of the metadata
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = _rows(_head(Q, z, h, stride_qz, stride_qh), offs_m, stride_qt, offs_d, T)
    K = _head(K, z, h_kv, stride_kz, stride_kh)
    V = _head(V, z, h_kv, stride_vz, stride_vh)
    LAST_Q_LOCAL += zh_kv * T
    REACH_LOCAL += zh_kv * N_GROUPS
    BAND_START += zh_kv * T
    GLOBAL_POS += zh_kv * T
    N_GLOBAL_UPTO += zh_kv * T
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # 1. the Global keys before this tile's last query, from their gathered list; whole tiles of
    #    Globals before its first query need no mask
    n_masked_from = _globals_before(N_GLOBAL_UPTO, start_m) // BLOCK_N * BLOCK_N
    n_global = tl.load(N_GLOBAL_UPTO + end_m - 1)
    for start_g in range(0, n_masked_from, BLOCK_N):
        acc, m_i, l_i = _fwd_global_tile(acc, m_i, l_i, q, K, V, GLOBAL_POS, start_g, n_global, offs_m, offs_d,
                                         T, stride_kt, stride_vt, scale_log2, BLOCK_N, False, PRECISION)
    for start_g in range(n_masked_from, n_global, BLOCK_N):
        acc, m_i, l_i = _fwd_global_tile(acc, m_i, l_i, q, K, V, GLOBAL_POS, start_g, n_global, offs_m, offs_d,
                                         T, stride_kt, stride_vt, scale_log2, BLOCK_N, True, PRECISION)
    # 2. the far tiles: before band_lo, the first key tile any Local or Sliding key reaches this
    #    query tile from, nothing is visible (LAST_Q_LOCAL is -1 for Globals). Inference skips
    #    them; training sweeps them for LSE_F alone: one product and one exp per entry, no mask,
    #    no branch.
    band_lo = tl.minimum(tl.load(BAND_START + start_m) // BLOCK_N * BLOCK_N, start_m)
    mf_i = tl.full([BLOCK_M], -1e30, tl.float32)  # LSE_F's running max and sum (TRAINING only)
    lf_i = tl.zeros([BLOCK_M], tl.float32)
    if TRAINING:
        for start_n in range(0, band_lo, BLOCK_N):
            s = _scores(q, K, start_n + tl.arange(0, BLOCK_N), stride_kt, offs_d, T, scale_log2, PRECISION)
            mf_i, lf_i = _lse_update(mf_i, lf_i, s)
    # 3. the band: Local and Sliding keys, up to the diagonal. Training leaves the causal mask to
    #    the diagonal tiles, which spares LSE_F's sweep of the others a compare per entry;
    #    inference masks every tile in the second loop alone (the first runs no tile): split in
    #    two, its short band pipelined worse, 30% slower at D = 64, T = 8192 on an H200
    causal_from = start_m if TRAINING else band_lo
    for start_n in range(band_lo, causal_from, BLOCK_N):
        acc, m_i, l_i, mf_i, lf_i = _fwd_band_tile(
            acc, m_i, l_i, mf_i, lf_i, q, K, V, LAST_Q_LOCAL, REACH_LOCAL, start_n, start_m, offs_m, offs_d,
            T, N_GROUPS, stride_kt, stride_vt, scale_log2, BLOCK_N, False, TRAINING, PRECISION)
    for start_n in range(causal_from, end_m, BLOCK_N):
        acc, m_i, l_i, mf_i, lf_i = _fwd_band_tile(
            acc, m_i, l_i, mf_i, lf_i, q, K, V, LAST_Q_LOCAL, REACH_LOCAL, start_n, start_m, offs_m, offs_d,
            T, N_GROUPS, stride_kt, stride_vt, scale_log2, BLOCK_N, True, TRAINING, PRECISION)
    if TRAINING:
        tl.store(LSE_F + zh * T + offs_m, mf_i + tl.math.log2(lf_i), mask=offs_m < T)
    l_i = tl.where(offs_m < T, l_i, 1.0)  # rows past the end see nothing
    OUT = _head(OUT, z, h, stride_oz, stride_oh)
    tl.store(OUT + offs_m.to(tl.int64)[:, None] * stride_ot + offs_d[None, :],
             (acc / l_i[:, None]).to(OUT.dtype.element_ty), mask=offs_m[:, None] < T)
    tl.store(LSE_M + zh * T + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < T)


@triton.jit
def _dq_update(dq, q, do, lse_m, delta, k, v, visible, scale_log2, PRECISION: tl.constexpr):
    """dQ += dS K over one key tile: dS = P (dP - Dl) on the visible entries. Returns dQ, the
    scores and dP - Dl (the Local row sums reuse them)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None]
    ds = tl.where(visible, tl.math.exp2(s - lse_m[:, None]), 0.0) * dp
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION), s, dp


@triton.autotune(configs=DQ_CONFIGS, key=["T_BUCKET", "D"])
@triton.jit
def _nats_bwd_dq(Q, K, V, OUT, DO, LSE_M, LSE_F, DELTA, DQ, LOCAL_ROWSUM,
                 KIND, LAST_Q_LOCAL, REACH_LOCAL, BAND_START, GLOBAL_POS, N_GLOBAL_UPTO,
                 stride_qz, stride_qh, stride_qt, stride_kz, stride_kh, stride_kt,
                 stride_vz, stride_vh, stride_vt, stride_doz, stride_doh, stride_dot,
                 H, H_KV, T, N_GROUPS, T_BUCKET, scale_log2, scale,
                 D: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query tile (Global keys and the band only); Dl_i = dO_i . O_i, the row term every
    backward product subtracts, for the dK/dV kernels (OUT, the forward's O, has dO's strides);
    and R_i: the sum of G_ij over the visible Local keys of row i, for the cross term of the
    types' gradients."""
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # the longest rows first
    end_m = tl.minimum(start_m + BLOCK_M, T)
    z, h, h_kv = _query_head(H, H_KV)
    zh = (z * H + h).to(tl.int64)
    zh_kv = (z * H_KV + h_kv).to(tl.int64)
    row = zh * T
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = _rows(_head(Q, z, h, stride_qz, stride_qh), offs_m, stride_qt, offs_d, T)
    do = _rows(_head(DO, z, h, stride_doz, stride_doh), offs_m, stride_dot, offs_d, T)
    o = _rows(_head(OUT, z, h, stride_doz, stride_doh), offs_m, stride_dot, offs_d, T)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + row + offs_m, delta, mask=offs_m < T)
    lse_m = tl.load(LSE_M + row + offs_m, mask=offs_m < T, other=float("inf"))
    lse_f = tl.load(LSE_F + row + offs_m, mask=offs_m < T, other=float("inf"))
    K = _head(K, z, h_kv, stride_kz, stride_kh)
    V = _head(V, z, h_kv, stride_vz, stride_vh)
    KIND += zh_kv * T
    LAST_Q_LOCAL += zh_kv * T
    REACH_LOCAL += zh_kv * N_GROUPS
    GLOBAL_POS += zh_kv * T
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    local_rowsum = tl.zeros([BLOCK_M], tl.float32)
    n_global = tl.load(N_GLOBAL_UPTO + zh_kv * T + end_m - 1)
    for start_g in range(0, n_global, BLOCK_N):
        offs_g = start_g + tl.arange(0, BLOCK_N)
        pos = tl.load(GLOBAL_POS + offs_g, mask=offs_g < n_global, other=T)
        dq, s, dp = _dq_update(dq, q, do, lse_m, delta, _rows(K, pos, stride_kt, offs_d, T),
                               _rows(V, pos, stride_vt, offs_d, T), pos[None, :] <= offs_m[:, None],
                               scale_log2, PRECISION)
    # One loop over the band, diagonal tiles included: the causal test is all true off the diagonal
    band_lo = tl.minimum(tl.load(BAND_START + zh_kv * T + start_m) // BLOCK_N * BLOCK_N, start_m)
    for start_n in range(band_lo, end_m, BLOCK_N):
        if _tile_max(REACH_LOCAL, start_n, N_GROUPS, BLOCK_N) >= start_m:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            last_q = tl.load(LAST_Q_LOCAL + offs_n, mask=offs_n < T, other=-1)
            is_local = tl.load(KIND + offs_n, mask=offs_n < T, other=-1) == 1
            visible = _band_visible(offs_m[:, None], offs_n[None, :], last_q[None, :], True)
            dq, s, dp = _dq_update(dq, q, do, lse_m, delta, _rows(K, offs_n, stride_kt, offs_d, T),
                                   _rows(V, offs_n, stride_vt, offs_d, T), visible, scale_log2, PRECISION)
            pi_local = tl.where(visible & is_local[None, :], tl.math.exp2(s - lse_f[:, None]), 0.0)
            local_rowsum += tl.sum(pi_local * dp, 1)
    DQ += zh * T * D
    tl.store(DQ + offs_m.to(tl.int64)[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=offs_m[:, None] < T)
    tl.store(LOCAL_ROWSUM + row + offs_m, local_rowsum, mask=offs_m < T)


@triton.jit
def _dkdv_band_tile(dk, dv, c_all, c_seg, c_next, c_slide, c_diag, k, v, Q, DO, LSE_M, LSE_F, DELTA,
                    start_m, offs_n, offs_d, last_q, seg_end, next_seg_end, slide_end, reach, T,
                    stride_qt, stride_dot, scale_log2,
                    BLOCK_M: tl.constexpr, DIAGONAL: tl.constexpr, PRECISION: tl.constexpr):
    """A query tile in the band of a key tile, transposed ([keys, queries]): G on every causal
    entry into the column sums up to each limit; dK and dV from the visible Local and Sliding
    entries, if the tile's keys reach these queries."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _rows(Q, offs_m, stride_qt, offs_d, T)
    do = _rows(DO, offs_m, stride_dot, offs_d, T)
    lse_f = tl.load(LSE_F + offs_m, mask=offs_m < T, other=float("inf"))  # rows past T: pi = 0
    delta = tl.load(DELTA + offs_m, mask=offs_m < T, other=0.0)
    s = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2
    dp = tl.dot(v, tl.trans(do), input_precision=PRECISION) - delta[None, :]
    g = tl.math.exp2(s - lse_f[None, :]) * dp
    if DIAGONAL:
        g = tl.where(offs_n[:, None] <= offs_m[None, :], g, 0.0)
        c_diag += tl.sum(tl.where(offs_n[:, None] == offs_m[None, :], g, 0.0), 1)
    c_all += tl.sum(g, 1)
    c_seg += tl.sum(tl.where(offs_m[None, :] <= seg_end[:, None], g, 0.0), 1)
    c_next += tl.sum(tl.where(offs_m[None, :] <= next_seg_end[:, None], g, 0.0), 1)
    c_slide += tl.sum(tl.where(offs_m[None, :] <= slide_end[:, None], g, 0.0), 1)
    if reach >= start_m:
        lse_m = tl.load(LSE_M + offs_m, mask=offs_m < T, other=float("inf"))
        visible = _band_visible(offs_m[None, :], offs_n[:, None], last_q[:, None], DIAGONAL)
        p = tl.where(visible, tl.math.exp2(s - lse_m[None, :]), 0.0)
        dv += tl.dot(p.to(do.dtype), do, input_precision=PRECISION)
        dk += tl.dot((p * dp).to(q.dtype), q, input_precision=PRECISION)
    return dk, dv, c_all, c_seg, c_next, c_slide, c_diag


@triton.autotune(configs=DKDV_CONFIGS, key=["T_BUCKET", "D"])
@triton.jit
def _nats_bwd_dkdv(Q, K, V, DO, LSE_M, LSE_F, DELTA, DK, DV, COLSUM,
                   KIND, LAST_Q_LOCAL, SEG_END, NEXT_SEG_END, REACH_LOCAL, BAND_END,
                   stride_qz, stride_qh, stride_qt, stride_kz, stride_kh, stride_kt,
                   stride_vz, stride_vh, stride_vt, stride_doz, stride_doh, stride_dot,
                   H, H_KV, T, N_GROUPS, T_BUCKET, window, scale_log2, scale,
                   D: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For one key tile, over all query heads of its group: dK and dV of its Local and Sliding
    keys, and five column sums of G that give the types' gradients: up to T - 1 (c_all), the
    segment end (c_seg), the next segment's end (c_next), j + W (c_slide), and the diagonal.
    Diagonal and band tiles compute G entry by entry; far tiles add to c_all only, through
    pi^T [dO | Dl]: two products and one exp per entry."""
    start_n = tl.program_id(0) * BLOCK_N
    z, h_kv = tl.program_id(1) // H_KV, tl.program_id(1) % H_KV
    zh_kv = (z * H_KV + h_kv).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k = _rows(_head(K, z, h_kv, stride_kz, stride_kh), offs_n, stride_kt, offs_d, T)
    v = _rows(_head(V, z, h_kv, stride_vz, stride_vh), offs_n, stride_vt, offs_d, T)
    last_q = tl.load(LAST_Q_LOCAL + zh_kv * T + offs_n, mask=offs_n < T, other=-1)
    seg_end = tl.load(SEG_END + zh_kv * T + offs_n, mask=offs_n < T, other=-1)
    next_seg_end = tl.load(NEXT_SEG_END + zh_kv * T + offs_n, mask=offs_n < T, other=-1)
    slide_end = offs_n + window  # window <= T, so no overflow
    reach = _tile_max(REACH_LOCAL + zh_kv * N_GROUPS, start_n, N_GROUPS, BLOCK_N)
    band_end = _tile_max(BAND_END + zh_kv * N_GROUPS, start_n, N_GROUPS, BLOCK_N)
    far_start = tl.maximum((band_end // BLOCK_M + 1) * BLOCK_M, start_n + BLOCK_N)  # a query tile boundary
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    w = tl.zeros([BLOCK_N, D], tl.float32)  # far rows: pi^T dO
    u = tl.zeros([BLOCK_N], tl.float32)  # far rows: pi^T Dl
    c_all = tl.zeros([BLOCK_N], tl.float32)
    c_seg = tl.zeros([BLOCK_N], tl.float32)
    c_next = tl.zeros([BLOCK_N], tl.float32)
    c_slide = tl.zeros([BLOCK_N], tl.float32)
    c_diag = tl.zeros([BLOCK_N], tl.float32)
    group = H // H_KV
    for h in range(h_kv * group, h_kv * group + group):
        Qh = _head(Q, z, h, stride_qz, stride_qh)
        DOh = _head(DO, z, h, stride_doz, stride_doh)
        row = (z * H + h).to(tl.int64) * T
        for start_m in range(start_n, start_n + BLOCK_N, BLOCK_M):
            dk, dv, c_all, c_seg, c_next, c_slide, c_diag = _dkdv_band_tile(
                dk, dv, c_all, c_seg, c_next, c_slide, c_diag, k, v, Qh, DOh, LSE_M + row, LSE_F + row,
                DELTA + row, start_m, offs_n, offs_d, last_q, seg_end, next_seg_end, slide_end, reach, T,
                stride_qt, stride_dot, scale_log2, BLOCK_M, True, PRECISION)
        for start_m in range(start_n + BLOCK_N, far_start, BLOCK_M):
            dk, dv, c_all, c_seg, c_next, c_slide, c_diag = _dkdv_band_tile(
                dk, dv, c_all, c_seg, c_next, c_slide, c_diag, k, v, Qh, DOh, LSE_M + row, LSE_F + row,
                DELTA + row, start_m, offs_n, offs_d, last_q, seg_end, next_seg_end, slide_end, reach, T,
                stride_qt, stride_dot, scale_log2, BLOCK_M, False, PRECISION)
        for start_m in range(far_start, T, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _rows(Qh, offs_m, stride_qt, offs_d, T)
            do = _rows(DOh, offs_m, stride_dot, offs_d, T)
            lse_f = tl.load(LSE_F + row + offs_m, mask=offs_m < T, other=float("inf"))
            delta = tl.load(DELTA + row + offs_m, mask=offs_m < T, other=0.0)
            pi = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2 - lse_f[None, :])
            w += tl.dot(pi.to(do.dtype), do, input_precision=PRECISION)
            u += tl.sum(pi * delta[None, :], 1)
    c_all += tl.sum(v.to(tl.float32) * w, 1) - u
    # Globals' dK and dV come from _nats_bwd_dkdv_global
    store = tl.load(KIND + zh_kv * T + offs_n, mask=offs_n < T, other=0) != 0  # 0: Global
    out = zh_kv * T * D + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=store[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=store[:, None])
    COLSUM += zh_kv * 5 * T + offs_n
    tl.store(COLSUM, c_all, mask=offs_n < T)
    tl.store(COLSUM + T, c_seg, mask=offs_n < T)
    tl.store(COLSUM + 2 * T, c_next, mask=offs_n < T)
    tl.store(COLSUM + 3 * T, c_slide, mask=offs_n < T)
    tl.store(COLSUM + 4 * T, c_diag, mask=offs_n < T)


@triton.autotune(configs=DKDV_CONFIGS, key=["T_BUCKET", "D"])
@triton.jit
def _nats_bwd_dkdv_global(Q, K, V, DO, LSE_M, DELTA, DK, DV, GLOBAL_POS, N_GLOBAL_UPTO,
                          stride_qz, stride_qh, stride_qt, stride_kz, stride_kh, stride_kt,
                          stride_vz, stride_vh, stride_vt, stride_doz, stride_doh, stride_dot,
                          H, H_KV, T, T_BUCKET, scale_log2, scale,
                          D: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK and dV of BLOCK_N gathered Global keys, over every query after the first of them and
    all query heads of the group: a short dense backward."""
    start_g = tl.program_id(0) * BLOCK_N
    z, h_kv = tl.program_id(1) // H_KV, tl.program_id(1) % H_KV
    zh_kv = (z * H_KV + h_kv).to(tl.int64)
    n_global = tl.load(N_GLOBAL_UPTO + zh_kv * T + T - 1)
    if start_g < n_global:
        offs_g = start_g + tl.arange(0, BLOCK_N)
        pos = tl.load(GLOBAL_POS + zh_kv * T + offs_g, mask=offs_g < n_global, other=T)  # sorted
        offs_d = tl.arange(0, D)
        k = _rows(_head(K, z, h_kv, stride_kz, stride_kh), pos, stride_kt, offs_d, T)
        v = _rows(_head(V, z, h_kv, stride_vz, stride_vh), pos, stride_vt, offs_d, T)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        group = H // H_KV
        for h in range(h_kv * group, h_kv * group + group):
            Qh = _head(Q, z, h, stride_qz, stride_qh)
            DOh = _head(DO, z, h, stride_doz, stride_doh)
            row = (z * H + h).to(tl.int64) * T
            for start_m in range(tl.min(pos, 0) // BLOCK_M * BLOCK_M, T, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                q = _rows(Qh, offs_m, stride_qt, offs_d, T)
                do = _rows(DOh, offs_m, stride_dot, offs_d, T)
                lse_m = tl.load(LSE_M + row + offs_m, mask=offs_m < T, other=float("inf"))
                delta = tl.load(DELTA + row + offs_m, mask=offs_m < T, other=0.0)
                s = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2
                p = tl.where(pos[:, None] <= offs_m[None, :], tl.math.exp2(s - lse_m[None, :]), 0.0)
                dp = tl.dot(v, tl.trans(do), input_precision=PRECISION) - delta[None, :]
                dv += tl.dot(p.to(do.dtype), do, input_precision=PRECISION)
                dk += tl.dot((p * dp).to(q.dtype), q, input_precision=PRECISION)
        out = zh_kv * T * D + pos.to(tl.int64)[:, None] * D + offs_d[None, :]
        tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=pos[:, None] < T)
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=pos[:, None] < T)


# -----------------------------------------------------------------------------
# The kernels' inputs and outputs: O(T) metadata in, the types' gradients out. Each is one
# program per (batch, KV head) that walks the keys in blocks, carrying running counts, maxima
# and sums from block to block: a few microseconds of scans instead of a dozen PyTorch launches.

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
MAX_GRID_Y = 65535  # CUDA's limit on a grid's axis 1
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
META_FIELDS = ("kind", "last_q_local", "seg_end", "next_seg_end", "reach_local", "band_end", "band_start",
               "global_pos", "n_global_upto")
SCAN_BLOCK = 64 if INTERPRETING else 1024  # keys per step of the scans (small ones test the carries)


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _minimum(a, b):
    return tl.minimum(a, b)


@triton.jit
def _segment_sum(start_a, sum_a, start_b, sum_b):
    """A running sum that restarts at every element flagged as a segment's start."""
    return start_a | start_b, tl.where(start_b, sum_b, sum_a + sum_b)


@triton.jit
def _last(x, BLOCK: tl.constexpr):
    return tl.sum(tl.where(tl.arange(0, BLOCK) == BLOCK - 1, x, 0), 0)


@triton.jit
def _kind(TYPES, pos, stride_tt, stride_tc, T):
    """The argmax of the types [len(pos), 3] (the first of equal values, as torch.argmax)."""
    ptr = TYPES + pos.to(tl.int64) * stride_tt
    valid = (pos >= 0) & (pos < T)
    y_g = tl.load(ptr, mask=valid, other=0.0)
    y_l = tl.load(ptr + stride_tc, mask=valid, other=0.0)
    y_s = tl.load(ptr + 2 * stride_tc, mask=valid, other=0.0)
    return tl.where((y_g >= y_l) & (y_g >= y_s), 0, tl.where(y_l >= y_s, 1, 2))


@triton.jit
def _store_group_max(BOUND, x, start, valid, N_GROUPS, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    """The maxima of x per GROUP keys, for the kernels' per-tile reach bounds (_tile_max)."""
    groups = start // GROUP + tl.arange(0, BLOCK // GROUP)
    x = tl.max(tl.reshape(tl.where(valid, x, -1), (BLOCK // GROUP, GROUP)), 1)
    tl.store(BOUND + groups, x, mask=groups < N_GROUPS)


@triton.jit
def _key_metadata(TYPES, KIND, LAST_Q_LOCAL, SEG_END, NEXT_SEG_END, REACH_LOCAL, BAND_END, BAND_START,
                  GLOBAL_POS, N_GLOBAL_UPTO, stride_tz, stride_th, stride_tt, stride_tc, H_KV, T, N_GROUPS,
                  window, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    """The META_FIELDS of one (batch, KV head) in three passes over its keys (see key_metadata)."""
    zh = tl.program_id(0)
    types = _head(TYPES, zh // H_KV, zh % H_KV, stride_tz, stride_th)
    row = zh.to(tl.int64) * T
    # 1. Kinds; the Globals counted and gathered in order; band_start starts at "none" (T).
    n_global = 0
    for start in range(0, T, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        valid = pos < T
        kind = _kind(types, pos, stride_tt, stride_tc, T)
        is_global = (kind == 0) & valid
        upto = n_global + tl.cumsum(is_global.to(tl.int32), 0)
        tl.store(KIND + row + pos, kind, mask=valid)
        tl.store(N_GLOBAL_UPTO + row + pos, upto, mask=valid)
        tl.store(GLOBAL_POS + row + upto - 1, pos, mask=is_global)
        tl.store(BAND_START + row + pos, T, mask=valid)
        n_global += tl.sum(is_global.to(tl.int32), 0)
    for start in range(0, T, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        tl.store(GLOBAL_POS + row + pos, T, mask=(pos >= n_global) & (pos < T))
    tl.debug_barrier()  # pass 2 reads what other threads wrote
    # 2. Each key's segment end (the first Global after it: global_pos[n_global_upto]), the last
    # query that sees it, and the rows the backward's band must cover.
    running = (tl.zeros([], tl.int64) - 1 - T) * (T + 1)  # below every code
    for start in range(0, T, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        valid = pos < T
        kind = tl.load(KIND + row + pos, mask=valid, other=0)
        upto = tl.load(N_GLOBAL_UPTO + row + pos, mask=valid, other=0)
        first_after = tl.load(GLOBAL_POS + row + upto, mask=valid & (upto < T), other=T)
        second_after = tl.load(GLOBAL_POS + row + upto + 1, mask=valid & (upto + 1 < T), other=T)
        seg_end = tl.minimum(first_after, T - 1)
        next_seg_end = tl.where(first_after < T, tl.minimum(second_after, T - 1), seg_end)
        slide_end = tl.minimum(pos + window, T - 1)
        last_q_local = tl.where(kind == 0, -1, tl.where(kind == 1, seg_end, slide_end))
        band_end = tl.maximum(tl.maximum(seg_end, slide_end), tl.where(kind == 1, next_seg_end, -1))
        tl.store(SEG_END + row + pos, seg_end, mask=valid)
        tl.store(NEXT_SEG_END + row + pos, next_seg_end, mask=valid)
        tl.store(LAST_Q_LOCAL + row + pos, last_q_local, mask=valid)
        _store_group_max(REACH_LOCAL + zh.to(tl.int64) * N_GROUPS, last_q_local, start, valid, N_GROUPS,
                         BLOCK, GROUP)
        _store_group_max(BAND_END + zh.to(tl.int64) * N_GROUPS, band_end, start, valid, N_GROUPS, BLOCK, GROUP)
        # band_start[i], the first key j with last_q_local[j] >= i, is a key whose reach beats
        # every earlier key's: write j at i = last_q_local[j] for those (the encoding breaks
        # ties towards the first key), then take minima from the right in pass 3.
        code = tl.where(valid, last_q_local.to(tl.int64) * (T + 1) - pos, running)
        best = tl.maximum(tl.associative_scan(code, 0, _maximum), running)
        tl.store(BAND_START + row + last_q_local, pos, mask=(best == code) & (last_q_local >= 0) & valid)
        running = tl.max(best, 0)
    tl.debug_barrier()
    # 3. band_start[i] = min over i' >= i: the keys walked from the right.
    running = T
    for start in range(0, T, BLOCK):
        pos = T - 1 - start - tl.arange(0, BLOCK)
        x = tl.minimum(tl.associative_scan(tl.load(BAND_START + row + pos, mask=pos >= 0, other=T), 0, _minimum),
                       running)
        tl.store(BAND_START + row + pos, x, mask=pos >= 0)
        running = tl.min(x, 0)


_LIB = torch.library.Library("nats", "DEF")


def _operator(fn, mutates=()):
    """fn as the operator torch.ops.nats.<its name>: one entry in PyTorch's dispatcher, which
    torch.compile takes whole (its shapes come from the fake registered beside it; mutates names
    the arguments it writes into). Registered with define/impl rather than torch.library.custom_op,
    whose per-call checks cost more in eager mode; the autograd lives outside, in NAtSAttention."""
    name = fn.__name__.lstrip("_")
    _LIB.define(name + torch.library.infer_schema(fn, mutates_args=mutates))
    _LIB.impl(name, fn, "CompositeExplicitAutograd")
    return getattr(torch.ops.nats, name).default


@_operator
def key_metadata(token_types: torch.Tensor, window: int) -> list[torch.Tensor]:
    """Per (batch, KV head) integers the kernels rebuild the mask and the types' gradients from:
    a list of int32 tensors in META_FIELDS order, [B, H_kv, T] or [B, H_kv, ceil(T / 16)].

    kind: 0 G, 1 L, 2 S. last_q_local: the last query that sees a Local or Sliding key (-1 for
    Globals, which the kernels read from the gathered global_pos instead). seg_end: the next
    Global strictly after j (T-1 if none), the last row a Local j would see; next_seg_end: where
    the following segment ends, when seg_end is a Global that closes j's segment. band_end: the
    last row where the backward needs G entry by entry. reach_local, band_end: maxima per 16 keys.
    band_start: for query i, the first key j with last_q_local >= i (T if none): query tiles
    start their band there. global_pos: the Global positions, sorted, padded with T;
    n_global_upto: Globals at or before j.

    Raises ValueError for types that are not [B, H_kv, T, 3] on a CUDA device (or in Triton's
    interpreter) and a window that is not an int >= 0; nats_attention checks the rest.
    """
    if token_types.dim() != 4 or not (token_types.is_cuda or INTERPRETING):
        raise ValueError(f"key_metadata runs a Triton kernel on the types [batch, kv_heads, seq, 3] on a CUDA device; "
                         f"got {tuple(token_types.shape)} on {token_types.device}")
    check_window(window)
    meta = _empty_metadata(token_types)
    B, H_kv, T, _ = token_types.shape
    n_groups = dict(zip(META_FIELDS, meta))["reach_local"].shape[-1]
    _key_metadata[(B * H_kv,)](token_types, *meta, *token_types.stride(), H_kv, T, n_groups, window,
                               BLOCK=SCAN_BLOCK, GROUP=REACH_GROUP)
    return meta


@torch.library.register_fake("nats::key_metadata")
def _empty_metadata(token_types, window=None):
    """The META_FIELDS tensors, unfilled: int32 [B, H_kv, T], the per-16-key maxima
    [B, H_kv, ceil(T / 16)]."""
    B, H_kv, T, _ = token_types.shape
    n_groups = (T + REACH_GROUP - 1) // REACH_GROUP
    return [token_types.new_empty(B, H_kv, n_groups if name in ("reach_local", "band_end") else T, dtype=torch.int32)
            for name in META_FIELDS]


@triton.jit
def _type_gradients(COLSUM, LOCAL_ROWSUM, KIND, DTYPES, stride_dz, stride_dh, stride_dt, stride_dc,
                    H_KV, GROUP_SIZE, T, BLOCK: tl.constexpr):
    """dL/d(types) of one (batch, KV head) from its column sums and Local row sums (see type_gradients)."""
    zh = tl.program_id(0)
    colsum = COLSUM + zh.to(tl.int64) * 5 * T
    dtypes = _head(DTYPES, zh // H_KV, zh % H_KV, stride_dz, stride_dh)
    carry_global, carry_other = 0.0, 0.0
    for start in range(0, T, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        valid = pos < T
        c_all = tl.load(colsum + pos, mask=valid, other=0.0)
        c_seg = tl.load(colsum + T + pos, mask=valid, other=0.0)
        c_next = tl.load(colsum + 2 * T + pos, mask=valid, other=0.0)
        c_slide = tl.load(colsum + 3 * T + pos, mask=valid, other=0.0)
        diag = tl.load(colsum + 4 * T + pos, mask=valid, other=0.0)
        rowsum = tl.zeros([BLOCK], tl.float32)
        for g in range(GROUP_SIZE):
            rowsum += tl.load(LOCAL_ROWSUM + (zh.to(tl.int64) * GROUP_SIZE + g) * T + pos, mask=valid, other=0.0)
        kind = tl.load(KIND + zh.to(tl.int64) * T + pos, mask=valid, other=0)
        is_global, is_local = kind == 0, kind == 1
        # A segment runs from just after one Global to the next Global, inclusive.
        starts = tl.load(KIND + zh.to(tl.int64) * T + pos - 1, mask=valid & (pos > 0), other=0) == 0
        # Global g: sum over the Locals j' it closes of (c_next - c_seg)_j'.
        opened, x_global = tl.associative_scan((starts, tl.where(is_local, c_next - c_seg, 0.0)), 0, _segment_sum)
        x_global = tl.where(opened, x_global, x_global + carry_global)
        # Others: sum_{j' in (p_j, j)} l_j' c_seg_j' - sum_{i in (p_j, j]} R_i + l_j G_jj.
        local_seg = tl.where(is_local, c_seg, 0.0)
        opened, x_other = tl.associative_scan((starts, local_seg - rowsum), 0, _segment_sum)
        x_other = tl.where(opened, x_other, x_other + carry_other)
        carry_global, carry_other = _last(x_global, BLOCK), _last(x_other, BLOCK)
        cross = tl.where(is_global, x_global, x_other - local_seg + tl.where(is_local, diag, 0.0))
        out = dtypes + pos.to(tl.int64) * stride_dt
        ty = DTYPES.dtype.element_ty
        tl.store(out, (c_all - cross).to(ty), mask=valid)
        tl.store(out + stride_dc, c_seg.to(ty), mask=valid)
        tl.store(out + 2 * stride_dc, c_slide.to(ty), mask=valid)


def type_gradients(colsum, local_rowsum, meta, dtype):
    """The per-token gradients of the types from the O(T) sums the kernels produced:
    [B, H_kv, T, 3] in dtype (README, How NAtS works, "Type gradients").

    colsum [B, H_kv, 5, T]: c_all, c_seg, c_next, c_slide, diag: sums of G down column j up to
    T-1, the segment end F_j, the next segment's end, j + W, and G_jj alone; local_rowsum
    [B, H, T]: R_i, the sum of G over the visible Local keys of row i, per query head.
    dl = c_seg, ds = c_slide, dg = c_all - X with the cross term
      Global j:      X_j = sum over the Local j' it closes of (c_next - c_seg)_j'
      non-Global j:  X_j = sum_{j' in (p_j, j)} l_j' c_seg_j' - sum_{i in (p_j, j]} R_i + l_j G_jj
    where p_j is the last Global before j (the query heads of a group summed): an
    inclusion-exclusion of the entries with j' < j < i inside j's segment.
    """
    B, H_kv, _, T = colsum.shape
    kind = meta[META_FIELDS.index("kind")]
    dtypes = colsum.new_empty(B, H_kv, T, 3, dtype=dtype)
    _type_gradients[(B * H_kv,)](colsum, local_rowsum, kind, dtypes, *dtypes.stride(), H_kv,
                                 local_rowsum.shape[1] // H_kv, T, BLOCK=SCAN_BLOCK)
    return dtypes


def _precision(q):
    return "ieee" if q.dtype == torch.float32 else "tf32"


_CHOSEN = {}  # (kernel, dtype, its autotune key) -> the kwargs of the config the autotuner chose


def _launch(kernel, grid, dtype, *args, **kwargs):
    """kernel[grid](*args, **kwargs) for an autotuned kernel, the autotuner's choice remembered
    per key. Triton's Autotuner rebuilds its key from all ~40 arguments on every call (about
    50 us of Python on the H200's host, results/kernel.md); after the first call of a key this
    launches the chosen config directly. The key args (T_BUCKET, D, ...) come as kwargs."""
    key = (kernel, dtype, *(kwargs[name] for name in kernel.keys))
    chosen = _CHOSEN.get(key)
    if chosen is None:
        kernel[grid](*args, **kwargs)
        _CHOSEN[key] = kernel.best_config.all_kwargs()
    else:
        kernel.fn[grid](*args, **kwargs, **chosen)


def _common_args(q, k):
    B, H, T, D = q.shape
    return dict(H=H, H_KV=k.shape[1], T=T, T_BUCKET=triton.next_power_of_2(T), scale_log2=D**-0.5 * LOG2E,
                D=D, PRECISION=_precision(q))


@_operator
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: list[torch.Tensor], training: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """O [B, H, T, D]; LSE_M and (training) LSE_F [B, H, T] float32, log2 domain."""
    B, H, T, D = q.shape
    o = torch.empty(B, H, T, D, device=q.device, dtype=q.dtype)
    lse_m = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    lse_f = torch.empty(B, H, T if training else 0, device=q.device, dtype=torch.float32)
    m = dict(zip(META_FIELDS, meta))
    args = (q, k, v, o, lse_m, lse_f if training else lse_m, m["last_q_local"], m["reach_local"], m["band_start"],
            m["global_pos"], m["n_global_upto"], *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3])
    kwargs = dict(N_GROUPS=m["reach_local"].shape[-1], TRAINING=training, **_common_args(q, k))
    if training:
        _launch(_nats_fwd, lambda cfg: (triton.cdiv(T, cfg["BLOCK_M"]), B * H), q.dtype, *args, **kwargs)
    else:
        config = FWD_INFERENCE.all_kwargs()
        _nats_fwd.fn[(triton.cdiv(T, config["BLOCK_M"]), B * H)](*args, **kwargs, **config)
    return o, lse_m, lse_f


@torch.library.register_fake("nats::forward")
def _(q, k, v, meta, training):
    B, H, T, D = q.shape
    return (q.new_empty(B, H, T, D), q.new_empty(B, H, T, dtype=torch.float32),
            q.new_empty(B, H, T if training else 0, dtype=torch.float32))


@_operator
def _backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor,
              lse_m: torch.Tensor, lse_f: torch.Tensor, meta: list[torch.Tensor], window: int,
              types_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv and the types' gradient [B, H_kv, T, 3] in types_dtype, from the column sums
    of G and the Local row sums the kernels leave (type_gradients)."""
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    o, do = o.contiguous(), do.contiguous()  # the dQ kernel reads O with dO's strides
    dq = torch.empty(B, H, T, D, device=q.device, dtype=q.dtype)
    dk = torch.empty(B, H_kv, T, D, device=q.device, dtype=k.dtype)
    dv = torch.empty_like(dk)
    delta = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    colsum = torch.empty(B, H_kv, 5, T, device=q.device, dtype=torch.float32)
    local_rowsum = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    m = dict(zip(META_FIELDS, meta))
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    common = dict(_common_args(q, k), scale=D**-0.5)
    n_groups = m["reach_local"].shape[-1]
    # dQ first: it writes Dl, which the dK/dV kernels read
    _launch(_nats_bwd_dq, lambda cfg: (triton.cdiv(T, cfg["BLOCK_M"]), B * H), q.dtype,
            q, k, v, o, do, lse_m, lse_f, delta, dq, local_rowsum, m["kind"], m["last_q_local"], m["reach_local"],
            m["band_start"], m["global_pos"], m["n_global_upto"], *strides, N_GROUPS=n_groups, **common)
    _launch(_nats_bwd_dkdv, lambda cfg: (triton.cdiv(T, cfg["BLOCK_N"]), B * H_kv), q.dtype,
            q, k, v, do, lse_m, lse_f, delta, dk, dv, colsum, m["kind"], m["last_q_local"], m["seg_end"],
            m["next_seg_end"], m["reach_local"], m["band_end"], *strides, N_GROUPS=n_groups, window=window, **common)
    _launch(_nats_bwd_dkdv_global, lambda cfg: (triton.cdiv(T, cfg["BLOCK_N"]), B * H_kv), q.dtype,
            q, k, v, do, lse_m, delta, dk, dv, m["global_pos"], m["n_global_upto"], *strides, **common)
    return dq, dk, dv, type_gradients(colsum, local_rowsum, meta, types_dtype)


@torch.library.register_fake("nats::backward")
def _(q, k, v, o, do, lse_m, lse_f, meta, window, types_dtype):
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    return (q.new_empty(B, H, T, D), k.new_empty(B, H_kv, T, D), v.new_empty(B, H_kv, T, D),
            q.new_empty(B, H_kv, T, 3, dtype=types_dtype))


class NAtSAttention(torch.autograd.Function):
    """The training pass: the forward keeps LSE_F for the types' gradients."""

    @staticmethod
    def forward(ctx, q, k, v, token_types, window):
        meta = key_metadata(token_types, window)
        o, lse_m, lse_f = _forward(q, k, v, meta, True)
        ctx.save_for_backward(q, k, v, o, lse_m, lse_f, *meta)
        ctx.window, ctx.types_dtype = window, token_types.dtype
        return o

    @staticmethod
    def backward(ctx, do):
        if torch.is_grad_enabled():  # create_graph=True: the kernels' gradients have no gradients of their own
            raise RuntimeError("second derivatives (backward with create_graph=True, torch.autograd.grad of a "
                               "gradient) are not computed by the Triton kernel; pass impl='reference' for them")
        q, k, v, o, lse_m, lse_f, *meta = ctx.saved_tensors
        dq, dk, dv, dtypes = _backward(q, k, v, o, do, lse_m, lse_f, meta, ctx.window, ctx.types_dtype)
        return dq, dk, dv, dtypes, None


def check_kernel_support(q):
    """Raise what the Triton kernels (attention and decode) do not support of queries q [..., D]:
    RuntimeError without triton, ValueError for a head size, dtype or device they do not take."""
    if not HAS_TRITON:
        raise RuntimeError("the Triton kernel needs the triton package (Linux, pip install triton); "
                           "pass impl='reference' to run NAtS attention in plain PyTorch")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"the Triton kernel supports head_dim in {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}; "
                         f"pass impl='reference' for other sizes")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the Triton kernel supports {SUPPORTED_DTYPES}, got {q.dtype}; "
                         f"pass impl='reference' for float64")
    if not (q.is_cuda or INTERPRETING):
        raise ValueError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before import); "
                         "pass impl='reference' on CPU")


def is_count(value, least=0):
    """Whether value is an int >= least: numpy's ints are, a bool (True == 1) is none."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least


def is_real(value, least=-math.inf):
    """Whether value is a real number >= least: numpy's floats are; a bool and NaN are none."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value >= least


def check_window(window):
    """Raise a ValueError for a window that is not an int >= 0."""
    if not is_count(window):
        raise ValueError(f"window must be an int >= 0; got {window!r}")


def nats_attention_triton(q, k, v, token_types, window):
    """The Triton kernel behind nats_attention: a training forward (and its backward) when
    anything needs a gradient, else the inference forward, which skips the far region."""
    B, H, T, D = q.shape
    check_kernel_support(q)
    if INTERPRETING and q.dtype == torch.bfloat16:  # the interpreter's bf16 arithmetic is wrong
        return nats_attention_triton(q.float(), k.float(), v.float(), token_types, window).to(q.dtype)
    if T == 0:
        return q.new_empty(q.shape)
    if B * H > MAX_GRID_Y:  # the kernels run batch x heads on grid axis 1, which CUDA caps: the batch in parts
        rows = max(1, MAX_GRID_Y // H)
        return torch.cat([nats_attention_triton(q[i:i + rows], k[i:i + rows], v[i:i + rows], token_types[i:i + rows],
                                                window) for i in range(0, B, rows)])
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    window = min(window, T)  # the same mask, and j + W stays far from int32's limit
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, token_types)):
        return NAtSAttention.apply(q, k, v, token_types, window)
    return _forward(q, k, v, key_metadata(token_types, window), False)[0]


# -----------------------------------------------------------------------------
# Decoding: one new query per row against a cache of slots (nats.KVCache), flash-decoding style
#
# Per (batch row, KV head) the cache holds `slots` keys and values, each slot with its token's
# position (-1: free) and type. A step at position t takes one new token per row and
#   1. splits the slots over programs (grid axis 1, enough to fill the GPU at small batches); each
#      scores its valid keys against the GROUP query heads of its KV head (one load of K and V
#      serves them all, the heads padded to 16 rows for the tensor cores), keeps a partial softmax
#      (running max, sum and output), frees the slots that no query after t reads (expired) and
#      notes its first free slot;
#   2. one program per (batch row, KV head) merges the partials with the new token's own key and
#      value, writes the output and stores the new token into the first free slot.
# The step reads each cached key and value once and launches two kernels whatever the cache
# holds; shapes only change when the cache grows, so a CUDA graph replays it.


def expired(kind, pos, t, last_global, window):
    """Which cached keys no query after step t reads (README, How NAtS works, "Eviction"): Local
    keys older than the latest Global one (whose query was the last to see them) and Sliding keys
    j <= t - W; Globals stay. kind, pos [..., n] (free slots: pos -1, any result); t and
    last_global broadcast against them. window: an int >= 0. Returns bool [..., n]. Raises
    ValueError for kind or pos that are no tensors, or a bad window."""
    check_tensors(kind=kind, pos=pos)
    check_window(window)
    window = min(int(window), 2**62)  # the same eviction, and t - W stays within int64
    return ((kind == LOCAL) & (pos < last_global)) | ((kind == SLIDING) & (pos <= t - window))


def nats_decode_reference(q, k, v, kind, t, cache, window):
    """One decode step in plain PyTorch, what the kernel must match: the new token (q [B, H, 1, D];
    k, v [B, H_kv, 1, D]; kind [B, H_kv, 1] long, 0 G, 1 L, 2 S; at position t, int32 [1] on the
    device) goes into the first free slot of its row, its queries attend over the valid slots
    (SDPA, the query heads of a KV head as its rows), then the slots no later query reads are
    freed. cache = (k_cache, v_cache [B, H_kv, slots, D], pos [B, H_kv, slots] int32 (-1: free),
    kinds [B, H_kv, slots] uint8), updated in place; a free slot must exist. Returns [B, H, 1, D].
    Raises ValueError for malformed inputs (check_decode_inputs)."""
    check_decode_inputs(q, k, v, kind, t, cache, window)
    window = min(int(window), 2**30)  # the same eviction, and t - W stays far from int32's limit
    k_cache, v_cache, pos, kinds = cache
    B, H, _, D = q.shape
    slot = pos.argmin(-1, keepdim=True)  # free slots (-1) sort first
    rows = slot[..., None].expand_as(k)
    k_cache.scatter_(2, rows, k)
    v_cache.scatter_(2, rows, v)
    pos.scatter_(2, slot, t.to(pos.dtype).expand_as(slot))
    kinds.scatter_(2, slot, kind.to(kinds.dtype))
    q = q.reshape(B, k.shape[1], H // k.shape[1], D)  # the query heads of each KV head, as rows
    y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=(pos >= 0)[:, :, None, :])
    last_global = torch.where(kind == GLOBAL, t, -1)  # a Global token closes its segment: the Locals held go
    pos.masked_fill_(expired(kinds, pos, t, last_global, window), -1)
    return y.reshape(B, H, 1, D)


DECODE_BLOCK_N = 16 if INTERPRETING else 64  # slots per tile; fixed, not autotuned: a cold start waits for no search
DECODE_WARPS = 4


@triton.jit
def _decode_split(Q, K, V, POS, KINDS, KIND_NEW, T_NOW, ACC, M, L, FREE, stride_qz, stride_qh, stride_kz, stride_kh,
                  stride_ks, stride_vz, stride_vh, stride_vs, stride_nz, stride_nh, H_KV, SLOTS, SPLIT_SLOTS,
                  N_SPLITS, window, scale_log2, GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                  BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Stage 1 of a decode step: the partial softmax of one split of one (batch row, KV head)'s
    slots, with its expired slots freed."""
    zh, split = tl.program_id(0), tl.program_id(1)
    z, h = zh // H_KV, zh % H_KV
    offs_g, offs_d = tl.arange(0, G_PAD), tl.arange(0, D)
    q = _rows(_head(Q, z, h * GROUP, stride_qz, stride_qh), offs_g, stride_qh, offs_d, GROUP)
    K, V = _head(K, z, h, stride_kz, stride_kh), _head(V, z, h, stride_vz, stride_vh)
    POS, KINDS = POS + tl.cast(zh, tl.int64) * SLOTS, KINDS + tl.cast(zh, tl.int64) * SLOTS
    t = tl.load(T_NOW)
    last_global = tl.where(tl.load(KIND_NEW + z * stride_nz + h * stride_nh) == 0, t, -1)
    acc = tl.zeros([G_PAD, D], dtype=tl.float32)
    m_i = tl.full([G_PAD], -1e30, dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    first_free = SLOTS
    end = tl.minimum((split + 1) * SPLIT_SLOTS, SLOTS)
    for start_n in range(split * SPLIT_SLOTS, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        pos = tl.load(POS + offs_n, mask=offs_n < end, other=-1)
        kind = tl.load(KINDS + offs_n, mask=offs_n < end, other=0).to(tl.int32)
        s = _scores(q, K, offs_n, stride_ks, offs_d, end, scale_log2, PRECISION)
        v = _rows(V, offs_n, stride_vs, offs_d, end)
        acc, m_i, l_i = _softmax_update(acc, m_i, l_i, s, (pos >= 0)[None, :], v, PRECISION)
        gone = (pos >= 0) & (((kind == 1) & (pos < last_global)) | ((kind == 2) & (pos <= t - window)))  # expired()
        tl.store(POS + offs_n, tl.full([BLOCK_N], -1, tl.int32), mask=gone)
        free = ((pos < 0) | gone) & (offs_n < end)
        first_free = tl.minimum(first_free, tl.min(tl.where(free, offs_n, SLOTS), 0))
    part = tl.cast(zh, tl.int64) * N_SPLITS + split
    tl.store(ACC + part * G_PAD * D + offs_g[:, None] * D + offs_d[None, :], acc)
    tl.store(M + part * G_PAD + offs_g, m_i)
    tl.store(L + part * G_PAD + offs_g, l_i)
    tl.store(FREE + part, first_free)


@triton.jit
def _decode_merge(Q, K_NEW, V_NEW, KIND_NEW, T_NOW, K, V, POS, KINDS, ACC, M, L, FREE, OUT, stride_qz, stride_qh,
                  stride_knz, stride_knh, stride_vnz, stride_vnh, stride_nz, stride_nh, stride_kz, stride_kh,
                  stride_ks, stride_vz, stride_vh, stride_vs, stride_oz, stride_oh, H_KV, SLOTS, N_SPLITS, window,
                  scale_log2, GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr):
    """Stage 2: the splits' partials and the new token's own entry merged into the output; the new
    token written into the first free slot (unless a Sliding token of W = 0, which nothing reads)."""
    zh = tl.program_id(0)
    z, h = zh // H_KV, zh % H_KV
    offs_g, offs_d = tl.arange(0, G_PAD), tl.arange(0, D)
    q = _rows(_head(Q, z, h * GROUP, stride_qz, stride_qh), offs_g, stride_qh, offs_d, GROUP).to(tl.float32)
    k_new = tl.load(_head(K_NEW, z, h, stride_knz, stride_knh) + offs_d)
    v_new = tl.load(_head(V_NEW, z, h, stride_vnz, stride_vnh) + offs_d)
    m_i = tl.sum(q * k_new.to(tl.float32)[None, :], 1) * scale_log2  # the new key: always visible to its query
    l_i = tl.full([G_PAD], 1.0, dtype=tl.float32)
    acc = tl.zeros([G_PAD, D], dtype=tl.float32) + v_new.to(tl.float32)[None, :]
    first_free = SLOTS
    for split in range(N_SPLITS):
        part = tl.cast(zh, tl.int64) * N_SPLITS + split
        m_s = tl.load(M + part * G_PAD + offs_g)
        m_new = tl.maximum(m_i, m_s)
        alpha, beta = tl.math.exp2(m_i - m_new), tl.math.exp2(m_s - m_new)
        acc_s = tl.load(ACC + part * G_PAD * D + offs_g[:, None] * D + offs_d[None, :])
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        l_i = l_i * alpha + tl.load(L + part * G_PAD + offs_g) * beta
        m_i = m_new
        first_free = tl.minimum(first_free, tl.load(FREE + part))
    OUT = _head(OUT, z, h * GROUP, stride_oz, stride_oh)
    out = (acc / l_i[:, None]).to(OUT.dtype.element_ty)
    tl.store(OUT + offs_g[:, None] * stride_oh + offs_d[None, :], out, mask=offs_g[:, None] < GROUP)
    kind = tl.load(KIND_NEW + z * stride_nz + h * stride_nh)
    t = tl.load(T_NOW)
    if (first_free < SLOTS) & ((kind != 2) | (t - window < t)):
        slot = tl.cast(first_free, tl.int64)
        tl.store(_head(K, z, h, stride_kz, stride_kh) + slot * stride_ks + offs_d, k_new)
        tl.store(_head(V, z, h, stride_vz, stride_vh) + slot * stride_vs + offs_d, v_new)
        tl.store(POS + tl.cast(zh, tl.int64) * SLOTS + slot, t)
        tl.store(KINDS + tl.cast(zh, tl.int64) * SLOTS + slot, kind.to(tl.uint8))


@functools.cache
def _programs_per_wave(device):
    """How many programs fill the GPU once: two per SM (4 in the interpreter, so tests split)."""
    if INTERPRETING:
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _decode_splits(slots, rows, device):
    """How many splits of the slots, and slots per split (a multiple of DECODE_BLOCK_N): enough
    programs for about one wave over the rows x KV heads, each with at least one tile."""
    tiles = triton.cdiv(slots, DECODE_BLOCK_N)
    want = max(1, min(tiles, triton.cdiv(_programs_per_wave(device), rows)))
    tiles_per_split = triton.cdiv(tiles, want)
    return triton.cdiv(tiles, tiles_per_split), tiles_per_split * DECODE_BLOCK_N


@functools.partial(_operator, mutates=("k_cache", "v_cache", "pos", "kinds"))
def _decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: torch.Tensor, t: torch.Tensor,
            k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, kinds: torch.Tensor,
            window: int) -> torch.Tensor:
    """The decode step of nats_decode_reference as two kernels (see above)."""
    B, H, _, D = q.shape
    H_kv, slots = pos.shape[1:]
    group, g_pad = H // H_kv, max(16, triton.next_power_of_2(H // H_kv))
    n_splits, split_slots = _decode_splits(slots, B * H_kv, q.device)
    acc = torch.empty(B * H_kv, n_splits, g_pad, D, device=q.device, dtype=torch.float32)
    m_part, l_part = (torch.empty(B * H_kv, n_splits, g_pad, device=q.device, dtype=torch.float32) for _ in range(2))
    free = torch.empty(B * H_kv, n_splits, device=q.device, dtype=torch.int32)
    out = torch.empty(B, H, 1, D, device=q.device, dtype=q.dtype)
    common = dict(GROUP=group, G_PAD=g_pad, D=D, num_warps=DECODE_WARPS)
    scale_log2 = D**-0.5 * LOG2E
    kind_strides, k_strides, v_strides = kind.stride()[:2], k_cache.stride()[:3], v_cache.stride()[:3]
    parts = (acc, m_part, l_part, free)
    _decode_split[(B * H_kv, n_splits)](q, k_cache, v_cache, pos, kinds, kind, t, *parts, *q.stride()[:2],
                                        *k_strides, *v_strides, *kind_strides, H_kv, slots, split_slots, n_splits,
                                        window, scale_log2, BLOCK_N=DECODE_BLOCK_N, PRECISION=_precision(q), **common)
    _decode_merge[(B * H_kv,)](q, k, v, kind, t, k_cache, v_cache, pos, kinds, *parts, out, *q.stride()[:2],
                               *k.stride()[:2], *v.stride()[:2], *kind_strides, *k_strides, *v_strides,
                               *out.stride()[:2], H_kv, slots, n_splits, window, scale_log2, **common)
    return out


@torch.library.register_fake("nats::decode")
def _(q, k, v, kind, t, k_cache, v_cache, pos, kinds, window):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# -----------------------------------------------------------------------------
# The public entry point


def check_tensors(**tensors):
    """Raise a ValueError naming each argument that is not a torch.Tensor (a list, a numpy array),
    or is on a device these functions do not compute on (meta tensors, of shapes alone, have no
    values for the mask's checks)."""
    wrong = [f"{name} ({type(x).__name__})" for name, x in tensors.items() if not isinstance(x, torch.Tensor)]
    if wrong:
        raise ValueError(f"{', '.join(wrong)} must be torch tensors; convert with torch.as_tensor")
    elsewhere = [f"{name} ({x.device})" for name, x in tensors.items() if x.device.type not in ("cpu", "cuda")]
    if elsewhere:
        raise ValueError(f"{', '.join(elsewhere)}: NAtS attention computes on 'cpu' or 'cuda' tensors; move them there")


def check_inputs(q, k, v, token_types, window):
    """Raise a ValueError that says what to pass instead of a malformed input."""
    check_tensors(q=q, k=k, v=v, token_types=token_types)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-d [batch, heads, seq, head_dim]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    if D == 0:
        raise ValueError(f"head_dim must be >= 1, got q {tuple(q.shape)}")
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (T, D):
        raise ValueError(f"k and v must both be [batch={B}, kv_heads, seq={T}, head_dim={D}] to match "
                         f"q {tuple(q.shape)}; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if H_kv == 0 or H % H_kv:
        raise ValueError(f"the {H} query heads must split evenly over the {H_kv} KV heads")
    if token_types.shape != (B, H_kv, T, 3):
        raise ValueError(f"token_types must be one-hot [batch, kv_heads, seq, 3] = {(B, H_kv, T, 3)} (one type per "
                         f"KV head); got {tuple(token_types.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share one floating-point dtype (float16, bfloat16, float32 or float64); "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if len({q.device, k.device, v.device, token_types.device}) != 1:
        raise ValueError(f"all inputs must be on one device; got q {q.device}, k {k.device}, "
                         f"v {v.device}, token_types {token_types.device}")
    check_mask_args(token_types, window)


def is_one_hot(token_types):
    """Whether token_types [..., 3] is one-hot up to rounding (a straight-through y_hard - y_soft
    + y_soft can miss 1 by an ulp), the only types nats_attention accepts; soft or all-zero rows
    would make the kernel (argmax) and the reference (mask values) disagree. NaNs pass, to
    surface as a NaN loss as in any other attention."""
    token_types = token_types.detach()
    hard = F.one_hot(token_types.argmax(-1), 3).to(token_types.dtype)
    return not bool(((token_types - hard).abs() >= 1e-3).any())


def nats_attention(q, k, v, token_types, window, impl="auto"):
    """NAtS attention (README, "How NAtS works"): see nats_attention_reference for the arguments.

    impl: "triton" (the kernel), "reference" (plain PyTorch, O(T^2) memory), or "auto": the
    kernel on CUDA, the reference elsewhere. Both return the same values and the same
    gradients for q, k, v and the types. Raises ValueError for malformed inputs (wrong shapes,
    dtypes, devices, a negative window, types that are not one-hot on CPU: see is_one_hot) and,
    on the kernel path, for what the kernel does not support; RuntimeError where triton is not
    installed. NaN types give NaN outputs for their KV head on both paths, as NaN q, k or v do: a
    scorer that diverged shows as a NaN loss (which stops training with a message), not as an
    error in the middle of a step.
    """
    check_tensors(q=q, k=k, v=v, token_types=token_types)
    if impl == "auto":
        impl = "triton" if q.is_cuda else "reference"
    if impl == "reference":
        return nats_attention_reference(q, k, v, token_types, window)  # checks its inputs
    if impl != "triton":
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    check_inputs(q, k, v, token_types, window)
    y = nats_attention_triton(q, k, v, token_types, int(window))  # a numpy int is no Triton scalar
    # The kernel reads only the types' argmax, where the reference's NaN types spread through its
    # mask to all the KV head's outputs: the same here (0, or NaN for a KV head with a NaN type)
    B, H, T, D = y.shape
    H_kv = token_types.shape[1]
    nan = torch.where(token_types.detach().isnan().any(-1).any(-1), float("nan"), 0.0).to(y.dtype)  # [B, H_kv]
    return (y.view(B, H_kv, H // H_kv, T, D) + nan[..., None, None, None]).view(B, H, T, D)


def nats_decode(q, k, v, kind, t, cache, window, impl="auto"):
    """One decode step through a cache of slots, updated in place: see nats_decode_reference for
    the arguments and the result. impl: "triton" (two kernels, see "Decoding" above), "reference",
    or "auto": the kernel on CUDA. The kernel may write the new token into a slot that this step
    freed, the reference into the first slot free before it: the same keys are held. Raises
    ValueError for malformed inputs, and for what the kernel does not support."""
    if impl == "auto":
        impl = "triton" if isinstance(q, torch.Tensor) and q.is_cuda else "reference"  # (which names a non-tensor)
    if impl == "reference":
        return nats_decode_reference(q, k, v, kind, t, cache, window)  # checks its inputs
    if impl != "triton":
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    check_decode_inputs(q, k, v, kind, t, cache, window)
    window = min(int(window), 2**30)  # the same eviction, and t - W stays far from int32's limit
    check_kernel_support(q)
    if INTERPRETING and q.dtype == torch.bfloat16:  # its bf16 arithmetic is wrong, and the cache is written in place
        raise ValueError("the Triton interpreter computes bfloat16 wrongly: pass float32 or float16 tensors, or "
                         "impl='reference'")
    k_cache, v_cache, pos, kinds = cache
    if any(x.stride(-1) != 1 for x in (q, k, v, k_cache, v_cache)):
        raise ValueError("q, k, v and the cache's k and v need their head_dim contiguous (stride 1)")
    return _decode(q, k, v, kind, t, k_cache, v_cache, pos, kinds, window)


def check_decode_inputs(q, k, v, kind, t, cache, window):
    """Raise a ValueError that names what to pass instead of a malformed decode step (see
    nats_decode_reference for the arguments)."""
    check_tensors(q=q, k=k, v=v, kind=kind)  # (t has its own message below)
    if not (isinstance(cache, (tuple, list)) and len(cache) == 4 and all(isinstance(x, torch.Tensor) for x in cache)):
        raise ValueError(f"cache must be 4 tensors (k_cache, v_cache, pos, kinds), as a KVCache holds; got "
                         f"{type(cache).__name__} of {len(cache) if isinstance(cache, (tuple, list)) else '?'}")
    if any(0 in x.stride() and x.numel() > 1 for x in cache):  # written in place: one element per slot
        raise ValueError("the cache's tensors must not be expanded views (a stride of 0); pass their .clone()")
    k_cache, v_cache, pos, kinds = cache
    if any(x.dim() != 4 for x in (q, k, v, k_cache, v_cache)) or any(x.dim() != 3 for x in (pos, kinds, kind)):
        raise ValueError(f"q [B, H, 1, D], k, v [B, H_kv, 1, D], kind [B, H_kv, 1] and the cache's k, v "
                         f"[B, H_kv, slots, D], pos, kinds [B, H_kv, slots]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}, kind {tuple(kind.shape)}, cache "
                         + ", ".join(str(tuple(x.shape)) for x in cache))
    B, H, T, D = q.shape
    if T != 1 or k.shape != v.shape or (k.shape[0], *k.shape[2:]) != (B, 1, D) or H % k.shape[1]:
        raise ValueError(f"one new token per row: q [B, H, 1, D] and k, v [B, H_kv, 1, D] with H % H_kv == 0; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    H_kv = k.shape[1]
    if k_cache.shape != v_cache.shape or k_cache.shape[:2] != (B, H_kv) or k_cache.shape[3] != D \
            or pos.shape != k_cache.shape[:3] or kinds.shape != pos.shape or kind.shape != (B, H_kv, 1):
        raise ValueError(f"the cache must be k, v [{B}, {H_kv}, slots, {D}], pos and kinds [{B}, {H_kv}, slots] and "
                         f"kind [{B}, {H_kv}, 1]; got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}, "
                         f"{tuple(pos.shape)}, {tuple(kinds.shape)}, {tuple(kind.shape)}")
    if not q.dtype == k.dtype == v.dtype == k_cache.dtype == v_cache.dtype or not q.is_floating_point():
        raise ValueError(f"q, k, v and the cache's k and v must share one dtype, a floating one; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if pos.dtype != torch.int32 or kinds.dtype != torch.uint8 or not (pos.is_contiguous() and kinds.is_contiguous()):
        raise ValueError(f"pos must be contiguous int32 and kinds contiguous uint8; got {pos.dtype}, {kinds.dtype}")
    if not (isinstance(t, torch.Tensor) and t.dtype == torch.int32 and t.shape == (1,)) or kind.dtype != torch.long:
        raise ValueError(f"t must be the new token's position as an int32 tensor of shape [1] and kind its types as "
                         f"long (0 G, 1 L, 2 S); got t {t!r}, kind {kind.dtype}")
    inputs = dict(q=q, k=k, v=v, kind=kind, t=t, k_cache=k_cache, v_cache=v_cache, pos=pos, kinds=kinds)
    if len({x.device for x in inputs.values()}) > 1:
        raise ValueError("the new token's q, k, v, kind, t and the cache must be on one device; got "
                         + ", ".join(f"{name} on {x.device}" for name, x in inputs.items()))
    # Reading values needs a GPU sync, which would stall every step (and cannot run in a CUDA graph): checked on
    # the CPU; on CUDA the Decoder's make_room keeps a slot free.
    if pos.device.type == "cpu" and not torch.compiler.is_compiling():
        if not (pos < 0).any(-1).all():
            raise ValueError("a row of the cache has no free slot for the new token; grow the cache first "
                             "(nats.make_room)")
        if ((kind < 0) | (kind > 2)).any() or (t < 0).any():
            raise ValueError("kind must hold types 0, 1 or 2 (G, L, S) and t a position >= 0")
        if ((pos < -1) | (pos >= t)).any():  # a slot of a later token would be read, and never freed in time
            raise ValueError(f"the cache's pos must hold -1 (a free slot) or positions of earlier tokens, below "
                             f"t={t.item()}; got {pos.min().item()}..{pos.max().item()}")
        if ((pos >= 0) & (kinds > 2)).any():  # a type expired() does not know would stay forever
            raise ValueError("the cache's kinds must hold types 0, 1 or 2 (G, L, S) in every held slot (pos >= 0)")
    check_window(window)


# -----------------------------------------------------------------------------
# Benchmark: python kernel.py on a GPU


def useful_flops(causal, visible, D, what):
    """The matmul FLOPs a pass cannot avoid (README, How NAtS works, "The kernel"): a product
    costs 2 D per entry.
    Dense attention does 2 products per causal entry forward and 7 forward+backward; NAtS needs
    q k^T on every causal entry for LSE_F (and one more product in the backward for G), and the
    rest (P V forward, dP, dS, dQ, dK, dV) only on visible entries. Raises ValueError for an
    unknown pass `what`, counts below 0 or a head size below 1."""
    ok = is_real(causal, 0) and is_real(visible, 0) and is_count(D, 1)
    products = dict(dense_fwd=2 * causal, dense_fwd_bwd=7 * causal, inference=2 * visible,
                    train_fwd=causal + visible, fwd_bwd=3 * causal + 4 * visible) if ok else {}
    if what not in products:
        raise ValueError(f"useful_flops takes causal, visible >= 0 (entries), D >= 1 (an int) and what in "
                         f"('dense_fwd', 'dense_fwd_bwd', 'inference', 'train_fwd', 'fwd_bwd'); got {causal!r}, "
                         f"{visible!r}, {D!r}, {what!r}")
    return 2 * D * products[what]


def benchmark(lengths=(1024, 4096, 8192, 16384), head_dims=(64, 128), batch=2, heads=16, window=16):
    """One table, everything timed in this run with triton.testing.do_bench (median; the "graph"
    rows with do_bench_cudagraph, replayed from a CUDA graph): this kernel, dense causal SDPA,
    FlexAttention with the same mask.
    TFLOP/s counts useful_flops, against a bf16 matmul measured in the same run. Raises
    ValueError without a CUDA GPU."""
    if not torch.cuda.is_available():
        raise ValueError("the kernel benchmark needs a CUDA GPU; the tests (pytest) check the kernel on a CPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16, "
          f"B={batch} H={heads} W={window}; ratio = time / dense SDPA (same pass); TFLOP/s of useful work "
          f"(useful_flops), bf16 matmul ceiling measured now: {_matmul_ceiling():.0f} TFLOP/s")
    print(f"| {'D':>3} | {'T':>5} | {'mix':8} | {'kv':>5} | {'what':28} | {'ms':>8} | {'ratio':>6} | {'TFLOP/s':>7} |")
    print("|" + "|".join("-" * w for w in (5, 7, 10, 7, 30, 10, 8, 9)) + "|")
    for D in head_dims:
        for T in lengths:
            _benchmark_shape(batch, heads, T, D, window)
            torch.cuda.empty_cache()


def _bench(fn, grads=()):
    """fn's median time in ms, the gradients of grads cleared before each run."""
    return triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=list(grads), return_mode="median")


def _graph_bench(fn, grads=()):
    """The same pass replayed from a CUDA graph: the GPU's time alone, without the host's launches
    (what torch.compile's CUDA graphs or a captured training step pay)."""
    return triton.testing.do_bench_cudagraph(fn, rep=200, grad_to_none=list(grads), return_mode="median")


def _matmul_ceiling():
    """The TFLOP/s of an 8192^3 bf16 matmul on this GPU, now."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / _bench(lambda: a @ b) / 1e9


def _print_row(D, T, mix, kv, what, ms, base_ms, flops):
    """One line of the table: flops is the pass's useful_flops."""
    print(f"| {D:>3} | {T:>5} | {mix:8} | {kv:>5} | {what:28} | {ms:8.3f} | {ms / base_ms:6.2f} | "
          f"{flops / ms / 1e9:7.1f} |", flush=True)


def _benchmark_shape(batch, heads, T, D, window):
    """The table's rows for one length and head size: dense SDPA, then each mix of types."""
    from torch.nn.attention.flex_attention import flex_attention
    # FlexAttention compiled afresh for each shape, as for a model of fixed size: compiled once for
    # all, torch.compile recompiles it for dynamic shapes at the second length, and it then ran
    # 1.5x slower at T = 16384 (results/kernel.md)
    torch.compiler.reset()
    flex = torch.compile(flex_attention)
    gen = torch.Generator(device="cuda").manual_seed(T + D)
    q, k, v, do = (torch.randn(batch, heads, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    causal = batch * heads * T * (T + 1) / 2

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    dense = dict(fwd=_bench(sdpa), fwd_bwd=_bench(lambda: sdpa().backward(do), (q, k, v)),
                 graph=_graph_bench(lambda: sdpa().backward(do), (q, k, v)))
    _print_row(D, T, "-", "1.00", "dense SDPA fwd", dense["fwd"], dense["fwd"],
               useful_flops(causal, causal, D, "dense_fwd"))
    _print_row(D, T, "-", "1.00", "dense SDPA fwd+bwd", dense["fwd_bwd"], dense["fwd_bwd"],
               useful_flops(causal, causal, D, "dense_fwd_bwd"))
    _print_row(D, T, "-", "1.00", "dense SDPA fwd+bwd, graph", dense["graph"], dense["graph"],
               useful_flops(causal, causal, D, "dense_fwd_bwd"))
    mixes = {"5/15/80": (0.05, 0.15, 0.80), "20/40/40": (0.2, 0.4, 0.4), "all G": (1.0, 0.0, 0.0)}  # G/L/S shares
    for mix, probs in mixes.items():
        _benchmark_mix(q, k, v, do, mix, probs, window, flex, dense, gen)


def _benchmark_mix(q, k, v, do, mix, probs, window, flex, dense, gen):
    """The rows of one mix of types (G/L/S probabilities): NAtS's passes, then FlexAttention's with
    the same mask, against dense's times."""
    from torch.nn.attention.flex_attention import create_block_mask
    batch, heads, T, D = q.shape
    kind = torch.multinomial(torch.tensor(probs, device="cuda"), batch * heads * T, replacement=True,
                             generator=gen).view(batch, heads, T)
    kind[..., 0] = GLOBAL
    types = F.one_hot(kind, 3).to(torch.bfloat16).requires_grad_()
    causal = batch * heads * T * (T + 1) / 2
    visible = kv_lengths(types.detach().float(), window).sum().item()
    kv = f"{visible / causal:.2f}"

    def row(what, ms, base_ms, flops):
        _print_row(D, T, mix, kv, what, ms, base_ms, flops)

    def flops(what):
        return useful_flops(causal, visible, D, what)

    def nats():
        return nats_attention(q, k, v, types, window)

    row("NAtS train fwd", _bench(nats), dense["fwd"], flops("train_fwd"))
    row("NAtS fwd+bwd (with dtypes)", _bench(lambda: nats().backward(do), (q, k, v, types)), dense["fwd_bwd"],
        flops("fwd_bwd"))
    row("NAtS fwd+bwd, graph", _graph_bench(lambda: nats().backward(do), (q, k, v, types)), dense["graph"],
        flops("fwd_bwd"))
    with torch.no_grad():
        row("NAtS inference fwd", _bench(nats), dense["fwd"], flops("inference"))
    last_q = last_visible_query(types.detach(), window)

    def mask_mod(b, h, i, j):
        return (j <= i) & (i <= last_q[b, h, j])

    def build():
        return create_block_mask(mask_mod, batch, heads, T, T, device="cuda")

    try:
        block_mask = build()
    except torch.OutOfMemoryError:  # the eager build's [B, H, T, T] mask and its int64 sum: 72 GiB at T = 16384
        torch.cuda.empty_cache()
        print(f"| {D:>3} | {T:>5} | {mix:8} | {kv:>5} | FlexAttention skipped: its block-mask build needs a "
              f"[B, H, T, T] mask, out of memory on this card |", flush=True)
        return

    def flex_fwd():
        return flex(q, k, v, block_mask=block_mask)

    row("Flex fwd", _bench(flex_fwd), dense["fwd"], flops("inference"))
    row("Flex fwd+bwd (no dtypes)", _bench(lambda: flex_fwd().backward(do), (q, k, v)), dense["fwd_bwd"],
        useful_flops(visible, visible, D, "dense_fwd_bwd"))
    torch.cuda.empty_cache()  # each build holds a [B, H, T, T] mask: 8.6 GB at T = 16384, its sum 64 GiB
    row("Flex block-mask build", _bench(build), dense["fwd"], 0)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("the benchmark needs a CUDA GPU; the tests (pytest) check the kernel on CPU")
    benchmark()
