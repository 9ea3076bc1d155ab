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
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernel import GLOBAL, LOCAL, SLIDING, kv_lengths, nats_attention


@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 65
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int = 6  # < n_head: grouped-query attention; token types are per KV head
    n_embd: int = 384
    dropout: float = 0.0
    attention: str = "nats"  # "nats", "dense" (causal SDPA) or "sliding" (position 0 Global, the rest Sliding)
    attention_impl: str = "auto"  # NAtS: "triton" kernel, "reference" PyTorch, "auto" = kernel on CUDA
    window: int = 16  # W: a Sliding token is seen by the W+1 queries j .. j+W
    kv_weight: float = 0.1  # lambda: weight of the mean kv_fraction in the loss
    rope_base: float = 10000.0
    init_std: float = 0.02  # weights ~ N(0, init_std), GPT-2's 0.02; a small model learns lookups only from
                            # about 1 / sqrt(n_embd) (README, "Associative recall")

    def __post_init__(self):
        if self.attention not in ("nats", "dense", "sliding"):
            raise ValueError(f"attention must be 'nats', 'dense' or 'sliding', got {self.attention!r}")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"need n_embd % n_head == 0 and n_head % n_kv_head == 0, got "
                             f"n_embd={self.n_embd}, n_head={self.n_head}, n_kv_head={self.n_kv_head}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0 (0.02 as in GPT-2, about 1/sqrt(n_embd) for small models), "
                             f"got {self.init_std}")
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

    def forward(self, x, pos):
        """x: the normalised block input [B, T, C] at positions pos [T] -> one-hot types [B, H_kv, T, 3]."""
        B, T, _ = x.shape
        # Detached input: the mask gradient trains only the scorer, not the backbone.
        logits = self.proj(x.detach()).float().view(B, T, self.n_kv_head, 3).transpose(1, 2)
        if self.training:  # straight-through Gumbel-softmax: one-hot forward, soft backward
            types = F.gumbel_softmax(logits, tau=1.0, hard=True)
        else:
            types = F.one_hot(logits.argmax(-1), 3).float()
        # Position 0 is always Global (an attention sink); no gradient reaches its logits.
        first = F.one_hot(torch.tensor(GLOBAL, device=x.device), 3).float()
        return torch.where((pos == 0)[:, None], first, types)


class FixedTypes(nn.Module):
    """A stand-in for the scorer with preset types by position, kinds [H_kv, length] (0 G, 1 L,
    2 S): for benchmarks that need a realistic mix before any training, and for tests."""

    def __init__(self, kinds):
        super().__init__()
        self.register_buffer("kinds", kinds)

    def forward(self, x, pos):
        return F.one_hot(self.kinds[:, pos].expand(x.shape[0], -1, -1), 3).float()


def attention_stats(token_types, window):
    """Spec section 4 for one layer: kv_fraction (differentiable), type shares, cache at the end.

    kv_fraction: kept mask entries / causal entries. cache_size: keys the last query reads,
    averaged over (batch, KV head).
    """
    B, H_kv, T, _ = token_types.shape
    lengths = kv_lengths(token_types, window)
    kv_fraction = lengths.sum() / (B * H_kv * T * (T + 1) / 2)
    # the last query still sees the keys whose column reaches row T - 1: length T - j
    ends = lengths.detach() == torch.arange(T, 0, -1, device=lengths.device)
    return dict(kv_fraction=kv_fraction, type_share=token_types.detach().mean((0, 1, 2)),
                cache_size=ends.float().sum(-1).mean())


class KVCache:
    """One layer's KV cache for generation, evicting exactly as training masked (spec section 5).

    After step t: a Global t drops the Local tokens of the segment it closes (they were visible
    at t), Sliding tokens j <= t - W leave (the next query would not see them), Globals stay.
    So once token t+1 is appended, the cache holds exactly row t+1 of the mask. Every (batch row,
    KV head) keeps its own tokens: a padded buffer whose free slots have pos = -1, compacted
    whenever more than half the slots are free, so the bytes held follow the tokens kept.
    """

    def __init__(self, window):
        self.window = window
        self.k = self.v = None  # [B, H_kv, slots, D]
        self.pos = self.kind = None  # [B, H_kv, slots]; pos -1 marks a free slot
        self.seen = 0  # tokens appended so far: the position of the next one
        self.last_global = None  # [B, H_kv]: the latest Global position, -1 before any

    def append(self, k, v, kind):
        """Add the next n tokens: k, v [B, H_kv, n, D], kind [B, H_kv, n] (0 G, 1 L, 2 S)."""
        pos = torch.arange(self.seen, self.seen + k.shape[2], device=k.device, dtype=torch.int32).expand(kind.shape)
        kind = kind.to(torch.uint8)
        newest_global = torch.where(kind == GLOBAL, pos, -1).amax(-1)
        if self.k is None:
            self.k, self.v, self.pos, self.kind, self.last_global = k, v, pos, kind, newest_global
        else:
            self.k, self.v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
            self.pos, self.kind = torch.cat([self.pos, pos], 2), torch.cat([self.kind, kind], 2)
            self.last_global = torch.maximum(self.last_global, newest_global)
        self.seen += k.shape[2]

    def attend(self, q):
        """Attention of the newest token's queries q [B, H, 1, D] over the cached tokens. Written
        out, not through scaled_dot_product_attention: for one query it is two small matrix
        products, and SDPA's cuDNN backend plans anew for every cache length (about 8 ms a call)."""
        B, H, _, D = q.shape
        q = q.view(B, self.k.shape[1], H // self.k.shape[1], D)  # the query heads of each KV head
        scores = (q @ self.k.transpose(-2, -1)).float() / math.sqrt(D)  # [B, H_kv, group, slots]
        scores = scores.masked_fill((self.pos < 0)[:, :, None, :], -float("inf"))
        return (scores.softmax(-1).to(self.v.dtype) @ self.v).view(B, H, 1, D)

    def evict(self):
        """Drop what no later query sees, after step t = seen - 1."""
        t = self.seen - 1
        keep = ((self.kind == GLOBAL) | ((self.kind == LOCAL) & (self.pos > self.last_global[..., None]))
                | ((self.kind == SLIDING) & (self.pos > t - self.window))) & (self.pos >= 0)
        self.pos = torch.where(keep, self.pos, -1)
        if 2 * keep.sum(-1).max() <= keep.shape[-1]:
            self.compact()

    def compact(self):
        """Move each row's kept tokens to the front, in order, and cut the buffer to the longest row."""
        order = torch.sort((self.pos < 0).to(torch.uint8), dim=-1, stable=True).indices
        order = order[..., :int((self.pos >= 0).sum(-1).max())]
        self.pos, self.kind = self.pos.gather(-1, order), self.kind.gather(-1, order)
        rows = order[..., None].expand(-1, -1, -1, self.k.shape[-1])
        self.k, self.v = self.k.gather(2, rows), self.v.gather(2, rows)

    def stats(self):
        """Tokens held per (batch row, KV head), and bytes held, against a dense cache of the same sequence."""
        held = (self.pos >= 0).sum(-1).float()
        per_token = 2 * self.k.shape[-1] * self.k.element_size()  # k and v
        heads = self.k.shape[0] * self.k.shape[1]
        return dict(tokens_mean=held.mean().item(), tokens_max=held.max().item(), dense_tokens=self.seen,
                    bytes=self.pos.numel() * (per_token + 5),  # per slot: k, v, int32 pos, uint8 kind
                    dense_bytes=heads * self.seen * per_token)


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

    def token_types(self, x, pos):
        """One-hot types [B, H_kv, T, 3]: the scorer's (nats), the fixed StreamingLLM pattern of an
        attention sink plus a sliding window (sliding), or None (dense)."""
        if self.scorer is not None:
            return self.scorer(x, pos)
        if self.config.attention == "sliding":
            kind = torch.where(pos == 0, GLOBAL, SLIDING).expand(x.shape[0], self.config.n_kv_head, -1)
            return F.one_hot(kind, 3).float()
        return None

    def forward(self, x, pos, cache=None):
        """x [B, T, C] at positions pos [T]. With a cache: one token attends over it, or a prompt
        (T > 1) runs the ordinary forward and fills an empty cache with what survives it."""
        B, T, C = x.shape
        cfg = self.config
        q, k, v = self.c_attn(x).split([C, cfg.n_kv_head * self.head_dim, cfg.n_kv_head * self.head_dim], dim=2)
        q = rotary(q.view(B, T, cfg.n_head, self.head_dim).transpose(1, 2), pos, cfg.rope_base)
        k = rotary(k.view(B, T, cfg.n_kv_head, self.head_dim).transpose(1, 2), pos, cfg.rope_base)
        v = v.view(B, T, cfg.n_kv_head, self.head_dim).transpose(1, 2)
        token_types = self.token_types(x, pos)
        if cache is not None:  # dense attention caches every token as Global, so it never evicts
            kind = token_types.argmax(-1) if token_types is not None else pos.new_full((B, cfg.n_kv_head, T), GLOBAL)
        if cache is not None and cache.seen:  # decoding: the new token attends over the cache
            if T != 1:
                raise ValueError(f"a filled cache takes one token at a time, got {T}")
            cache.append(k, v, kind)
            y = cache.attend(q)
            cache.evict()
        elif token_types is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=cfg.n_kv_head < cfg.n_head)
        else:
            self.stats = attention_stats(token_types, cfg.window)
            self.stats["token_types"] = token_types.detach()
            y = nats_attention(q, k, v, token_types.to(q.dtype), cfg.window, impl=cfg.attention_impl)
        if cache is not None and cache.seen == 0:  # a prompt: keep what later queries will see
            cache.append(k, v, kind)
            cache.evict()
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

    def forward(self, x, pos, cache=None):
        x = x + self.dropout(self.attn(self.ln_1(x), pos, cache))
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
                torch.nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))
        self.stats = {}

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx, caches=None):
        """The final normalised hidden states [B, T, n_embd] of idx [B, T]; caches (from new_caches)
        continue a cached sequence (see KVCache)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        start = caches[0].seen if caches else 0  # RoPE positions keep counting past block_size
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx))
        for i, block in enumerate(self.transformer.h):
            x = block(x, pos, caches[i] if caches else None)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, caches=None, teacher=None):
        """idx [B, T] -> logits [B, T, vocab]; with targets also the loss: cross-entropy +
        kv_weight x mean kv_fraction over layers (spec section 4). With a teacher (a frozen dense
        GPT) the first term is instead the paper's fine-tuning objective: the mean squared error
        between the final hidden states and the teacher's."""
        hidden = self.hidden_states(idx, caches)
        logits = self.lm_head(hidden)
        if targets is None:
            return logits, None
        ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        loss = ce
        if teacher is not None:
            with torch.no_grad():
                target = teacher.hidden_states(idx)
            loss = F.mse_loss(hidden.float(), target.float())
        self.stats = dict(ce=ce.detach())
        if self.config.attention != "dense":
            kv_fraction = torch.stack([blk.attn.stats["kv_fraction"] for blk in self.transformer.h])
            self.stats["kv_fraction"] = kv_fraction.detach()
        if self.config.attention == "nats":  # the fixed patterns have nothing to learn
            loss = loss + self.config.kv_weight * kv_fraction.mean()
        return logits, loss

    def new_caches(self):
        return [KVCache(self.config.window) for _ in self.transformer.h]

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
    def decode(self, idx, prefill=0):
        """Logits [B, T, vocab] of every step: the first `prefill` tokens in one forward, then one
        token at a time through the evicting caches. Equals forward() in eval() mode; tests use it."""
        caches = self.new_caches()
        with eval_mode(self):
            logits = [self(idx[:, :prefill], caches=caches)[0]] if prefill else []
            logits += [self(idx[:, t:t + 1], caches=caches)[0] for t in range(prefill, idx.shape[1])]
        return torch.cat(logits, dim=1)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, caches=None):
        """Sample max_new_tokens after the prompt idx [B, T]: the prompt is prefilled in one forward
        with hard types, then one token per step through the evicting caches (pass a list from
        new_caches() to inspect them afterwards). Past block_size positions keep counting; memory
        stays bounded as long as Global tokens stay sparse."""
        device = self.lm_head.weight.device
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"the prompt must be [batch, tokens] with at least one token, got shape {tuple(idx.shape)}")
        if idx.device != device:
            raise ValueError(f"the prompt is on {idx.device} but the model on {device}; pass idx.to('{device}')")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if top_k is not None and not 1 <= top_k <= self.config.vocab_size:
            raise ValueError(f"top_k must be in 1..vocab_size={self.config.vocab_size}, got {top_k}")
        caches = self.new_caches() if caches is None else caches
        new_tokens = idx  # the first step prefills the whole prompt
        with eval_mode(self):
            for _ in range(max_new_tokens):
                logits = self(new_tokens, caches=caches)[0][:, -1, :] / temperature
                if top_k is not None:
                    threshold = torch.topk(logits, top_k).values[:, [-1]]
                    logits = logits.masked_fill(logits < threshold, -float("inf"))
                new_tokens = torch.multinomial(F.softmax(logits.float(), dim=-1), num_samples=1)
                idx = torch.cat((idx, new_tokens), dim=1)
        return idx


class eval_mode:
    """with eval_mode(model): run the block in eval() mode (argmax types, no dropout), then
    restore the mode the model had."""

    def __init__(self, model):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


# -----------------------------------------------------------------------------
# Decode benchmark: python nats.py on a GPU


@torch.no_grad()
def benchmark_decode(contexts=(4096, 16384, 32768), mix=(0.05, 0.15, 0.80), new_tokens=256, warmup=16, batch=1,
                     device="cuda", dtype=torch.bfloat16):
    """Decode tokens/s and KV-cache memory after a long prompt: NAtS with its types fixed to a G/L/S
    mix (an untrained scorer gives no realistic one) against a dense cache, same model of the
    default width with random weights, measured in one run."""
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else device}, {dtype}, batch {batch}, "
          f"G/L/S mix {mix}, W = {GPTConfig.window}, {new_tokens} tokens decoded after the prompt, "
          f"tokens/s over the last {new_tokens - warmup}")
    print("| context | cache | tokens/s | cache MB | dense cache MB | share | peak GPU MB |")
    print("|---|---|---|---|---|---|---|")
    for T in contexts:
        for attention in ("dense", "nats"):
            config = GPTConfig(block_size=T, vocab_size=50304, attention=attention)
            model = GPT(config)
            if attention == "nats":
                generator = torch.Generator().manual_seed(0)
                kinds = torch.multinomial(torch.tensor(mix), config.n_kv_head * (T + new_tokens), replacement=True,
                                          generator=generator).view(config.n_kv_head, -1)
                kinds[:, 0] = GLOBAL
                for block in model.transformer.h:
                    block.attn.scorer = FixedTypes(kinds)
            model = model.to(device, dtype).eval()
            idx = torch.randint(config.vocab_size, (batch, T + new_tokens), device=device)
            caches = model.new_caches()
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            model(idx[:, :T], caches=caches)
            for t in range(T, T + warmup):  # first calls of each kernel out of the timing
                model(idx[:, t:t + 1], caches=caches)
            _synchronize(device)
            start = time.perf_counter()
            for t in range(T + warmup, T + new_tokens):
                model(idx[:, t:t + 1], caches=caches)
            _synchronize(device)
            rate = batch * (new_tokens - warmup) / (time.perf_counter() - start)
            stats = [c.stats() for c in caches]
            held, dense = (sum(s[key] for s in stats) / 2**20 for key in ("bytes", "dense_bytes"))
            peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
            print(f"| {T} | {attention} | {rate:.0f} | {held:.1f} | {dense:.1f} | {held / dense:.0%} | {peak:.0f} |",
                  flush=True)
            del model, caches


def _synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("the decode benchmark needs a CUDA GPU; on CPU try "
                         "benchmark_decode(contexts=(512,), device='cpu', dtype=torch.float32)")
    benchmark_decode()
