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
import torch
import torch.nn.functional as F

GLOBAL, LOCAL, SLIDING = 0, 1, 2

# -----------------------------------------------------------------------------
# O(T) per-key metadata shared by the model, the kernel and the tests


def next_global(is_global):
    """f_j: the first Global position >= j, or T if none. is_global: bool [..., T] -> long [..., T]."""
    T = is_global.shape[-1]
    pos = torch.arange(T, device=is_global.device).expand_as(is_global)
    candidate = torch.where(is_global, pos, torch.full_like(pos, T))
    return candidate.flip(-1).cummin(-1).values.flip(-1)


def last_visible_query(token_types, window):
    """The last query that sees key j (spec section 2): key j is visible to queries j .. this.

    token_types: one-hot [..., T, 3]. Global keys live to the end, Local keys until the next
    Global token (inclusive), Sliding keys for W more steps. Returns long [..., T].
    """
    T = token_types.shape[-2]
    kind = token_types.argmax(-1)
    pos = torch.arange(T, device=kind.device)
    last = torch.full_like(kind, T - 1)
    last = torch.where(kind == LOCAL, next_global(kind == GLOBAL).clamp(max=T - 1), last)
    last = torch.where(kind == SLIDING, (pos + window).clamp(max=T - 1), last)
    return last


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
    T = token_types.shape[-2]
    pos = torch.arange(T, device=token_types.device)
    f = next_global(token_types.argmax(-1) == GLOBAL)
    lengths = torch.stack(torch.broadcast_tensors(
        T - pos, f.clamp(max=T - 1) - pos + 1, (pos + window).clamp(max=T - 1) - pos + 1), dim=-1)
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


def nats_attention(q, k, v, token_types, window):
    """NAtS attention: see nats_attention_reference for the arguments."""
    check_inputs(q, k, v, token_types, window)
    return nats_attention_reference(q, k, v, token_types, window)
