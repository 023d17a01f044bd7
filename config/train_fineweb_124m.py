# GPT-2 small (124M: 12 layers, 768 wide) on FineWeb, at the reference run's 524,288 tokens per
# iteration, sized for a 12 GB GPU: micro-batch 8 with 64 accumulation steps. By our estimate (not
# yet measured on a 12 GB card) bf16 + compile + flash attention needs ~8 GB at micro-batch 8: 2 GB of
# weights, grads and AdamW state, 1 GB for the CUDA context, ~5 GB of activations (~640 MiB per row,
# twice the 40M model's measured rows); 16 rows would not fit without activation_checkpointing. The chunked
# loss (the default) holds the 50,304-way logits a chunk at a time instead of ~4 GB of them
# (docs/training.md 'Memory').
# `python bench.py config/train_fineweb_124m.py --fit_memory=free` measures the largest micro-batch on your
# GPU, with and without activation_checkpointing, and prints the accumulation steps that keep 512
# sequences per iteration.
out_dir = "out-fineweb-124m"
dataset = "fineweb"
wandb_project = "fineweb"
wandb_run_name = "gpt-124m"

batch_size = 8
block_size = 1024
gradient_accumulation_steps = 64

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False

learning_rate = 6e-4
max_iters = 6000
lr_schedule = "cosine"
warmup_iters = 200
lr_decay_iters = 6000
min_lr = 6e-5
weight_decay = 0.1

eval_interval = 250
eval_iters = 100
log_interval = 10

dtype = "auto"
compile = True
