# GPT-2 small's shape (124M: 12 layers, 768 wide) with the modern recipe of
# config/train_fineweb_modern.py; batch and memory as config/train_fineweb_124m.py (12 GB GPU).
# Launch: python train.py config/train_fineweb_modern_124m.py
out_dir = "out-fineweb-modern-124m"
dataset = "fineweb"
wandb_project = "fineweb"
wandb_run_name = "gpt-124m-modern"

batch_size = 8
block_size = 1024
gradient_accumulation_steps = 64

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False
rotary = True
qk_norm = True
mlp = "relu2"
norm = "rmsnorm"
tie_embeddings = False  # +38.6M embedding parameters: a lookup, no extra FLOPs per token
zero_init_proj = True

learning_rate = 1.8e-3  # 3x the reference 124M's 6e-4, as in the ablation
max_iters = 6000
lr_schedule = "wsd"
warmup_iters = 200
cooldown_frac = 0.2
min_lr = 1.8e-4
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95

eval_interval = 250
eval_iters = 100
log_interval = 10

dtype = "auto"
compile = True
