"""
Train a NAtS GPT on Shakespeare and watch it learn which tokens to keep.

    python train_shakespeare.py                      # baby GPT on a GPU, a small config on CPU
    python train_shakespeare.py --attention=dense    # the causal baseline
    python train_shakespeare.py --kv_weight=0.3 --max_iters=2000 --out_dir=out-sparse
    python train_shakespeare.py --resume             # continue from out_dir/ckpt.pt
    torchrun --standalone --nproc_per_node=2 train_shakespeare.py --gradient_accumulation_steps=2

Every module-level default below can be overridden with --key=value (nanoGPT style).
"""
import ast
import html
import json
import math
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import recall
from nats import GLOBAL, LOCAL, GPT, GPTConfig, eval_mode

# -----------------------------------------------------------------------------
# defaults: the baby GPT of nanoGPT's shakespeare_char, used when CUDA is available
out_dir = "out-shakespeare"
resume = False
eval_interval = 250
eval_iters = 200
log_interval = 50
dataset = "shakespeare"  # or "recall": the synthetic associative-recall task of data/recall.py
tokenizer = "char"  # Shakespeare: "char" or "gpt2" (tiktoken's GPT-2 BPE)
attention = "nats"  # "nats", "dense", or "sliding" (the StreamingLLM baseline: a sink plus a window)
attention_impl = "auto"  # NAtS attention: "triton", "reference", or "auto" (the kernel on CUDA)
init_from = ""  # with finetune_scorer: a checkpoint (out_dir/ckpt.pt) of a trained model to add NAtS to
finetune_scorer = False  # freeze that model, train only the scorers to match its hidden states (paper's recipe 2)
n_layer = 6
n_head = 6
n_kv_head = 6
n_embd = 384
block_size = 256
dropout = 0.2
init_std = 0.02  # initial weights ~ N(0, init_std); the recall task needs about 1 / sqrt(n_embd)
window = 16
kv_weight = 0.1
batch_size = 64
gradient_accumulation_steps = 1
max_iters = 5000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
lr_decay_iters = 5000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
seed = 1337
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16"  # autocast dtype on CUDA; CPU runs in float32
sample_tokens = 300
show_layer = -1  # layer and KV head whose token types are drawn at the end
show_head = 0

# without CUDA: small enough to finish in a few minutes on 2 cores, large enough to learn types
CPU_CONFIG = dict(n_layer=4, n_head=4, n_kv_head=4, n_embd=128, block_size=64, dropout=0.0,
                  batch_size=32, max_iters=600, lr_decay_iters=600, warmup_iters=50, learning_rate=2e-3,
                  eval_interval=100, eval_iters=20, log_interval=25, dtype="float32", window=8)
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
# -----------------------------------------------------------------------------


def parse_args(argv, defaults):
    """--key=value overrides of the defaults, each checked against the default's type."""
    overrides = {}
    for arg in argv:
        key, eq, value = arg[2:].partition("=") if arg.startswith("--") else (None, "", "")
        if key is None or key not in defaults:
            raise SystemExit(f"unknown argument {arg!r}; use --key=value with key one of: {', '.join(defaults)}")
        if not eq:  # a bare --flag means True
            value = "True"
        default = defaults[key]
        if isinstance(default, str):
            overrides[key] = value
            continue
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise SystemExit(f"--{key}={value}: expected a {type(default).__name__} like {default!r}")
        if isinstance(default, float) and isinstance(parsed, int) and not isinstance(parsed, bool):
            parsed = float(parsed)
        if type(parsed) is not type(default):
            raise SystemExit(f"--{key}={value}: expected a {type(default).__name__} like {default!r}")
        overrides[key] = parsed
    return overrides


def make_config(argv):
    """Defaults, then the CPU config if the run has no GPU, then the command line."""
    defaults = {k: v for k, v in globals().items()
                if not k.startswith("_") and k.islower() and isinstance(v, (int, float, bool, str))}
    overrides = parse_args(argv, defaults)
    config = dict(defaults)
    run_device = overrides.get("device", config["device"])
    if run_device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device={run_device} but CUDA is not available; pass --device=cpu")
    if run_device == "cpu":
        config.update(CPU_CONFIG)
        why = "small CPU config (no CUDA device" + (")" if not torch.cuda.is_available() else " chosen)")
    else:
        why = "baby-GPT config (CUDA device found)"
    config.update(overrides)
    return config, why


# -----------------------------------------------------------------------------
# data


def load_corpus(tokenizer):
    """Token arrays of the train and val splits (last 10 %), plus encode/decode and vocab size."""
    path = os.path.join(DATA_DIR, "shakespeare.txt")
    if not os.path.exists(path):
        raise SystemExit(f"missing corpus {path}; rebuild it as data/README.md describes")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if tokenizer == "char":
        chars = sorted(set(text))
        stoi = {c: i for i, c in enumerate(chars)}
        encode = lambda s: [stoi[c] for c in s]
        decode = lambda ids: "".join(chars[i] for i in ids)
        vocab_size = len(chars)
    elif tokenizer == "gpt2":
        import tiktoken
        enc = tiktoken.get_encoding("gpt2")
        encode, decode = enc.encode_ordinary, enc.decode
        vocab_size = 50304  # 50257 rounded up to a multiple of 64
    else:
        raise SystemExit(f"--tokenizer must be 'char' or 'gpt2', got {tokenizer!r}")
    cache = os.path.join(DATA_DIR, "cache", f"shakespeare_{tokenizer}.npy")
    if os.path.exists(cache):
        tokens = np.load(cache)
    else:  # built on first use, never committed
        tokens = np.array(encode(text), dtype=np.uint16)
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        np.save(cache + f".{os.getpid()}.tmp.npy", tokens)  # parallel runs (sweep --jobs) each write their own
        os.replace(cache + f".{os.getpid()}.tmp.npy", cache)
    split = int(0.9 * len(tokens))
    return tokens[:split], tokens[split:], encode, decode, vocab_size


def load_recall(length, n_val=2000):
    """The recall task: a function drawing n fresh training sequences [n, length] from a seed (a
    fixed pool gets memorized: on 20,000 sequences a 2-layer model learned their answers by heart
    and not the rule), and a fixed held-out val set."""
    train = lambda n, seed: recall.make_sequences(n, length, seed)
    encode = lambda s: [recall.ALPHABET.index(c) for c in s]
    decode = lambda ids: "".join(recall.ALPHABET[i] for i in ids)
    return train, recall.make_sequences(n_val, length, recall.VAL_SEED), encode, decode, len(recall.ALPHABET)


def load_dataset(cfg):
    if cfg["dataset"] == "shakespeare":
        return load_corpus(cfg["tokenizer"])
    if cfg["dataset"] == "recall":
        try:
            return load_recall(cfg["block_size"] + 1)
        except ValueError as e:
            raise SystemExit(f"--dataset=recall: {e}")
    raise SystemExit(f"--dataset must be 'shakespeare' or 'recall', got {cfg['dataset']!r}")


TRAIN_BATCH, TRAIN_NOISE, EVAL_BATCH = 0, 1, 2  # the random streams seed_of names


def seed_of(seed, stream, index):
    """The seed of batch `index` of one random stream: every micro-batch's data and Gumbel/dropout
    noise depend on its index alone, so runs resume exactly and a multi-GPU run sees the batches
    and noise a single-GPU run would."""
    return ((seed * 4_000_037 + stream) * 1_000_000_007 + index) % 2**63


def get_batch(data, batch_size, block_size, seed, device):
    """Random windows of a token stream (1-d data); or recall sequences, drawn fresh from the seed
    (data a function: training) or picked from a fixed set (2-d data, one a row: val), whose
    targets are -1 (not scored) except at the answers."""
    generator = torch.Generator().manual_seed(seed)
    if callable(data):
        rows = data(batch_size, seed)
    elif data.ndim == 2:
        rows = data[torch.randint(len(data), (batch_size,), generator=generator).numpy()]
    else:
        ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator).tolist()
        x = torch.from_numpy(np.stack([data[i:i + block_size] for i in ix]).astype(np.int64))
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))
        return x.to(device), y.to(device)
    x = torch.from_numpy(rows[:, :-1].astype(np.int64))
    y = torch.from_numpy(np.where(recall.answer_mask(rows), rows.astype(np.int64), -1)[:, 1:])
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# evaluation and reporting


@torch.no_grad()
def evaluate(model, splits, cfg, autocast, rank, world):
    """Mean cross-entropy (and accuracy on the scored targets) per split in eval() mode (argmax
    types), on the same batches every time, plus the NAtS statistics averaged over the val batches."""
    n_layer = len(model.transformer.h)
    result = {}
    with eval_mode(model):
        for name, data in splits.items():
            totals = eval_totals(model, data, cfg, autocast, rank, world) / cfg["eval_iters"]
            result[name], result[name + "_accuracy"] = totals[0].item(), (totals[1] / totals[2]).item()
            if name == "val" and cfg["attention"] != "dense":
                result["kv_fraction"] = totals[3:3 + n_layer].tolist()
                result["cache_size"] = totals[3 + n_layer:3 + 2 * n_layer].tolist()
                result["type_share"] = totals[-3:].tolist()
    return result


def eval_totals(model, data, cfg, autocast, rank, world):
    """Sums over the eval batches (each rank takes a share, then all are added): cross-entropy,
    correct and scored predictions, kv_fraction and cache size per layer, type shares."""
    n_layer = len(model.transformer.h)
    totals = torch.zeros(3 + 2 * n_layer + 3, dtype=torch.float64)
    for i in range(rank, cfg["eval_iters"], world):
        x, y = get_batch(data, cfg["batch_size"], cfg["block_size"], seed_of(cfg["seed"], EVAL_BATCH, i), cfg["device"])
        with autocast:
            logits, _ = model(x, y)
        scored = y != -1
        totals[:3] += torch.tensor([model.stats["ce"].item(), (logits.argmax(-1) == y)[scored].sum().item(),
                                    scored.sum().item()])
        if cfg["attention"] != "dense":
            layers = model.layer_stats()
            totals[3:3 + n_layer] += torch.tensor([l["kv_fraction"] for l in layers], dtype=torch.float64)
            totals[3 + n_layer:3 + 2 * n_layer] += torch.tensor([l["cache_size"] for l in layers], dtype=torch.float64)
            totals[-3:] += torch.tensor([l["type_share"] for l in layers], dtype=torch.float64).mean(0)
    return all_ranks_sum(totals, cfg["device"])


def format_eval(it, cfg, result, elapsed, eta):
    line = f"step {it:5d}/{cfg['max_iters']} | train {result['train']:.4f} val {result['val']:.4f}"
    if cfg["dataset"] == "recall":
        line += f" (recall accuracy {result['val_accuracy']:.1%})"
    if "kv_fraction" in result:
        kv = result["kv_fraction"]
        g, l, s = result["type_share"]
        line += (f" | kv {np.mean(kv):.3f} [{' '.join(f'{x:.2f}' for x in kv)}]"
                 f" | G {g:.0%} L {l:.0%} S {s:.0%} | end cache {np.mean(result['cache_size']):.1f}/{cfg['block_size']}")
    return line + f" | {hms(elapsed)} elapsed, ETA {hms(eta) if eta is not None else '?'}"


def hms(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def print_sample(model, val_data, encode, decode, vocab_size, autocast, cfg):
    """Generate from a new line (Shakespeare) or from a val sequence up to its first answer
    (recall), then show what the evicting cache held."""
    first = recall.answer_mask(val_data[:1])[0].argmax() if cfg["dataset"] == "recall" else None
    prompt = torch.tensor([encode("\n")] if first is None else val_data[:1, :first].astype(np.int64),
                          device=cfg["device"])
    caches = model.new_caches()
    with autocast:
        sample = model.generate(prompt, cfg["sample_tokens"], temperature=0.8, top_k=min(200, vocab_size),
                                caches=caches)
    print(f"\nsample:\n{decode(sample[0].tolist())}")
    print_cache_stats(caches)


def print_cache_stats(caches):
    """What the sample's KV cache held at its end, per layer, against a dense cache."""
    stats = [c.stats() for c in caches]
    held = " ".join(f"{s['tokens_mean']:.0f}/{s['tokens_max']:.0f}" for s in stats)
    kept, dense = sum(s["bytes"] for s in stats), sum(s["dense_bytes"] for s in stats)
    print(f"KV cache after {stats[0]['dense_tokens']} tokens: tokens held per layer (mean/max over heads) {held}; "
          f"{kept / 1e3:.1f} kB, {kept / dense:.0%} of a dense cache ({dense / 1e3:.1f} kB)")


TYPE_NAMES = ("Global", "Local", "Sliding")
ANSI = ("\033[1;97;41m", "\033[30;43m", "\033[2m")  # Global: white on red, Local: on yellow, Sliding: dim
HTML_STYLE = ("background:#d62728;color:white;font-weight:bold", "background:#ffd34d", "color:#999")


@torch.no_grad()
def show_token_types(model, tokens, decode, cfg):
    """Colour every token of a val snippet by its type: one layer and KV head in the terminal
    (--show_layer, --show_head), every layer and KV head in out_dir/token_types.html."""
    x = torch.from_numpy(tokens.astype(np.int64))[None].to(cfg["device"])
    with eval_mode(model):
        model(x)
    kinds = torch.stack([blk.attn.stats["token_types"][0].argmax(-1) for blk in model.transformer.h]).tolist()
    pieces = [decode([t]) for t in tokens.tolist()]
    layer, head = cfg["show_layer"] % len(kinds), cfg["show_head"]
    terminal = "".join(f"{ANSI[k]}{p.replace(chr(10), '↵' + chr(10))}\033[0m"
                       for p, k in zip(pieces, kinds[layer][head]))
    legend = "  ".join(f"{ANSI[k]}{name}\033[0m" for k, name in enumerate(TYPE_NAMES))
    print(f"\ntoken types, layer {layer} KV head {head} ({legend}):\n{terminal}\n")
    globals_per_head = " | ".join(f"layer {l}: " + " ".join(str(row.count(GLOBAL)) for row in heads)
                                  for l, heads in enumerate(kinds))
    print(f"Global tokens per KV head in these {len(pieces)}: {globals_per_head}")
    legend_html = " ".join(f'<span style="{HTML_STYLE[k]}">{name}</span>' for k, name in enumerate(TYPE_NAMES))
    blocks = "".join(f"<h4>layer {l}, KV head {h}: {row.count(GLOBAL)} Global, {row.count(LOCAL)} Local</h4>"
                     f"<pre style='font-size:14px;line-height:1.5;white-space:pre-wrap'>"
                     + "".join(f'<span style="{HTML_STYLE[k]}" title="{TYPE_NAMES[k]}">{html.escape(p)}</span>'
                               for p, k in zip(pieces, row)) + "</pre>"
                     for l, heads in enumerate(kinds) for h, row in enumerate(heads))
    page = (f"<!doctype html><meta charset='utf-8'><title>NAtS token types</title>"
            f"<h3>Token types of every layer and KV head ({legend_html})</h3>{blocks}")
    path = os.path.join(cfg["out_dir"], "token_types.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"wrote {path}")


@torch.no_grad()
def print_types_by_role(model, val_data, cfg):
    """Recall: the share of each role that every layer and KV head marks Global, over 512 val
    sequences. The heads that do the lookup keep the pairs' values; the filler need not stay."""
    x = val_data[:512, :-1]
    with eval_mode(model):
        model(torch.from_numpy(x.astype(np.int64)).to(cfg["device"]))
    roles = recall.roles(x)
    print(f"share marked Global over {len(x)} val sequences, by role ({', '.join(roles)}):")
    for l, blk in enumerate(model.transformer.h):
        is_global = (blk.attn.stats["token_types"].argmax(-1) == GLOBAL).cpu().numpy()
        for h in range(is_global.shape[1]):
            shares = " ".join(f"{is_global[:, h][m].mean():4.0%}" for m in roles.values())
            print(f"  layer {l} KV head {h}: {shares}")


# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path, model, optimizer, model_args, it, best_val, cfg):
    """Everything --resume needs to continue exactly (the randomness is seeded per batch, see
    seed_of), written atomically: a temp file, then a rename."""
    checkpoint = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), model_args=model_args,
                      iter_num=it, best_val_loss=best_val, config=cfg)
    torch.save(checkpoint, path + ".tmp")
    os.replace(path + ".tmp", path)


def save_history(history, cfg):
    """The losses and evals so far, as out_dir/history.json (rewritten at every eval)."""
    with open(os.path.join(cfg["out_dir"], "history.json.tmp"), "w") as f:
        json.dump(history, f)
    os.replace(os.path.join(cfg["out_dir"], "history.json.tmp"), os.path.join(cfg["out_dir"], "history.json"))


def load_teacher(cfg):
    """The frozen model whose hidden states the scorers learn to keep (dense attention)."""
    if not cfg["init_from"] or not os.path.exists(cfg["init_from"]):
        raise SystemExit(f"--finetune_scorer needs --init_from=<checkpoint of a trained model>, got {cfg['init_from']!r}")
    checkpoint = torch.load(cfg["init_from"], map_location=cfg["device"], weights_only=False)
    teacher = GPT(GPTConfig(**dict(checkpoint["model_args"], attention="dense")))
    teacher.load_state_dict({k: v for k, v in checkpoint["model"].items() if "scorer" not in k})
    teacher.to(cfg["device"]).eval().requires_grad_(False)
    return teacher


def setup_distributed(cfg):
    """Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) join the process group: NCCL and one GPU
    per process on CUDA, gloo on CPU. Returns (rank, world size); a plain run is (0, 1)."""
    if "RANK" not in os.environ:
        return 0, 1
    if cfg["device"].startswith("cuda"):
        cfg["device"] = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(cfg["device"])
    dist.init_process_group("nccl" if cfg["device"].startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def all_ranks_sum(t, device):
    """The sum of t over all processes (t itself in a single-process run)."""
    if not dist.is_initialized():
        return t
    t = t.to(device)
    dist.all_reduce(t)
    return t.cpu()


def learning_rate_at(it, cfg):
    """Linear warmup, then cosine decay to min_lr."""
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
    if it > cfg["lr_decay_iters"]:
        return cfg["min_lr"]
    ratio = (it - cfg["warmup_iters"]) / max(1, cfg["lr_decay_iters"] - cfg["warmup_iters"])
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg["learning_rate"] - cfg["min_lr"])


# -----------------------------------------------------------------------------


def train(cfg):
    """Train with the config dict; return the history of losses and evals (used by the tests).
    Under torchrun every process runs this; rank 0 logs, checkpoints and samples."""
    rank, world = setup_distributed(cfg)
    log = print if rank == 0 else (lambda *args, **kwargs: None)
    gas = cfg["gradient_accumulation_steps"]
    if gas % world:
        raise SystemExit(f"--gradient_accumulation_steps={gas} must be a multiple of the {world} processes: "
                         f"each takes an equal share of the global batch; pass e.g. {world * max(1, gas // world)}")
    os.makedirs(cfg["out_dir"], exist_ok=True)
    device_type = "cuda" if cfg["device"].startswith("cuda") else "cpu"
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (torch.autocast(device_type="cuda", dtype=getattr(torch, cfg["dtype"]))
                if device_type == "cuda" and cfg["dtype"] != "float32" else torch.autocast("cpu", enabled=False))
    # float16 needs its gradients scaled against underflow; bfloat16 and float32 do not
    scaler = torch.amp.GradScaler(device_type, enabled=device_type == "cuda" and cfg["dtype"] == "float16")
    train_data, val_data, encode, decode, vocab_size = load_dataset(cfg)

    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    model_keys = ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "dropout", "attention", "window",
                  "kv_weight", "init_std")
    teacher = load_teacher(cfg) if cfg["finetune_scorer"] else None
    if cfg["resume"]:
        if not os.path.exists(ckpt_path):
            raise SystemExit(f"--resume: no checkpoint at {ckpt_path}")
        checkpoint = torch.load(ckpt_path, map_location=cfg["device"], weights_only=False)
        model_args = checkpoint["model_args"]
    elif teacher is not None:  # the teacher's shape, with NAtS attention
        model_args = dict(asdict(teacher.config), attention="nats", window=cfg["window"], kv_weight=cfg["kv_weight"])
        model_args.pop("attention_impl")
    else:
        model_args = {key: cfg[key] for key in model_keys}
        model_args["vocab_size"] = vocab_size
    for key in model_keys:  # what the model really is (checkpoints older than init_std lack it)
        cfg[key] = model_args.get(key, cfg[key])
    if not (-cfg["n_layer"] <= cfg["show_layer"] < cfg["n_layer"] and 0 <= cfg["show_head"] < cfg["n_kv_head"]):
        raise SystemExit(f"--show_layer={cfg['show_layer']} --show_head={cfg['show_head']}: the model has "
                         f"{cfg['n_layer']} layers and {cfg['n_kv_head']} KV heads; pass a layer in "
                         f"[-{cfg['n_layer']}, {cfg['n_layer'] - 1}] and a head in [0, {cfg['n_kv_head'] - 1}]")
    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
    model = GPT(GPTConfig(**model_args, attention_impl=cfg["attention_impl"])).to(cfg["device"])
    if teacher is not None:
        missing, unexpected = model.load_state_dict(teacher.state_dict(), strict=False)
        assert not unexpected and all("scorer" in name for name in missing), (missing, unexpected)
        for name, p in model.named_parameters():
            p.requires_grad = "scorer" in name
    optimizer = model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"],
                                           (cfg["beta1"], cfg["beta2"]), device_type)
    it, best_val = 0, float("inf")
    if cfg["resume"]:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        it, best_val = checkpoint["iter_num"], checkpoint["best_val_loss"]
        log(f"resumed from {ckpt_path} at step {it}")
    data_text = "fresh recall sequences" if callable(train_data) else f"{train_data.size:,} train tokens"
    log(f"model: {model.get_num_params() / 1e6:.2f}M parameters, attention={cfg['attention']}, {data_text}, "
        f"vocab {vocab_size}" + (f", {world} processes" if world > 1 else ""))
    trainer = DDP(model) if world > 1 else model  # the scorers get gradients every step: no unused parameters

    history = dict(loss={}, evals=[])
    tokens_per_iter = cfg["batch_size"] * cfg["block_size"] * gas
    start, start_it = time.time(), it
    window_start, window_it = time.time(), it
    while True:
        lr = learning_rate_at(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if it % cfg["eval_interval"] == 0 or it == cfg["max_iters"]:
            result = evaluate(model, {"train": train_data, "val": val_data}, cfg, autocast, rank, world)
            elapsed = time.time() - start
            eta = elapsed / (it - start_it) * (cfg["max_iters"] - it) if it > start_it else None
            log(format_eval(it, cfg, result, elapsed, eta))
            history["evals"].append(dict(iter=it, **result))
            history["elapsed"] = elapsed
            best_val = min(best_val, result["val"])
            if rank == 0:
                save_history(history, cfg)
                if it > start_it:
                    save_checkpoint(ckpt_path, model, optimizer, model_args, it, best_val, cfg)
        if it >= cfg["max_iters"]:
            break

        # Global micro-batch g = it * gas + m; this rank takes an equal, contiguous share of them.
        step_totals = torch.zeros(2, dtype=torch.float64)  # loss, kv_fraction summed over micro-batches
        for m in range(rank * gas // world, (rank + 1) * gas // world):
            batch = it * gas + m
            x, y = get_batch(train_data, cfg["batch_size"], cfg["block_size"], seed_of(cfg["seed"], TRAIN_BATCH, batch),
                             cfg["device"])
            torch.manual_seed(seed_of(cfg["seed"], TRAIN_NOISE, batch))  # Gumbel and dropout noise
            if world > 1:  # all-reduce the gradients once, after this rank's last micro-batch
                trainer.require_backward_grad_sync = m == (rank + 1) * gas // world - 1
            with autocast:
                _, loss = trainer(x, y, teacher=teacher)
            scaler.scale(loss / gas * world).backward()  # DDP averages over the ranks
            step_totals += torch.tensor([loss.item(), model.stats.get("kv_fraction", torch.zeros(1)).mean().item()])
        if cfg["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        loss_value, kv_value = (all_ranks_sum(step_totals, cfg["device"]) / gas).tolist()
        if not math.isfinite(loss_value):
            raise SystemExit(f"loss is {loss_value} at step {it}: stopping. Try a lower --learning_rate, "
                             f"--dtype=float32, or --resume from the last checkpoint in {cfg['out_dir']}")
        history["loss"][it] = loss_value
        it += 1
        if it % cfg["log_interval"] == 0:
            dt = time.time() - window_start
            kv_text = f", kv {kv_value:.3f}" if cfg["attention"] != "dense" else ""
            log(f"  iter {it}: loss {loss_value:.4f}{kv_text}, {tokens_per_iter * (it - window_it) / dt / 1e3:.1f}k tok/s, "
                f"{(it - window_it) / dt:.2f} it/s, lr {lr:.2e}")
            window_start, window_it = time.time(), it

    history["elapsed"] = time.time() - start
    if rank == 0:
        save_history(history, cfg)
        if cfg["sample_tokens"] > 0:
            print_sample(model, val_data, encode, decode, vocab_size, autocast, cfg)
        if cfg["attention"] == "nats":
            snippet = val_data[-1, :-1] if val_data.ndim == 2 else val_data[-cfg["block_size"]:]
            show_token_types(model, snippet, decode, cfg)
            if cfg["dataset"] == "recall":
                print_types_by_role(model, val_data, cfg)
    if world > 1:
        dist.destroy_process_group()
    return history


if __name__ == "__main__":
    config, why = make_config(sys.argv[1:])
    if os.environ.get("RANK", "0") == "0":
        print(f"config: {why}: {config['n_layer']} layers x {config['n_head']} heads x {config['n_embd']} wide, "
              f"context {config['block_size']}, batch {config['batch_size']}, {config['max_iters']} iterations "
              f"on {config['device']}")
    train(config)
