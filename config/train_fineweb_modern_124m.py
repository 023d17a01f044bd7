# GPT-2 small's shape (124M: 12 layers, 768 wide) with the recipe of config/train_fineweb_modern.py
# (Muon + AdamW, cosine, GPT-2 architecture); batch and memory as config/train_fineweb_124m.py (12 GB GPU).
# Launch: python train.py config/train_fineweb_modern_124m.py
out_dir = "out-fineweb-modern-124m"
dataset = "fineweb"
wandb_project = "fineweb"
wandb_run_name = "gpt-124m-muon"

batch_size = 8
block_size = 1024
gradient_accumulation_steps = 64

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False

optimizer = "muon"  # needs torch >= 2.9
muon_lr = 0.02
muon_momentum = 0.95
learning_rate = 1.8e-3  # AdamW: embeddings and norms; the reference 124M's 6e-4 x3, as for the 40M
max_iters = 6000
lr_schedule = "cosine"
warmup_iters = 200
lr_decay_iters = 6000
min_lr = 1.8e-4
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95

eval_interval = 250
eval_iters = 100
log_interval = 10

dtype = "auto"
compile = True
