"""
The quality / KV-cache trade-off in one command: train dense, sliding-window (StreamingLLM) and
NAtS variants with the same data, config and seed, then write a table and a Pareto plot of val
loss (or recall accuracy) against the share of the KV cache each keeps.

    python sweep.py                                         # Shakespeare, the hardware's default config
    python sweep.py --dataset=recall --max_iters=2000
    python sweep.py --kv_weights=0.01,0.03,0.1 --windows=16,64 --finetune=True

--kv_weights (NAtS runs), --windows (sliding runs) and --finetune (also fine-tune the scorers of
the dense run, at the middle kv_weight) belong to the sweep; every other --key=value goes to
train_shakespeare.py. Writes out_dir/sweep.md and sweep.json, and sweep.png if matplotlib is
installed; each run keeps its own folder under out_dir, with its checkpoint and token-type picture.
"""
import json
import os
import sys

import train_shakespeare as ts

SWEEP_DEFAULTS = dict(kv_weights="0.01,0.03,0.1,0.3", windows="16,64", finetune=False)


def split_args(argv):
    """The sweep's own flags, and the rest for train_shakespeare.py."""
    own = dict(SWEEP_DEFAULTS)
    rest = []
    for arg in argv:
        key, _, value = arg[2:].partition("=")
        if arg.startswith("--") and key in own:
            own[key] = value if key != "finetune" else value in ("", "True", "true", "1")
        else:
            rest.append(arg)
    return own, rest


def variants(own, base):
    """(name, config changes) of every run, dense first: the fine-tuning run starts from it."""
    kv_weights = [float(w) for w in own["kv_weights"].split(",")]
    runs = [("dense", dict(attention="dense"))]
    runs += [(f"sliding W={w}", dict(attention="sliding", window=int(w))) for w in own["windows"].split(",")]
    runs += [(f"nats lambda={w}", dict(attention="nats", kv_weight=w)) for w in kv_weights]
    if own["finetune"]:
        w = kv_weights[len(kv_weights) // 2]
        runs.append((f"nats fine-tuned lambda={w}", dict(
            finetune_scorer=True, kv_weight=w, init_from=os.path.join(base["out_dir"], "dense", "ckpt.pt"))))
    return runs


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
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["kv_fraction"], r[metric], color="C0" if r["run"].startswith("nats") else "C1")
        ax.annotate(r["run"], (r["kv_fraction"], r[metric]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("KV share kept (kv_fraction)")
    ax.set_ylabel("recall accuracy" if metric == "val_accuracy" else "val loss")
    ax.set_title(f"{base['dataset']}: quality against KV cache")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv):
    own, rest = split_args(argv)
    base, why = ts.make_config(rest)
    print(f"sweep: {why}")
    rows = []
    for name, changes in variants(own, base):
        cfg = dict(base, **changes, out_dir=os.path.join(base["out_dir"], name.replace(" ", "_")))
        print(f"\n=== {name}")
        rows.append(summarize(name, ts.train(cfg)))
    with open(os.path.join(base["out_dir"], "sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)
    write_table(rows, base, os.path.join(base["out_dir"], "sweep.md"))
    plot(rows, base, os.path.join(base["out_dir"], "sweep.png"))


if __name__ == "__main__":
    main(sys.argv[1:])
