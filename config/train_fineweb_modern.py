# The reference 40M shape and data (12 layers, 384 wide, 6,000 iterations of 524,288 tokens, as
# config/train_fineweb.py) with the recipe that won the ablation in docs/ablation-arch.md: Muon for the block
# matrices, AdamW for embeddings and norms, cosine schedule, GPT-2 architecture. The architecture
# switches (rotary, QK-norm, RMSNorm, ReLU^2, untied lm_head, zero-init projections) and WSD measured
# worse together with Muon than without, so none is here. The learning rates are not tuned at this size:
# muon_lr is the middle of the ablation's grid, learning_rate the reference's x3 (README 'The recipe').
# Launch: python train.py config/train_fineweb_modern.py
out_dir = "out-fineweb-modern"
dataset = "fineweb"
wandb_project = "fineweb"
wandb_run_name = "gpt-40m-muon"

batch_size = 16
block_size = 1024
gradient_accumulation_steps = 32

n_layer = 12
n_head = 12
n_embd = 384
dropout = 0.0
bias = False

optimizer = "muon"  # needs torch >= 2.9
muon_lr = 0.02
muon_momentum = 0.95
learning_rate = 1.5e-3  # AdamW: token and position embeddings (= the tied lm_head), norms
max_iters = 6000
lr_schedule = "cosine"
warmup_iters = 200
lr_decay_iters = 6000
min_lr = 1.5e-4
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95

eval_interval = 250
eval_iters = 100
log_interval = 10

dtype = "auto"
compile = True
