# The CPU run: small enough to finish in a few minutes on 2 cores, large enough to learn types.
# train_shakespeare.py applies this file by itself when the run's device is the CPU; config files
# and flags given on the command line come after it.
n_layer = 4
n_head = 4
n_kv_head = 4
n_embd = 128
block_size = 64
window = 8  # an eighth of the context, as W = 16 is of 256 (a wider window leaves nothing to learn)
dropout = 0.0  # too few steps to overfit
batch_size = 32
max_iters = 600
lr_decay_iters = 600
warmup_iters = 50
learning_rate = 2e-3
eval_interval = 100
eval_iters = 20
log_interval = 25
dtype = "float32"
compile = False  # inductor on a CPU needs a C++ compiler and minutes; these steps are short anyway
tokenizer = "char"  # 83 characters, not GPT-2's 50257 tokens: the output layer stays small enough for minutes on a CPU
kv_budget = 0.0  # lambda fixed at kv_weight = 0.1 (with --kv_budget, add --budget_anneal=360 to anneal as on a GPU;
                 # at this context and window a sink and the window alone keep 0.29 of the entries)
budget_anneal = 0
