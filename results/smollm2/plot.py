"""perplexity-vs-kv.png: val perplexity at context 8192 against the kv share kept at 8192, for
SmolLM2-135M dense, the sink + sliding windows (StreamingLLM), random Globals, the retrofits after
the dropout fix (retrofit-2026-12-04.json, from the logs in retrofit-2026-12-04.md) and, faded,
those measured with the dropout bug (sweep-*.json). Run from this folder: python plot.py"""
import json

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def rows(path):
    with open(path) as f:
        return [r for r in json.load(f) if r.get("ppl@8192") is not None]


baselines = rows("sweep-hidden.json") + [r for r in rows("sweep-logits.json") if r["run"].startswith("random")]
baselines = list({r["run"]: r for r in baselines}.values())  # dense, sliding, random Globals: evaluated, not trained
buggy = [r for path in ("sweep-hidden.json", "sweep-logits.json", "sweep-argmax-dropout.json")
         for r in rows(path) if r["run"].startswith("nats")]
fig, ax = plt.subplots(figsize=(7, 4.5))
for prefix, style in (("sliding", "s-"), ("random", "^:")):
    points = sorted((r["kv@8192"], r["ppl@8192"]) for r in baselines if r["run"].startswith(prefix))
    ax.plot(*zip(*points), style, label={"sliding": "sink + sliding window (StreamingLLM)",
                                         "random": "random Globals"}[prefix])
ax.axhline(next(r["ppl@8192"] for r in baselines if r["run"] == "dense"), color="k", lw=0.8, label="dense (kv 1.0)")
ax.scatter([r["kv@8192"] for r in buggy], [r["ppl@8192"] for r in buggy], marker="x", color="0.6",
           label="NAtS, measured with the dropout bug")
for r in rows("retrofit-2026-12-04.json"):
    ax.scatter(r["kv@8192"], r["ppl@8192"], s=60, zorder=3, label=r["run"])
ax.set(xscale="log", xlabel="kv share kept at 8192", ylabel="val perplexity at 8192",
       title="SmolLM2-135M on Shakespeare, one H200, 2026-12-04")
ax.set_xticks([0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.8], ["0.05", "0.1", "0.15", "0.2", "0.3", "0.5", "0.8"])
ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig("perplexity-vs-kv.png", dpi=120)
