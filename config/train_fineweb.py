# The reference run: a ~40M-parameter GPT (12 layers, 384 wide) on one FineWeb shard, sized for a
# 12 GB GPU (RTX 4070). Reported by our reference user: val loss ~4.17 after 6,000 iterations
# (~3.1B tokens). Launch: python train.py config/train_fineweb.py
out_dir = "out-fineweb"
dataset = "fineweb"
wandb_project = "fineweb"
wandb_run_name = "gpt-40m"

# 16 x 1024 tokens per micro-batch, 32 micro-steps: 524,288 tokens per iteration
batch_size = 16
block_size = 1024
gradient_accumulation_steps = 32

n_layer = 12
n_head = 12
n_embd = 384
dropout = 0.0
bias = False

learning_rate = 5e-4
max_iters = 6000
lr_schedule = "cosine"
warmup_iters = 200
lr_decay_iters = 6000
min_lr = 5e-5
weight_decay = 0.1

eval_interval = 250
eval_iters = 100
log_interval = 10

dtype = "auto"  # bf16 where the GPU supports it, fp16 with a GradScaler otherwise
compile = True
