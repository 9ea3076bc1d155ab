# Shakespeare with GPT-2 BPE at context 512, where long context pays: on an H200 a sink + sliding
# window of W = 16 tokens ended 0.11 nats above dense attention (results/README.md, "From scratch
# on a GPU"). The baby GPT otherwise; it overfits the 1.4M training tokens after
# about 900 steps, so the run stops at 1000. NAtS at a KV budget of 0.15, from scratch:
#     python train_shakespeare.py config/shakespeare_bpe.py --out_dir=out-bpe
#     python sweep.py config/shakespeare_bpe.py --kv_budgets=0.1,0.15 --windows=24,38 --seeds=1,2,3 \
#         --jobs=12 --out_dir=out-bpe-sweep
# (sliding W = 24 and W = 38 keep 0.10 and 0.15 of the entries at context 512, the budgets.)
tokenizer = "gpt2"
block_size = 512
batch_size = 32
max_iters = 1000
lr_decay_iters = 1000
eval_interval = 250
eval_iters = 40
sample_tokens = 0
kv_budget = 0.15
