# nanoGPT's shakespeare_char: the baby GPT on characters at context 256, 5000 steps, lambda fixed at 0.1;
# the GPU default until 2026-11-30 and the setting of results/README.md, "Shakespeare: quality against
# KV cache". On characters at this length a window of 16 is within 0.03 of dense, and NAtS learns
# mostly a sink and a window (one Global per KV head):
#     python train_shakespeare.py config/shakespeare_char.py --out_dir=out-char
#     python sweep.py config/shakespeare_char.py --jobs=10 --windows=16,32 --kv_budgets= \
#         --kv_weights=0.01,0.03,0.1,0.3 --finetune_iters=1000 --eval_interval=500 --eval_iters=100 \
#         --out_dir=out-char-sweep
tokenizer = "char"
block_size = 256
batch_size = 64
max_iters = 5000
lr_decay_iters = 5000
eval_iters = 200
kv_budget = 0.0  # lambda stays kv_weight = 0.1
budget_anneal = 0
