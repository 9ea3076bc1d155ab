"""
The quality / KV-cache trade-off in one command: train dense, sliding-window (StreamingLLM) and
NAtS variants with the same data, config and seed, then write a table and a Pareto plot of val
loss (or recall accuracy) against the share of the KV cache each keeps.

    python sweep.py                                         # Shakespeare, the hardware's default config
    python sweep.py config/recall.py --windows=16 --finetune_iters=1000
    python sweep.py --kv_weights=0.01,0.03,0.1 --windows=16,64 --finetune_iters=1000 --jobs=8

--kv_weights (NAtS runs), --windows (sliding runs), --finetune_iters (if > 0, also fine-tune the
scorers of the dense run for that many iterations), --finetune_weights (the kv_weights of those
fine-tuning runs; by default the middle one of --kv_weights) and --jobs (runs at a time, each its
own process, spread over the visible GPUs) belong to the sweep; config files and every other
--key=value go to train_shakespeare.py (--overwrite to run again into the same out_dir). Writes
out_dir/sweep.md and sweep.json, and sweep.png if matplotlib is installed; each run keeps its own
folder under out_dir, with its log (train.log when --jobs > 1), history.json, checkpoint and
token-type picture.
"""
import json
import os
import signal
import subprocess
import sys
import time

import torch

import train_shakespeare as ts

SWEEP_DEFAULTS = dict(kv_weights="0.01,0.03,0.1,0.3", windows="16,64", finetune_iters=0, finetune_weights="", jobs=1)


def split_args(argv):
    """The sweep's own flags, and the rest for train_shakespeare.py."""
    own = dict(SWEEP_DEFAULTS)
    rest = []
    for arg in argv:
        key, _, value = arg[2:].partition("=")
        if arg.startswith("--") and key in own:
            if isinstance(own[key], int) and not value.isdigit():
                raise SystemExit(f"--{key}={value}: expected a whole number like {own[key]}")
            own[key] = value if isinstance(own[key], str) else int(value)
        else:
            rest.append(arg)
    return own, rest


def numbers(own, key, kind):
    """The comma-separated list of --key as numbers of that kind, or an error saying what to pass."""
    try:
        return [kind(w) for w in own[key].split(",")]
    except ValueError:
        raise SystemExit(f"--{key}={own[key]}: expected {'whole ' if kind is int else ''}numbers separated by commas, "
                         f"like --{key}={SWEEP_DEFAULTS[key] or '0.1,1'}") from None


def variants(own, base):
    """(name, config, name of the run it starts from) of every run, dense first."""
    kv_weights = numbers(own, "kv_weights", float)
    runs = [("dense", dict(attention="dense"), None)]
    runs += [(f"sliding W={w}", dict(attention="sliding", window=w), None) for w in numbers(own, "windows", int)]
    runs += [(f"nats lambda={w}", dict(attention="nats", kv_weight=w), None) for w in kv_weights]
    if own["finetune_iters"] > 0:
        given = own["finetune_weights"]
        for w in numbers(own, "finetune_weights", float) if given else [kv_weights[len(kv_weights) // 2]]:
            runs.append((f"nats fine-tuned lambda={w}", dict(
                finetune_scorer=True, kv_weight=w, max_iters=own["finetune_iters"],
                lr_decay_iters=own["finetune_iters"],
                init_from=os.path.join(run_dir(base, "dense"), "ckpt.pt")), "dense"))
    return [(name, dict(base, **changes, out_dir=run_dir(base, name)), parent) for name, changes, parent in runs]


def run_dir(base, name):
    return os.path.join(base["out_dir"], name.replace(" ", "_"))


def train_in_processes(runs, jobs):
    """Train the runs `jobs` at a time, each in its own process (its log in out_dir/train.log), on
    the visible GPU running the fewest of them; a run waits for the run it starts from. Returns the
    names of the runs that finished."""
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
    finally:  # stopped (Ctrl-C, a timeout): stop the runs too
        for process, _, _ in running.values():
            process.terminate()
    return finished


def start_run(cfg, gpu):
    os.makedirs(cfg["out_dir"], exist_ok=True)
    with open(os.path.join(cfg["out_dir"], "train.log"), "w") as log:
        return subprocess.Popen([sys.executable, ts.__file__] + [f"--{k}={v}" for k, v in cfg.items()],
                                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, CUDA_VISIBLE_DEVICES=gpu))


def summarize(name, history):
    last = history["evals"][-1]
    kv = last.get("kv_fraction")
    return dict(run=name, val=last["val"], val_accuracy=last["val_accuracy"],
                kv_fraction=sum(kv) / len(kv) if kv else 1.0,
                cache_size=sum(last["cache_size"]) / len(last["cache_size"]) if kv else None,
                type_share=last.get("type_share"), minutes=history["elapsed"] / 60)


def write_table(rows, base, path):
    recall = base["dataset"] == "recall"
    lines = [f"{base['dataset']}, {base['n_layer']} layers x {base['n_embd']} wide, context {base['block_size']}, "
             f"{base['max_iters']} iterations, seed {base['seed']}, device {base['device']}", "",
             "| run | val loss |" + (" recall accuracy |" if recall else "") + " kv share | end cache | G / L / S | minutes |",
             "|---|---|" + ("---|" if recall else "") + "---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["kv_fraction"]):
        types = " / ".join(f"{x:.0%}" for x in r["type_share"]) if r["type_share"] else "-"
        cache = f"{r['cache_size']:.1f}" if r["cache_size"] is not None else str(base["block_size"])
        lines.append(f"| {r['run']} | {r['val']:.4f} |" + (f" {r['val_accuracy']:.1%} |" if recall else "")
                     + f" {r['kv_fraction']:.3f} | {cache} | {types} | {r['minutes']:.1f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(rows, base, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    metric = "val_accuracy" if base["dataset"] == "recall" else "val"
    fig, ax = plt.subplots(figsize=(7, 4))
    markers = {"nats": "o", "fine-tuned": "D", "sliding": "s", "dense": "*"}
    for i, r in enumerate(sorted(rows, key=lambda r: r["kv_fraction"])):
        kind = "fine-tuned" if "fine-tuned" in r["run"] else r["run"].split()[0]
        ax.scatter(r["kv_fraction"], r[metric], color=f"C{i % 10}", marker=markers[kind], s=60, label=r["run"])
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))  # not point labels: they overlap
    ax.set_xlabel("KV share kept (kv_fraction)")
    ax.set_ylabel("recall accuracy" if metric == "val_accuracy" else "val loss")
    ax.set_title(f"{base['dataset']}: quality against KV cache")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv):
    """Run the sweep; returns the table's rows (a dict per finished run)."""
    own, rest = split_args(argv)
    base, why = ts.make_config(rest)
    print(f"sweep: {why}")
    runs = variants(own, base)
    rows = []
    if own["jobs"] > 1:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit("sweep: terminated"))
        finished = train_in_processes(runs, own["jobs"])
        for name, cfg, _ in runs:
            if name in finished:
                with open(os.path.join(cfg["out_dir"], "history.json")) as f:
                    rows.append(summarize(name, json.load(f)))
    else:
        for name, cfg, _ in runs:
            print(f"\n=== {name}")
            rows.append(summarize(name, ts.train(cfg)))
    with open(os.path.join(base["out_dir"], "sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)
    write_table(rows, base, os.path.join(base["out_dir"], "sweep.md"))
    if rows:  # no run finished: nothing to plot
        plot(rows, base, os.path.join(base["out_dir"], "sweep.png"))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
