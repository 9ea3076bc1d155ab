"""
A GPT with Neural Attention Search (NAtS), in the style of nanoGPT's model.py.

Every attention layer has a tiny scorer that gives each token, per KV head, one of three types
(../shared/NATS_SPEC.md):

    Global   kept in the KV cache forever
    Local    kept until the next Global token
    Sliding  kept for W more steps

The loss adds kv_weight x (share of the causal attention entries that stay visible), so the
model learns to keep only the tokens it needs. attention="dense" gives the ordinary causal
baseline every result is compared with.
"""
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernel import GLOBAL, kv_lengths, last_visible_query, nats_attention


@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 65
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int = 6  # < n_head: grouped-query attention; token types are per KV head
    n_embd: int = 384
    dropout: float = 0.0
    attention: str = "nats"  # "nats" or "dense" (causal scaled_dot_product_attention)
    attention_impl: str = "auto"  # NAtS: "triton" kernel, "reference" PyTorch, "auto" = kernel on CUDA
    window: int = 16  # W: a Sliding token is seen by the W+1 queries j .. j+W
    kv_weight: float = 0.1  # lambda: weight of the mean kv_fraction in the loss
    rope_base: float = 10000.0

    def __post_init__(self):
        if self.attention not in ("nats", "dense"):
            raise ValueError(f"attention must be 'nats' or 'dense', got {self.attention!r}")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"need n_embd % n_head == 0 and n_head % n_kv_head == 0, got "
                             f"n_embd={self.n_embd}, n_head={self.n_head}, n_kv_head={self.n_kv_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"RoPE needs an even head size, got {self.n_embd // self.n_head}")


def rotary(x, pos, base):
    """Rotate pairs of channels of x [B, H, T, D] by angles pos * base^(-2i/D) (RoPE)."""
    D = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    angle = pos.to(torch.float32)[:, None] * inv_freq  # [T, D/2]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class TokenTypeScorer(nn.Module):
    """Spec section 1: one bias-free linear layer giving each token a type per KV head."""

    def __init__(self, config):
        super().__init__()
        self.n_kv_head = config.n_kv_head
        self.proj = nn.Linear(config.n_embd, config.n_kv_head * 3, bias=False)

    def forward(self, x):
        """x: the normalised block input [B, T, C] -> one-hot types [B, H_kv, T, 3]."""
        B, T, _ = x.shape
        # Detached input: the mask gradient trains only the scorer, not the backbone.
        logits = self.proj(x.detach()).float().view(B, T, self.n_kv_head, 3).transpose(1, 2)
        if self.training:  # straight-through Gumbel-softmax: one-hot forward, soft backward
            types = F.gumbel_softmax(logits, tau=1.0, hard=True)
        else:
            types = F.one_hot(logits.argmax(-1), 3).float()
        # Position 0 is always Global (an attention sink); no gradient reaches its logits.
        first = F.one_hot(torch.tensor(GLOBAL, device=x.device), 3).float().expand(B, self.n_kv_head, 1, 3)
        return torch.cat([first, types[:, :, 1:]], dim=2)


def attention_stats(token_types, window):
    """Spec section 4 for one layer: kv_fraction (differentiable), type shares, cache at the end.

    kv_fraction: kept mask entries / causal entries. cache_size: keys the last query reads,
    averaged over (batch, KV head).
    """
    B, H_kv, T, _ = token_types.shape
    kv_fraction = kv_lengths(token_types, window).sum() / (B * H_kv * T * (T + 1) / 2)
    hard = token_types.detach()
    cache_size = (last_visible_query(hard, window) == T - 1).float().sum(-1).mean()
    return dict(kv_fraction=kv_fraction, type_share=hard.mean((0, 1, 2)), cache_size=cache_size)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.scorer = TokenTypeScorer(config) if config.attention == "nats" else None
        self.stats = {}  # filled by every NAtS forward, read by GPT.forward and the training log

    def forward(self, x, pos):
        B, T, C = x.shape
        cfg = self.config
        q, k, v = self.c_attn(x).split([C, cfg.n_kv_head * self.head_dim, cfg.n_kv_head * self.head_dim], dim=2)
        q = rotary(q.view(B, T, cfg.n_head, self.head_dim).transpose(1, 2), pos, cfg.rope_base)
        k = rotary(k.view(B, T, cfg.n_kv_head, self.head_dim).transpose(1, 2), pos, cfg.rope_base)
        v = v.view(B, T, cfg.n_kv_head, self.head_dim).transpose(1, 2)
        if self.scorer is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=cfg.n_kv_head < cfg.n_head)
        else:
            token_types = self.scorer(x)
            self.stats = attention_stats(token_types, cfg.window)
            self.stats["token_types"] = token_types.detach()
            y = nats_attention(q, k, v, token_types.to(q.dtype), cfg.window, impl=cfg.attention_impl)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=False)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=False)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, pos):
        x = x + self.dropout(self.attn(self.ln_1(x), pos))
        return x + self.dropout(self.mlp(self.ln_2(x)))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=False),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.stats = {}

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None):
        """idx [B, T] -> logits [B, T, vocab]; with targets also the loss:
        cross-entropy + kv_weight x mean kv_fraction over layers (spec section 4)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, pos)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits, None
        ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        loss = ce
        self.stats = dict(ce=ce.detach())
        if self.config.attention == "nats":
            kv_fraction = torch.stack([blk.attn.stats["kv_fraction"] for blk in self.transformer.h])
            loss = ce + self.config.kv_weight * kv_fraction.mean()
            self.stats["kv_fraction"] = kv_fraction.detach()
        return logits, loss

    def layer_stats(self):
        """Per-layer statistics of the last NAtS forward, as plain numbers."""
        return [dict(kv_fraction=blk.attn.stats["kv_fraction"].item(),
                     type_share=blk.attn.stats["type_share"].tolist(),
                     cache_size=blk.attn.stats["cache_size"].item()) for blk in self.transformer.h]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
                  dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **(dict(fused=True) if fused else {}))

    @classmethod
    def from_checkpoint(cls, path, device="cpu"):
        checkpoint = torch.load(path, map_location=device, weights_only=False)
        model = cls(GPTConfig(**checkpoint["model_args"]))
        model.load_state_dict(checkpoint["model"])
        return model.to(device)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sample max_new_tokens after the prompt idx [B, T], recomputing the cropped context."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]
            logits, _ = self(context)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                threshold = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits[logits < threshold] = -float("inf")
            next_token = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, next_token), dim=1)
        return idx
