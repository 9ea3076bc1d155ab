"""
The quality / KV-cache trade-off in one command: train dense, sliding-window (StreamingLLM), NAtS
at matched KV budgets and random Global tokens at the same budgets, with the same data and config,
over one or more seeds; then write a table and a Pareto plot of val loss (or recall accuracy)
against the share of the KV cache each keeps.

    python sweep.py --seeds=1,2,3 --jobs=8                  # the language-model table (2 GPUs: 4 runs on each)
    python sweep.py config/recall.py --kv_budgets=0.15 --windows=18 --seeds=1,2,3 --jobs=8
    python sweep.py --kv_budgets=0.15 --kv_weights=0.01,0.1 --windows=16,32 --finetune_iters=1000 --jobs=8
    python sweep.py config/smollm2.py --kv_budgets=0.05,0.1,0.15 --windows=204,409,614 --gs_budgets=0.15

With a pretrained model (config/smollm2.py) the NAtS runs retrofit its scorers and the other
patterns evaluate its weights as they are (no training).

The sweep's own flags:
    --kv_budgets        NAtS runs, one per target kv share (--kv_budget), and for each a run of
                        "random Globals": token 0 and a random share of the others Global, the rest
                        Sliding, the share set so that the expected kv share is the budget
    --kv_weights        NAtS runs at fixed lambdas (--kv_weight)
    --windows           sliding-window runs, one per W (the defaults, 24 and 38, keep 0.1 and 0.15
                        of the entries at context 512, the default budgets)
    --seeds             every run once per seed (default: the config's seed); the table gives
                        the mean and every seed's value
    --finetune_iters    if > 0, also fine-tune the scorers of each dense run for that many steps,
    --finetune_weights  at these lambdas (default: the middle NAtS run's budget or lambda)
    --gs_budgets        NAtS runs whose scorers choose between Global and Sliding only (no Local)
    --jobs              runs at a time, each its own process, spread over the visible GPUs
Config files and every other --key=value go to train_shakespeare.py (--overwrite to run again into
the same out_dir). Writes out_dir/sweep.md and sweep.json, and sweep.png if matplotlib is
installed, also when the sweep is stopped (Ctrl-C, a timeout's SIGTERM): then with what every
run reached, its last eval's step in the table. A file of those names already in out_dir is
kept: an earlier sweep's is continued with --resume, and any is replaced only with --overwrite.
Each run keeps its own folder under out_dir, with its log (train.log when --jobs > 1),
history.json, checkpoint and token-type picture.
"""
import difflib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import torch

import train_shakespeare as ts
from data import RECALL_TASKS
from nats import random_global_share, script_output, sink_and_window_kv

SWEEP_DEFAULTS = dict(kv_budgets="0.1,0.15", kv_weights="", windows="24,38", seeds="", finetune_iters=0,
                      finetune_weights="", gs_budgets="", jobs=1)
FLAG_EXAMPLES = dict(SWEEP_DEFAULTS, kv_weights="0.01,0.1", seeds="1,2,3", finetune_iters=1000, finetune_weights="0.1",
                     gs_budgets="0.15", jobs=8)
PER_RUN = ("attention", "random_global", "local_type")  # what the sweep sets for each of its runs
FIXED = {key: type(ts.defaults()[key])() for key in ts.NATS_SCHEDULE}  # a recipe's NAtS schedule in runs without
# one: zeros of each setting's type, as the run's own process reads its flags (0.0 for kv_budget)


def split_args(argv):
    """The sweep's own flags, and the rest for train_shakespeare.py."""
    own = dict(SWEEP_DEFAULTS)
    known = [*SWEEP_DEFAULTS, *ts.defaults()]
    rest = []
    for arg in argv:
        key, eq, value = arg[2:].partition("=")
        if arg.startswith("--") and key in own and not eq:  # --kv_budgets 0.9 would read 0.9 as a config file
            empty = f", --{key}= for none" if isinstance(own[key], str) and key != "seeds" else ""
            raise SystemExit(f"{arg} needs a value: write --{key}=<value>, like --{key}={FLAG_EXAMPLES[key]} "
                             f"(one word, with '='{empty})")
        if arg.startswith("--") and key == "seeds" and not value:  # as if left out would silently take the config's
            raise SystemExit("--seeds is empty: pass seeds like --seeds=1,2,3, or leave it out for the config's seed")
        if arg.startswith("--") and key in own:
            if isinstance(own[key], int) and not value.isdecimal():  # (isdigit takes "²", which int() does not)
                raise SystemExit(f"--{key}={value}: expected a whole number >= {min(own[key], 1)}, like "
                                 f"--{key}={FLAG_EXAMPLES[key]}")
            own[key] = value if isinstance(own[key], str) else int(value)
        elif arg.startswith("--") and key not in known:  # the training script would name only its own
            close = difflib.get_close_matches(key.lower(), known, n=1)
            hint = f"did you mean --{close[0]}? " if close else ""
            raise SystemExit(f"unknown argument {arg!r}; {hint}use --key=value with key one of the sweep's own: "
                             f"{', '.join(SWEEP_DEFAULTS)}, or the training script's: {', '.join(ts.defaults())}")
        elif key in PER_RUN:  # each run has its own
            raise SystemExit(f"--{key}: the sweep sets it for each run (dense, sliding, NAtS, random Globals, G+S); "
                             f"drop it")
        else:
            rest.append(arg)
    if own["jobs"] < 1:
        raise SystemExit(f"--jobs={own['jobs']}: pass the number of runs at a time, at least 1")
    return own, rest


def numbers(own, key, kind):
    """The comma-separated list of --key as numbers of that kind (empty: none), or an error saying what to pass."""
    try:
        values = [kind(w) for w in own[key].split(",")] if own[key] else []
    except ValueError:
        example = FLAG_EXAMPLES[key]
        raise SystemExit(f"--{key}={own[key]}: expected {'whole ' if kind is int else ''}numbers separated by commas, "
                         f"like --{key}={example}") from None
    if len(set(values)) < len(values):  # two runs of one name would share a folder
        raise SystemExit(f"--{key}={own[key]} names a value twice; pass each once")
    if not all(0 <= v < float("inf") for v in values):  # seeds, windows, lambdas and shares: none is negative
        raise SystemExit(f"--{key}={own[key]}: pass finite numbers >= 0")
    return values


def shares(own, key):
    """--kv_budgets or --gs_budgets as a list of shares of the attention entries to keep, or an
    error saying what to pass."""
    values = numbers(own, key, float)
    if not all(0 < b <= 1 for b in values):
        raise SystemExit(f"--{key}={own[key]}: pass shares of the attention entries to keep, in (0, 1], like "
                         f"--{key}=0.1,0.15")
    return values


def variants(own, base):
    """(name, config, name of the run it starts from) of every run: for every seed, dense first."""
    seeds = numbers(own, "seeds", int)
    runs = []
    for seed in seeds or [base["seed"]]:
        tag = f" seed={seed}" if seeds else ""
        for name, changes, parent in seed_variants(own, base, tag):
            runs.append((name + tag, dict(base, **changes, seed=seed, out_dir=run_dir(base, name + tag)),
                         parent and parent + tag))
    return runs


def seed_variants(own, base, tag):
    """(name, changes to the base config, name of the run it starts from) of one seed's runs; tag
    ends the name of that seed's dense run, whose checkpoint fine-tuning starts from."""
    budgets, weights = shares(own, "kv_budgets"), numbers(own, "kv_weights", float)
    nats = [(f"budget={b}", dict(kv_budget=b)) for b in budgets]  # a recipe's dense warm-up stays
    nats += [(f"lambda={w}", dict(kv_budget=0.0, budget_anneal=0, kv_weight=w)) for w in weights]  # no budget to anneal
    runs = [("dense", dict(FIXED, attention="dense"), None)]
    runs += [(f"sliding W={w}", dict(FIXED, attention="sliding", window=w), None) for w in numbers(own, "windows", int)]
    runs += [(f"nats {target}", dict(changes, attention="nats"), None) for target, changes in nats]
    runs += [(f"nats G+S budget={b}", dict(kv_budget=b, attention="nats", local_type=False), None)
             for b in shares(own, "gs_budgets")]
    runs += [(f"random Globals budget={b}", dict(FIXED, attention="random", random_global=random_global_share(
        b, base["block_size"], base["window"])), None) for b in budgets]
    if base.get("init_from"):  # a retrofit: the fixed patterns evaluate the weights of init_from as they are
        runs = [(name, dict(changes, finetune_scorer=False, max_iters=0) if changes["attention"] != "nats" else changes,
                 parent) for name, changes, parent in runs]
    if own["finetune_iters"] > 0 and base.get("init_from"):  # its dense run only evaluates: no checkpoint
        raise SystemExit(f"--finetune_iters={own['finetune_iters']} fine-tunes the scorers of the sweep's dense run, "
                         f"and with --init_from that run evaluates the weights given, with no checkpoint (its NAtS "
                         f"runs train scorers on them already): pass --finetune_iters=0")
    if own["finetune_iters"] > 0 and base.get("max_iters") == 0:  # (found after every other run, it was)
        raise SystemExit(f"--finetune_iters={own['finetune_iters']} fine-tunes the scorers of the sweep's dense run, "
                         f"and with --max_iters=0 that run only evaluates, with no checkpoint: pass --max_iters >= 1 "
                         f"or --finetune_iters=0")
    if own["finetune_iters"] > 0:
        given = numbers(own, "finetune_weights", float)
        middle = [nats[len(nats) // 2]] if nats else []
        if not given and not middle:
            raise SystemExit(f"--finetune_iters={own['finetune_iters']} fine-tunes at the lambdas of "
                             f"--finetune_weights, or at the middle NAtS run's budget or lambda, and this sweep "
                             f"has none: pass --finetune_weights=0.1, or --kv_budgets or --kv_weights")
        dense = os.path.join(run_dir(base, "dense" + tag), "ckpt.pt")
        steps = own["finetune_iters"]  # the learning rate's warm-up ends before its decay (check_config): the run's
        warmup = base["warmup_iters"] if base["warmup_iters"] < steps else steps // 10  # or a tenth of the steps
        for target, changes in [(f"lambda={w}", dict(kv_budget=0.0, kv_weight=w)) for w in given] or middle:
            runs.append((f"nats fine-tuned {target}", dict(
                changes, attention="nats", dense_warmup=0, budget_anneal=0, finetune_scorer=True, max_iters=steps,
                lr_decay_iters=steps, warmup_iters=warmup, init_from=dense), "dense"))
    return runs


def run_dir(base, name):
    return os.path.join(base["out_dir"], name.replace(" ", "_"))


def train_in_turn(runs):
    """Train the runs one after another in this process."""
    for i, (name, cfg, _) in enumerate(runs):
        print(f"\n=== {name}")
        torch.compiler.reset()  # each run compiles its own model; the last run's graphs would only pile up
        try:
            ts.train(cfg)
        except SystemExit as e:  # stopped (Ctrl-C, SIGTERM) or failed: after the run's message, the sweep's hint
            if not isinstance(e.code, str):
                raise
            evaluated = any(os.path.isfile(os.path.join(run[1]["out_dir"], "history.json")) for run in runs[:i + 1])
            hint = ("the same sweep command with --resume continues the sweep" if e.code.startswith("\nstopped")
                    else "what the runs reached is in the table" if evaluated  # a failure would fail again when
                    else "no run reached an eval, so there is no table")  # resumed: no hint to resume
            stop = e.code.partition("; continue with --resume")[0]  # the run's own hint, not for a sweep's run
            raise SystemExit(f"{stop}\nsweep: stopped in run {name!r}; {hint}") from None


def train_in_processes(runs, jobs):
    """Train the runs `jobs` at a time, each in its own process (its log in out_dir/train.log), on
    the visible GPU running the fewest of them; a run waits for the run it starts from. Returns
    the names of the runs that failed or were skipped (the run they start from failed)."""
    gpus = (os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(map(str, range(torch.cuda.device_count())))).split(",")
    pending, running, finished = list(runs), {}, set()
    try:
        while pending or running:
            ready = [run for run in pending if run[2] is None or run[2] in finished]
            for name, cfg, parent in ready[:jobs - len(running)]:
                gpu = min(gpus, key=lambda g: sum(g == used for _, used, _ in running.values()))
                running[name] = (start_run(cfg, gpu), gpu, cfg["out_dir"])
                pending.remove((name, cfg, parent))
                print(f"started {name}" + (f" on GPU {gpu}" if gpu else ""))
            for name, (process, _, out_dir) in list(running.items()):
                if process.poll() is not None:
                    del running[name]
                    if process.returncode == 0:
                        finished.add(name)
                    print(f"{name}: " + ("done" if process.returncode == 0 else f"failed, see {out_dir}/train.log"))
            if not running and pending and not ready:
                print(f"skipped, the run they start from failed: {', '.join(run[0] for run in pending)}")
                break
            time.sleep(2)
        return [name for name, _, _ in runs if name not in finished]
    finally:  # stopped (Ctrl-C, a timeout): stop the runs too
        for process, _, _ in running.values():
            process.terminate()


def start_run(cfg, gpu):
    """Start one run's process, its output in out_dir/train.log: a resumed run's goes after the log
    it continues, under a line that says so."""
    os.makedirs(cfg["out_dir"], exist_ok=True)
    with open(os.path.join(cfg["out_dir"], "train.log"), "a" if cfg["resume"] else "w") as log:
        if cfg["resume"]:
            log.write(f"\n=== resumed {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            log.flush()  # before the process writes to the same file
        return subprocess.Popen([sys.executable, ts.__file__] + run_args(cfg), stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, CUDA_VISIBLE_DEVICES=gpu))


def run_args(cfg):
    """A run's settings as the flags of its own process: all that it uses (the training script
    would note each setting given that the run does not use, such as a dense run's --kv_weight)."""
    unused = ts.unused_settings(cfg)
    return [f"--{k}={v}" for k, v in cfg.items() if k not in unused]


def collect(runs, since):
    """A summary of every run of this sweep with an eval: those whose history.json was written
    since the time `since` (finished or stopped; not a failed run's leftover from an earlier sweep)
    and the runs it resumed (one that had finished leaves its history as it was)."""
    rows = []
    for name, cfg, _ in runs:
        path = os.path.join(cfg["out_dir"], "history.json")
        if os.path.exists(path) and (cfg["resume"] or os.path.getmtime(path) >= int(since)):
            with open(path) as f:
                history = json.load(f)
            if history.get("evals"):
                rows.append(summarize(name, cfg, history))
    return rows


def summarize(name, cfg, history):
    """One run's last eval as a row of sweep.json."""
    last = history["evals"][-1]
    kv = last.get("kv_fraction")
    lambdas = history.get("kv_weight", {})
    return dict(run=name, variant=name.split(" seed=")[0], seed=cfg["seed"], steps=last["iter"],
                max_iters=cfg["max_iters"], val=last["val"], val_accuracy=last["val_accuracy"],
                kv_fraction=sum(kv) / len(kv) if kv else 1.0,
                cache_size=sum(last["cache_size"]) / len(last["cache_size"]) if kv else None,
                type_share=last.get("type_share"), minutes=history["elapsed"] / 60,
                kv_weight=lambdas[max(lambdas, key=int)] if lambdas else None,
                global_share_by_role=history.get("global_share_by_role"), **history.get("long_context", {}))


def by_variant(rows):
    """The rows grouped by variant (its seeds together), the smallest mean kv share first."""
    groups = {}
    for r in rows:
        groups.setdefault(r["variant"], []).append(r)
    return sorted(groups.items(), key=lambda item: sum(r["kv_fraction"] for r in item[1]) / len(item[1]))


def spread(values, fmt):
    """The mean of values, and each value (in seed order) after it when there are several."""
    mean = fmt.format(sum(values) / len(values))
    return mean if len(values) == 1 else f"{mean} ({' / '.join(fmt.format(v) for v in values)})"


def write_table(rows, base, path, left=(), others=(), failed=()):
    """sweep.md: a row per variant, the mean over its seeds and every seed's value; then the runs
    `left` out (a stopped sweep's runs that had no eval yet, or had not started), the folders of
    `others` beside them (runs of another sweep into the same out_dir) and the runs that `failed`."""
    recall = base["dataset"] in RECALL_TASKS
    seeds = sorted({r["seed"] for r in rows})
    extra = long_context_keys(rows)
    card = (f" ({torch.cuda.device_count()} x {torch.cuda.get_device_name()})"
            if ts.device_type(base["device"]) == "cuda" else "")
    longer = sorted({r["run"] for r in rows if r["steps"] > base["max_iters"]})  # a resumed sweep's earlier runs
    past = f" ({', '.join(longer)}: more, from an earlier --max_iters; see steps)" if longer else ""
    lines = [f"{ts.describe_run(base)}, W = {base['window']}, {base['max_iters']} iterations{past}, seeds "
             f"{', '.join(map(str, seeds))}, device {base['device']}{card}, {time.strftime('%Y-%m-%d')}", "",
             "| run | val loss |" + (" recall accuracy |" if recall else "")
             + " kv share | end cache | G / L / S | steps | minutes |" + "".join(f" {k} |" for k in extra),
             "|---|---|" + ("---|" if recall else "") + "---|---|---|---|---|" + "---|" * len(extra)]
    for variant, group in by_variant(rows):
        group = sorted(group, key=lambda r: r["seed"])
        shares = [r["type_share"] for r in group if r["type_share"]]
        types = " / ".join(f"{sum(s[k] for s in shares) / len(shares):.0%}" for k in range(3)) if shares else "-"
        caches = [r["cache_size"] for r in group if r["cache_size"] is not None]
        cache = f"{sum(caches) / len(caches):.1f}" if caches else str(base["block_size"])
        kvs = [r["kv_fraction"] for r in group]
        kv = f"{sum(kvs) / len(kvs):.3f}" + (f" ({min(kvs):.3f}-{max(kvs):.3f})" if len(kvs) > 1 else "")
        lines.append(f"| {variant} | {spread([r['val'] for r in group], '{:.4f}')} |"
                     + (f" {spread([100 * r['val_accuracy'] for r in group], '{:.1f}')} % |" if recall else "")
                     + f" {kv} | {cache} | {types} | {min(r['steps'] for r in group)} |"
                     + f" {sum(r['minutes'] for r in group) / len(group):.1f} |"
                     + "".join(f" {long_context_cell(group, k)} |" for k in extra))
    if left:
        lines += ["", f"Not in the table (stopped before their first eval, or not started): {', '.join(left)}; "
                      f"the same command with --resume continues the sweep."]
    if others:
        lines += ["", f"Also in {base['out_dir']}, not in this table (runs of another sweep into this folder): "
                      f"{', '.join(others)}."]
    if failed:
        lines += ["", f"Failed or skipped (their train.log says why; a row of theirs holds their last eval): "
                      f"{', '.join(failed)}."]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


LONG_CONTEXT = {"ppl": "{:.2f}", "kv": "{:.3f}", "passkey": "{:.0%}"}  # train_shakespeare.long_context_eval's


def long_context_cell(group, key):
    """The mean and seeds' values of one long-context measure, "-" where no run got that far."""
    values = [r[key] for r in group if key in r]
    return spread(values, LONG_CONTEXT[key.split("@")[0]]) if values else "-"


def long_context_keys(rows):
    """The long-context measures the runs have (train_shakespeare.long_context_eval): perplexity and
    kv share at each context, passkey accuracy at each length, in that order."""
    keys = {k for r in rows for k in r if k.split("@")[0] in LONG_CONTEXT}
    return sorted(keys, key=lambda k: (list(LONG_CONTEXT).index(k.split("@")[0]), int(k.split("@")[1])))


def plot(rows, base, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    contexts = [k for k in long_context_keys(rows) if k.startswith("ppl@")]
    metric = "val_accuracy" if base["dataset"] in RECALL_TASKS else contexts[-1] if contexts else "val"
    share = f"kv@{metric[4:]}" if contexts else "kv_fraction"  # the kv share where the perplexity is measured
    fig, ax = plt.subplots(figsize=(7, 4))
    markers = {"nats": "o", "fine-tuned": "D", "sliding": "s", "dense": "*", "random": "X"}
    for i, (variant, group) in enumerate(by_variant(rows)):
        kind = "fine-tuned" if "fine-tuned" in variant else variant.split()[0]
        group = [r for r in group if metric in r]
        ax.scatter([r.get(share, r["kv_fraction"]) for r in group], [r[metric] for r in group], color=f"C{i % 10}",
                   marker=markers[kind], s=60, label=variant)  # one point per seed
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))  # not point labels: they overlap
    ax.set_xlabel("KV share kept (kv_fraction)")
    ax.set_ylabel({"val_accuracy": "recall accuracy", "val": "val loss"}.get(metric, f"val perplexity at {metric[4:]}"))
    ax.set_title(f"{base['dataset']}: quality against KV cache")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def shared_settings(own, rest, given):
    """The settings the runs share (train_shakespeare.py's make_config of the rest of argv), what
    they are based on, and {setting: its line} of the config files' settings the sweep sets for
    each run itself (PER_RUN, kv_budget). Each run resumes from its own folder, so the sweep's
    folder is not read as a run's; each NAtS run takes its budget from --kv_budgets (or
    --gs_budgets), so --kv_budget and a config file's kv_budget are none of theirs: the shared
    settings are checked with the sweep's largest budget, if it has any (each run's own is checked
    with it later), and PER_RUN's defaults (a file's local_type = False would make G+S of every
    NAtS run)."""
    kv, gs = shares(own, "kv_budgets"), shares(own, "gs_budgets")
    flag, budget = ("gs_budgets", max(gs)) if gs and not kv else ("kv_budgets", max(kv, default=0.0))
    argv = [arg for arg in rest if arg.partition("=")[0] not in ("--resume", "--kv_budget")]
    known = ts.defaults()
    try:
        base, why = ts.make_config(argv + [f"--{key}={known[key]}" for key in PER_RUN] + [f"--kv_budget={budget}"])
    except SystemExit as e:
        raise SystemExit(sweeps_message(str(e), given, flag)) from None
    base["resume"] = "resume" in given and ts.parse_value("resume", given["resume"] or "True", False)  # a bare flag
    if base["resume"] and base["overwrite"]:
        raise SystemExit("--resume continues the sweep in out_dir, --overwrite starts its runs over: pass one of them")
    from_files, lines = {}, {}
    for arg in argv:
        if not arg.startswith("--"):  # a config file (read by make_config already, so a good one)
            from_files.update(ts.read_recipe(arg, known, lines))
    return base, why, {key: f"{key} = {from_files[key]!r} ({lines[key]})" for key in ("kv_budget", *PER_RUN)
                       if key in from_files}


def sweeps_message(message, given, flag):
    """A training script's message about the budget, naming the flag of the sweep's that gave it
    (kv_budgets or gs_budgets)."""
    message = re.sub(r"--kv_budget\b(?!s)", f"--{flag}", message)
    if flag == "kv_budgets" and "--kv_budgets=" in message and "kv_budgets" not in given:
        message += f" (--kv_budgets={SWEEP_DEFAULTS['kv_budgets']} is the sweep's default: pass your own)"
    return message


OUTPUTS = ("sweep.md", "sweep.json", "sweep.png")


def check_outputs(base):
    """Refuses an out_dir holding a file of the name of one the sweep writes (OUTPUTS) unless the
    sweep may write over it: an earlier sweep's with --resume or --overwrite, a user's own file
    with --overwrite only (a training run's files there are none of them: the default out_dir of
    both, its runs go in subfolders). Raises SystemExit naming the file."""
    found = [os.path.join(base["out_dir"], name) for name in OUTPUTS
             if os.path.lexists(os.path.join(base["out_dir"], name))]
    folders = [path for path in found if os.path.isdir(path)]
    if folders:
        raise SystemExit(f"{folders[0]} is a folder, where the sweep writes a file: move it, or pass another --out_dir")
    if not found or base["overwrite"]:
        return
    table = os.path.join(base["out_dir"], "sweep.json")
    try:  # an earlier sweep wrote sweep.json (a row per run) with its sweep.md
        with open(table) as f:
            rows = json.load(f)
        earlier = isinstance(rows, list) and all(isinstance(row, dict) and "run" in row for row in rows)
        reason = "it holds no list of runs"
    except (OSError, ValueError) as e:
        earlier, reason = False, textwrap.shorten(str(e), 80, placeholder=" ...")
    if not earlier and table in found:  # --overwrite would start the sweep's runs over
        names = " ".join(os.path.basename(path) for path in found)
        raise SystemExit(f"{table} cannot be read as an earlier sweep's table ({reason}: cut short or edited): to "
                         f"continue that sweep, move {names} out of {base['out_dir']} and pass --resume (the "
                         f"table is made again from its runs), or pass another --out_dir")
    if not earlier:
        raise SystemExit(f"{found[0]} is not an output of an earlier sweep (no sweep.json of its runs beside it) "
                         f"and this sweep would write its own over it: move it, or pass another --out_dir "
                         f"(--overwrite replaces it)")
    if not base["resume"]:
        raise SystemExit(f"{found[0]} is an output of an earlier sweep: pass --resume to continue that sweep, "
                         f"--overwrite to write this one's over it, or another --out_dir")


def main(argv):
    """Run the sweep; returns the table's rows (a dict per run that has an eval). Stopped by
    Ctrl-C or SIGTERM, it still writes the outputs of what the runs reached, then stops."""
    if any(arg in ("-h", "--help") for arg in argv):  # the sweep's own flags; the training script's: its --help
        print(__doc__ + "\nThe training script's settings: python train_shakespeare.py --help")
        raise SystemExit(0)
    own, rest = split_args(argv)
    given = dict(arg[2:].partition("=")[::2] for arg in argv if arg.startswith("--"))  # flag: its last value
    base, why, ignored = shared_settings(own, rest, given)
    ts.refuse_if_in_use(base["out_dir"])  # a running run's folder: the sweep's runs and table would go in it
    check_outputs(base)
    table = os.path.join(base["out_dir"], "sweep.md")
    print(f"sweep: {why}")
    unused = [f"--{key}={value} ({why})" for key, value, why, used in (  # noted, as the training script notes its own
        ("finetune_weights", own["finetune_weights"], "the lambdas of --finetune_iters, which is 0",
         own["finetune_iters"] > 0),
        ("seed", base["seed"], "--seeds gives every run its seed", not own["seeds"]),
        ("kv_budget", given.get("kv_budget"), "each NAtS run takes its own from --kv_budgets", False))
        if key in given and not used]
    whose = {"kv_budget": "each NAtS run takes its own from --kv_budgets"}
    unused += [f"{line} ({whose.get(key, 'the sweep sets it for each run')})" for key, line in ignored.items()]
    if unused:
        print(f"note: this sweep does not use {'; '.join(unused)}")
    runs = variants(own, base)
    notes = {}  # what the runs' settings do that may not be meant, once for the runs it concerns
    floor = sink_and_window_kv(base["block_size"], base["window"])
    for name, cfg, _ in runs:
        random = cfg["attention"] == "random"  # their --random_global is the sweep's, from --kv_budgets: the
        for note in ts.run_notes(dict(cfg, random_global=1.0) if random else cfg):  # user gave none, so not its
            notes.setdefault(note, []).append(name)                                 # note but the budget's
        if random and not cfg["random_global"]:
            notes.setdefault(f"random Globals keep at least {floor:.3f}, the share of the sink and the window at "
                             f"--block_size={base['block_size']} and --window={base['window']}: at a budget below "
                             f"it they are the sink + sliding window", []).append(name)
    for note, names in notes.items():
        print(f"note: {note} ({'every run' if len(names) == len(runs) else 'runs ' + ', '.join(names)})")
    if base["resume"] and not any(os.path.exists(os.path.join(cfg["out_dir"], file))
                                  for _, cfg, _ in runs for file in ts.RUN_FILES[:2]):  # (as the training script says)
        print(f"sweep: --resume: {base['out_dir']} holds no run of this sweep; it starts them all")
    for name, cfg, parent in runs:  # every run's settings and folder checked before the first starts
        if cfg["resume"] and not os.path.exists(os.path.join(cfg["out_dir"], "ckpt.pt")):
            # a resumed sweep starts the runs it never reached, and starts over those stopped before their first
            # checkpoint (a history alone: nothing to continue)
            cfg["resume"], cfg["overwrite"] = False, os.path.exists(os.path.join(cfg["out_dir"], "history.json"))
            if cfg["overwrite"]:
                print(f"sweep: run {name!r} stopped before its first checkpoint: it starts over")
        try:
            if cfg["resume"] and os.path.exists(os.path.join(cfg["out_dir"], "ckpt.pt")):
                # the check of the run's own --resume, as in its process, which is given all of run_args
                cfg.update(ts.resumed_settings(cfg, {arg[2:].partition("=")[0] for arg in run_args(cfg)}))
            if parent is None:  # (a fine-tuning run's checkpoint comes from its parent run)
                ts.check_config(cfg)
            ts.check_out_dir(cfg)
        except SystemExit as e:
            flag = "gs_budgets" if cfg["attention"] == "nats" and not cfg["local_type"] else "kv_budgets"
            raise SystemExit(f"sweep: run {name!r}: {sweeps_message(str(e), given, flag)}") from None
    started = time.time()
    on_sigterm = signal.signal(signal.SIGTERM, lambda *_: sys.exit("sweep: terminated"))
    failed = []
    try:
        if own["jobs"] > 1:
            failed = train_in_processes(runs, own["jobs"])
        else:
            train_in_turn(runs)
    except KeyboardInterrupt:  # Ctrl-C between the runs' steps, or while the processes run
        raise SystemExit("\nsweep: stopped; the same sweep command with --resume continues the sweep") from None
    finally:
        signal.signal(signal.SIGTERM, on_sigterm)
        on_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C would cut the outputs short
        try:
            rows = collect(runs, started)
            if rows:  # no run reached an eval: an earlier sweep's outputs stay as they are
                with open(os.path.join(base["out_dir"], "sweep.json"), "w") as f:
                    json.dump(rows, f, indent=1)
                left = [name for name, _, _ in runs if name not in {r["run"] for r in rows}]
                ours = {os.path.basename(cfg["out_dir"]) for _, cfg, _ in runs}
                others = sorted(d for d in os.listdir(base["out_dir"]) if d not in ours
                                and os.path.isfile(os.path.join(base["out_dir"], d, "history.json")))
                write_table(rows, base, table, left, others, failed)
                plot(rows, base, os.path.join(base["out_dir"], "sweep.png"))
        finally:
            signal.signal(signal.SIGINT, on_sigint)
    if failed:
        raise SystemExit(f"sweep: {len(failed)} of {len(runs)} runs failed or were skipped: {', '.join(failed)} "
                         f"(see their train.log)")
    return rows


if __name__ == "__main__":
    with script_output():
        main(sys.argv[1:])
