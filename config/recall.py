# Associative recall (data/recall.py), the setting of the recall results in results/README.md:
#     python train_shakespeare.py config/recall.py --attention=dense --out_dir=out-recall-dense
#     python sweep.py config/recall.py --kv_weights=0.03,0.04,0.05,0.07,0.1 --windows=16 \
#         --finetune_iters=1000 --finetune_weights=0.1,0.3,1,3 --out_dir=out-recall
# A GPU run takes a few minutes; on a CPU, hours.
dataset = "recall"
seed = 1
n_layer = 2
n_head = 4
n_kv_head = 4
n_embd = 256
block_size = 256
window = 16
init_std = 0.0625  # 1 / sqrt(n_embd): with GPT-2's 0.02 no model here learned the lookup
dropout = 0.0  # fresh sequences every batch: nothing to overfit
weight_decay = 0.0
batch_size = 256
learning_rate = 1e-3
warmup_iters = 100
max_iters = 3000
lr_decay_iters = 3000
eval_interval = 500
eval_iters = 10  # 10 batches of 256 held-out sequences
