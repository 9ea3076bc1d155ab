"""perplexity-vs-kv.png: val perplexity at context 8192 against the kv share kept at 8192, for
SmolLM2-135M dense, the sink + sliding windows (StreamingLLM) and random Globals (evaluated, not
trained), the NAtS retrofits of the sweep (sweep-2026-12-04.json) and of the runs after it
(recipe-2026-12-04.json), and, faded, those measured with the dropout bug (sweep-{hidden,logits,
argmax-dropout}.json). Run from this folder: python plot.py"""
import json

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def rows(path):
    with open(path) as f:
        return [r for r in json.load(f) if r.get("ppl@8192") is not None]


sweep = rows("sweep-2026-12-04.json")
buggy = [r for path in ("sweep-hidden.json", "sweep-logits.json", "sweep-argmax-dropout.json")
         for r in rows(path) if r["run"].startswith("nats")]
fig, ax = plt.subplots(figsize=(7.5, 4.8))
for prefix, style, label in (("sliding", "s-", "sink + sliding window (StreamingLLM)"),
                             ("random", "^:", "random Globals")):
    points = sorted((r["kv@8192"], r["ppl@8192"]) for r in sweep if r["run"].startswith(prefix))
    ax.plot(*zip(*points), style, label=label)
ax.axhline(next(r["ppl@8192"] for r in sweep if r["run"] == "dense"), color="k", lw=0.8, label="dense (kv 1.0)")
ax.scatter([r["kv@8192"] for r in buggy], [r["ppl@8192"] for r in buggy], marker="x", color="0.7",
           label="NAtS, measured with the dropout bug")
for r, marker in [(r, "P" if "G+S" in r["run"] else "o") for r in sweep if r["run"].startswith("nats")]:
    ax.scatter(r["kv@8192"], r["ppl@8192"], marker=marker, color="tab:green", zorder=3)
    ax.annotate(r["run"].replace("nats ", "").replace("budget=", ""), (r["kv@8192"], r["ppl@8192"]),
                fontsize=6, xytext=(4, 3), textcoords="offset points")
ax.scatter([], [], marker="o", color="tab:green", label="NAtS, sweep: dual_lr 1, 150 steps (+: Global + Sliding only)")
recipe = rows("recipe-2026-12-04.json")
ax.scatter([r["kv@8192"] for r in recipe], [r["ppl@8192"] for r in recipe], marker="D", color="tab:red", zorder=3,
           label="NAtS, after the sweep (recipe-2026-12-04.md)")
for r in recipe:  # "budget/steps", or "budget/hidden" for the hidden-state objective
    budget, steps = r["run"].split(", ")[1].split()[1], r["run"].split(", ")[-1].split()[0]
    label = f"{budget}/{'hidden' if 'hidden' in r['run'] else steps}"
    ax.annotate(label, (r["kv@8192"], r["ppl@8192"]), fontsize=6, xytext=(4, -9), textcoords="offset points")
best = next(r for r in recipe if "config/smollm2.py" in r["run"])
ax.scatter(best["kv@8192"], best["ppl@8192"], s=200, marker="*", color="tab:red", zorder=4,
           label="config/smollm2.py: dual_lr 0.3, 300 steps")
ax.set(xscale="log", xlabel="kv share kept at 8192", ylabel="val perplexity at 8192",
       title="SmolLM2-135M on Shakespeare, one H200, 2026-12-04, seed 1337")
ax.set_xticks([0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.8], ["0.05", "0.1", "0.15", "0.2", "0.3", "0.5", "0.8"])
ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig("perplexity-vs-kv.png", dpi=120)
