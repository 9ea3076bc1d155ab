# Associative recall (data/recall.py) small enough for a CPU: 2 layers x 128, context 64, W = 8;
# NAtS from scratch after a dense warm-up, at a KV budget of 0.4 (a window of 8 alone keeps 0.29
# of the entries at context 64). The setting of the CPU diagnosis in results/README.md, "Training
# from scratch"; about 8 minutes on one core:
#     OMP_NUM_THREADS=1 python train_shakespeare.py config/recall_cpu.py --out_dir=out-recall-cpu
# On a shared or busy CPU one thread per run is much faster than two.
dataset = "recall"
seed = 1
n_layer = 2
n_head = 2
n_kv_head = 2
n_embd = 128
block_size = 64
window = 8
init_std = 0.088  # 1 / sqrt(n_embd)
dropout = 0.0
weight_decay = 0.0
batch_size = 64
learning_rate = 1e-3
warmup_iters = 50
max_iters = 2000
lr_decay_iters = 2000
eval_interval = 250
eval_iters = 8
log_interval = 50
sample_tokens = 0
kv_budget = 0.4
dense_warmup = 1000  # the dense model of seeds 1 and 3 learned the lookup at steps 750-1000
dual_lr = 0.03  # as measured (results/README.md); the budget not annealed
budget_anneal = 0
