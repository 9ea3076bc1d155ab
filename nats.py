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

Reading order: the model, then generation through a KV cache that really evicts, then the
decode benchmark (python nats.py on a GPU).
"""
import inspect
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernel import GLOBAL, LOCAL, SLIDING, kv_lengths, nats_attention


@dataclass
class GPTConfig:
    """The model. The defaults are nanoGPT's baby GPT of shakespeare_char with NAtS attention:
    what train_shakespeare.py trains on a GPU (config/cpu.py shrinks it for a CPU)."""
    block_size: int = 256  # context length: the longest sequence forward() takes
    vocab_size: int = 65  # the characters of data/shakespeare.txt; the training script sets it from the data
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int = 6  # < n_head: grouped-query attention; token types are per KV head
    n_embd: int = 384
    dropout: float = 0.2  # residual dropout (no attention dropout); the baby GPT overfits without it
    attention: str = "nats"  # "nats", "dense" (causal SDPA), "sliding" (position 0 Global, the rest Sliding)
                             # or "random" (position 0 and a random_global share of the others Global, the rest Sliding)
    attention_impl: str = "auto"  # NAtS: "triton" kernel, "reference" PyTorch, "auto" = the kernel on CUDA
    window: int = 16  # W: a Sliding token is seen by the W+1 queries j .. j+W (the authors' from-scratch W)
    kv_weight: float = 0.1  # lambda: weight of the mean kv_fraction in the loss (forward() may be given another)
    random_global: float = 0.0  # attention="random": the chance that a token is Global, drawn anew every forward
    rope_base: float = 10000.0  # RoPE's base, as in most RoPE models
    init_std: float = 0.02  # weights ~ N(0, init_std), GPT-2's 0.02; a small model learns lookups
                            # only from about 1 / sqrt(n_embd) (results/README.md, "Associative recall")

    def __post_init__(self):
        """Raise a ValueError naming the field and what to pass, for a config no model can have."""
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.attention not in ("nats", "dense", "sliding", "random"):
            raise ValueError(f"attention must be 'nats', 'dense', 'sliding' or 'random', got {self.attention!r}")
        if self.attention_impl not in ("auto", "triton", "reference"):
            raise ValueError(f"attention_impl must be 'auto', 'triton' or 'reference', got {self.attention_impl!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}; "
                             f"pass an n_head that divides it")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}; "
                             f"pass an n_kv_head that divides it")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"RoPE needs an even head size n_embd / n_head, got {self.n_embd // self.n_head}")
        if self.window < 0:
            raise ValueError(f"window must be >= 0 (0: a Sliding token is seen by its own query only), "
                             f"got {self.window}")
        if not self.kv_weight >= 0:
            raise ValueError(f"kv_weight must be >= 0 (a negative weight rewards keeping keys), got {self.kv_weight}")
        if not 0 <= self.random_global <= 1:
            raise ValueError(f"random_global must be a probability in [0, 1], got {self.random_global}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0 (0.02 as in GPT-2, about 1/sqrt(n_embd) for small models), "
                             f"got {self.init_std}")


def rotary(x, pos, base):
    """Rotate pairs of channels of x [B, H, T, D] by angles pos * base^(-2i/D) (RoPE)."""
    D = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    angle = pos.to(torch.float32)[:, None] * inv_freq  # [T, D/2]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class TokenTypeScorer(nn.Module):
    """One bias-free linear layer giving each token a type per KV head."""

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


def attention_stats(token_types, window):
    """One layer's KV statistics from its one-hot types [B, H_kv, T, 3]:

    kv_fraction  kept mask entries / causal entries, a differentiable scalar (the loss term)
    type_share   the share of Global, Local and Sliding tokens [3]
    cache_size   keys the last query reads (the cache at the end of the sequence), averaged
                 over (batch, KV head)
    """
    B, H_kv, T, _ = token_types.shape
    lengths = kv_lengths(token_types, window)
    kv_fraction = lengths.sum() / (B * H_kv * T * (T + 1) / 2)
    # the last query still sees the keys whose column reaches row T - 1: length T - j
    ends = lengths.detach() == torch.arange(T, 0, -1, device=lengths.device)
    return dict(kv_fraction=kv_fraction, type_share=token_types.detach().mean((0, 1, 2)),
                cache_size=ends.float().sum(-1).mean())


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.scorer = TokenTypeScorer(config) if config.attention == "nats" else None

    def forward(self, x, pos, all_global=False):
        """Attention over x [B, T, C] at positions pos [T]. Returns the output [B, T, C] and the
        layer's statistics (attention_stats plus its one-hot token_types [B, H_kv, T, 3]), or
        None for dense attention. all_global: every token Global, dense causal attention, the
        scorer not run (a dense warm-up; stats say kv_fraction 1)."""
        q, k, v = self.qkv(x, pos)
        token_types = self.token_types(x, pos, all_global)
        y = self.attend(q, k, v, None if all_global else token_types)
        if token_types is None:
            return y, None
        return y, dict(attention_stats(token_types, self.config.window), token_types=token_types.detach())

    def qkv(self, x, pos):
        """Queries [B, H, T, D] and keys, values [B, H_kv, T, D], RoPE at positions pos."""
        B, T, C = x.shape
        cfg = self.config
        q, k, v = self.c_attn(x).split([C, cfg.n_kv_head * self.head_dim, cfg.n_kv_head * self.head_dim], dim=2)
        q = rotary(q.view(B, T, cfg.n_head, self.head_dim).transpose(1, 2), pos, cfg.rope_base)
        k = rotary(k.view(B, T, cfg.n_kv_head, self.head_dim).transpose(1, 2), pos, cfg.rope_base)
        return q, k, v.view(B, T, cfg.n_kv_head, self.head_dim).transpose(1, 2)

    def token_types(self, x, pos, all_global=False):
        """One-hot types [B, H_kv, T, 3]: the scorer's (nats), the fixed StreamingLLM pattern of an
        attention sink plus a sliding window (sliding), that pattern with a random_global share of
        Global tokens, drawn from torch's generator (random), all Global (all_global) or None (dense)."""
        cfg = self.config
        if cfg.attention == "dense":
            return None
        shape = (x.shape[0], cfg.n_kv_head, x.shape[1])
        if all_global:
            return F.one_hot(torch.full(shape, GLOBAL, device=x.device), 3).float()
        if self.scorer is not None:
            return self.scorer(x, pos)
        is_global = pos == 0
        if cfg.attention == "random":
            is_global = is_global | (torch.rand(shape, device=x.device) < cfg.random_global)
        return F.one_hot(torch.where(is_global, GLOBAL, SLIDING).expand(shape), 3).float()

    def attend(self, q, k, v, token_types):
        """Causal attention with the NAtS mask of token_types (None: dense), projected: [B, T, C]."""
        cfg = self.config
        if token_types is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=cfg.n_kv_head < cfg.n_head)
        else:
            y = nats_attention(q, k, v, token_types.to(q.dtype), cfg.window, impl=cfg.attention_impl)
        B, H, T, D = y.shape
        return self.c_proj(y.transpose(1, 2).reshape(B, T, H * D))

    def forward_cached(self, x, pos, cache):
        """The same attention through an evicting KVCache: on an empty cache a prompt x [B, T, C]
        runs the ordinary attention and the cache keeps what later queries will see; after that
        one token at a time (T = 1) attends over the cache. Returns [B, T, C]."""
        if cache.seen and x.shape[1] != 1:
            raise ValueError(f"a filled cache takes one token at a time, got {x.shape[1]}")
        q, k, v = self.qkv(x, pos)
        token_types = self.token_types(x, pos)
        # dense attention caches every token as Global, so it never evicts
        kind = token_types.argmax(-1) if token_types is not None else pos.new_full(k.shape[:3], GLOBAL)
        prompt = cache.seen == 0
        cache.append(k, v, kind)
        if prompt:
            y = self.attend(q, k, v, token_types)
        else:
            B, H, _, D = q.shape
            y = self.c_proj(cache.attend(q).transpose(1, 2).reshape(B, 1, H * D))
        cache.evict()
        return y


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

    def forward(self, x, pos, all_global=False):
        """x [B, T, C] -> the block's output [B, T, C] and its attention statistics (or None)."""
        y, stats = self.attn(self.ln_1(x), pos, all_global)
        x = x + self.dropout(y)
        return x + self.dropout(self.mlp(self.ln_2(x))), stats

    def forward_cached(self, x, pos, cache):
        x = x + self.dropout(self.attn.forward_cached(self.ln_1(x), pos, cache))
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

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())

    def embed(self, idx, start=0):
        """Token embeddings [B, T, C] of idx [B, T] and their positions start .. start + T - 1."""
        if idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence of length {idx.shape[1]} is longer than block_size {self.config.block_size}")
        pos = torch.arange(start, start + idx.shape[1], device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx)), pos

    def hidden_states(self, idx, all_global=False):
        """The final normalised hidden states [B, T, n_embd] of idx [B, T], and the attention
        statistics of every layer (a list; None entries for dense attention). all_global: every
        token Global in every layer (dense attention; the scorers are not run)."""
        x, pos = self.embed(idx)
        layers = []
        for block in self.transformer.h:
            x, stats = block(x, pos, all_global)
            layers.append(stats)
        return self.transformer.ln_f(x), layers

    def forward(self, idx, targets=None, teacher=None, kv_weight=None, all_global=False):
        """idx [B, T] -> (logits [B, T, vocab], loss, stats).

        With targets [B, T] (-1: not scored) the loss is the cross-entropy + kv_weight x the mean
        kv_fraction over layers (NAtS only); kv_weight, a float >= 0, is config.kv_weight unless
        given (the training loop passes the Lagrange multiplier of a KV budget). With a teacher (a
        frozen dense GPT) the first term is instead the authors' fine-tuning objective, the mean
        squared error between the final hidden states and the teacher's. Without targets the
        loss is None. all_global: every token Global, the scorers not run (a dense warm-up).

        stats, detached, for logs and pictures: ce (with targets) and, unless the attention is
        dense, per layer kv_fraction [n_layer], type_share [n_layer, 3], cache_size [n_layer]
        and token_types [n_layer, B, H_kv, T] (long: 0 Global, 1 Local, 2 Sliding).
        """
        hidden, layers = self.hidden_states(idx, all_global)
        logits = self.lm_head(hidden)
        dense = self.config.attention == "dense"
        kv_fraction = None if dense else torch.stack([s["kv_fraction"] for s in layers])
        stats = {} if dense else dict(
            kv_fraction=kv_fraction.detach(),
            type_share=torch.stack([s["type_share"] for s in layers]),
            cache_size=torch.stack([s["cache_size"] for s in layers]),
            token_types=torch.stack([s["token_types"].argmax(-1) for s in layers]))
        if targets is None:
            return logits, None, stats
        ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        stats["ce"] = ce.detach()
        loss = ce
        if teacher is not None:
            with torch.no_grad():
                target, _ = teacher.hidden_states(idx)
            loss = F.mse_loss(hidden.float(), target.float())
        if self.config.attention == "nats":  # the fixed patterns have nothing to learn
            loss = loss + (self.config.kv_weight if kv_weight is None else kv_weight) * kv_fraction.mean()
        return logits, loss, stats

    @torch.no_grad()
    def token_types(self, idx):
        """The type each layer and KV head gives every token of idx [B, T] as evaluation sees it
        (eval() mode: argmax, no noise): long [n_layer, B, H_kv, T], 0 Global, 1 Local, 2 Sliding.
        Raises ValueError for dense attention, which has no types."""
        if self.config.attention == "dense":
            raise ValueError("dense attention has no token types; use a model with attention 'nats' or 'sliding'")
        with eval_mode(self):
            return self(idx)[2]["token_types"]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
                  dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **(dict(fused=True) if fused else {}))

    @classmethod
    def from_checkpoint(cls, path, device="cpu"):
        """The model saved in a checkpoint of train_shakespeare.py (see load_checkpoint)."""
        checkpoint = load_checkpoint(path, device)
        model = cls(GPTConfig(**checkpoint["model_args"]))
        model.load_state_dict(checkpoint["model"])
        return model.to(device)

    # generation: the prompt in one forward, then one token at a time through evicting caches

    def new_caches(self):
        return [KVCache(self.config.window) for _ in self.transformer.h]

    def forward_cached(self, idx, caches):
        """Logits [B, T, vocab] of idx [B, T] continuing the sequence the caches hold (one per
        layer, from new_caches): a prompt on empty caches, then one token at a time. RoPE
        positions keep counting past block_size."""
        x, pos = self.embed(idx, start=caches[0].seen)
        for block, cache in zip(self.transformer.h, caches):
            x = block.forward_cached(x, pos, cache)
        return self.lm_head(self.transformer.ln_f(x))

    @torch.no_grad()
    def decode(self, idx, prefill=0):
        """Logits [B, T, vocab] of every step: the first `prefill` tokens in one forward, then one
        token at a time through the evicting caches. Equals forward() in eval() mode; tests use it."""
        caches = self.new_caches()
        with eval_mode(self):
            logits = [self.forward_cached(idx[:, :prefill], caches)] if prefill else []
            logits += [self.forward_cached(idx[:, t:t + 1], caches) for t in range(prefill, idx.shape[1])]
        return torch.cat(logits, dim=1)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, caches=None):
        """Sample max_new_tokens after the prompt idx [B, T] (long, on the model's device) and
        return [B, T + max_new_tokens]. The prompt is prefilled in one forward with hard types,
        then one token per step goes through the evicting caches (pass a list from new_caches()
        to inspect them afterwards). temperature 0 is greedy decoding (the most likely token);
        top_k keeps the k most likely. Past block_size positions keep counting; memory stays
        bounded as long as Global tokens stay sparse. Raises ValueError for a malformed prompt
        or a negative temperature, max_new_tokens or top_k out of range."""
        device = self.lm_head.weight.device
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"the prompt must be [batch, tokens] with at least one token, got shape {tuple(idx.shape)}")
        if idx.device != device:
            raise ValueError(f"the prompt is on {idx.device} but the model on {device}; pass idx.to('{device}')")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: always the most likely token), got {temperature}")
        if top_k is not None and not 1 <= top_k <= self.config.vocab_size:
            raise ValueError(f"top_k must be in 1..vocab_size={self.config.vocab_size}, got {top_k}")
        caches = self.new_caches() if caches is None else caches
        new_tokens = idx  # the first step prefills the whole prompt
        with eval_mode(self):
            for _ in range(max_new_tokens):
                logits = self.forward_cached(new_tokens, caches)[:, -1, :].float()
                if temperature == 0:
                    new_tokens = logits.argmax(-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        threshold = torch.topk(logits, top_k).values[:, [-1]]
                        logits = logits.masked_fill(logits < threshold, -float("inf"))
                    new_tokens = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
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


def load_checkpoint(path, device="cpu"):
    """The dict train_shakespeare.py saves (model, model_args, and for --resume the optimizer
    state, step and history), with tensors on device. Raises FileNotFoundError if there is no
    file and ValueError, in one sentence, if the file is not such a checkpoint (truncated by a
    run stopped while writing, or another program's file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        # tensors and plain Python values only: a checkpoint never needs to run code to load
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} cannot be read as a checkpoint: it is truncated or not a PyTorch "
                         f"checkpoint ({reason})") from e
    if not isinstance(checkpoint, dict) or not {"model", "model_args"} <= checkpoint.keys():
        raise ValueError(f"{path} is a PyTorch file but not a checkpoint of train_shakespeare.py "
                         f"(it has no 'model' and 'model_args')")
    return checkpoint


# -----------------------------------------------------------------------------
# Generation: a KV cache that really evicts


class KVCache:
    """One layer's KV cache for generation, evicting exactly as training masked.

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
        """What the cache holds now, as plain numbers:

        tokens_mean, tokens_max  tokens held per (batch row, KV head): mean and max
        seen                     tokens appended so far (what a dense cache would hold)
        bytes                    the buffers as allocated: k, v, int32 position and uint8 type
                                 per slot, free slots included until the next compaction
        dense_bytes              k and v of every token seen: a dense cache of the same sequence
        """
        held = (self.pos >= 0).sum(-1).float()
        per_token = 2 * self.k.shape[-1] * self.k.element_size()  # k and v
        heads = self.k.shape[0] * self.k.shape[1]
        return dict(tokens_mean=held.mean().item(), tokens_max=held.max().item(), seen=self.seen,
                    bytes=self.pos.numel() * (per_token + 5), dense_bytes=heads * self.seen * per_token)


# -----------------------------------------------------------------------------
# Decode benchmark: python nats.py on a GPU


class FixedTypes(nn.Module):
    """A stand-in for the scorer with preset types by position, kinds [H_kv, length] (0 G, 1 L,
    2 S): for benchmarks that need a realistic mix before any training, and for tests."""

    def __init__(self, kinds):
        super().__init__()
        self.register_buffer("kinds", kinds)

    def forward(self, x, pos):
        return F.one_hot(self.kinds[:, pos].expand(x.shape[0], -1, -1), 3).float()


@torch.no_grad()
def benchmark_decode(contexts=(4096, 16384, 32768), mix=(0.05, 0.15, 0.80), new_tokens=256, warmup=16, batch=1,
                     device="cuda", dtype=torch.bfloat16):
    """Decode tokens/s and KV-cache memory after a long prompt: NAtS with its types fixed to a G/L/S
    mix (an untrained scorer gives no realistic one) against a dense cache, same model of the
    default width with random weights, measured in one run. Prints a table and returns its rows
    (dicts: context, attention, tokens_per_s, cache_mb, dense_cache_mb, peak_mb)."""
    rows = []
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
            model.forward_cached(idx[:, :T], caches)
            for t in range(T, T + warmup):  # first calls of each kernel out of the timing
                model.forward_cached(idx[:, t:t + 1], caches)
            _synchronize(device)
            start = time.perf_counter()
            for t in range(T + warmup, T + new_tokens):
                model.forward_cached(idx[:, t:t + 1], caches)
            _synchronize(device)
            rate = batch * (new_tokens - warmup) / (time.perf_counter() - start)
            stats = [c.stats() for c in caches]
            held, dense = (sum(s[key] for s in stats) / 2**20 for key in ("bytes", "dense_bytes"))
            peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
            print(f"| {T} | {attention} | {rate:.0f} | {held:.1f} | {dense:.1f} | {held / dense:.0%} | {peak:.0f} |",
                  flush=True)
            rows.append(dict(context=T, attention=attention, tokens_per_s=rate, cache_mb=held, dense_cache_mb=dense,
                             peak_mb=peak))
            del model, caches
    return rows


def _synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("the decode benchmark needs a CUDA GPU; on CPU try "
                         "benchmark_decode(contexts=(512,), device='cpu', dtype=torch.float32)")
    benchmark_decode()
