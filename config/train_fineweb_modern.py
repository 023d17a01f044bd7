# The reference 40M shape (12 layers, 384 wide, config/train_fineweb.py) with the modern recipe that
# won the ablation in docs/ablation.md: rotary positions, QK-norm, RMSNorm, ReLU^2 MLP, untied lm_head,
# zero-initialised output projections, WSD schedule at 3x the learning rate. Everything else (data,
# batch, 6,000 iterations of 524,288 tokens) is the reference run, so the two are comparable.
# Launch: python train.py config/train_fineweb_modern.py
# Not expressible as a transformers GPT2 model (rotary, QK-norm, RMSNorm, ReLU^2): export refuses it.
out_dir = "out-fineweb-modern"
dataset = "fineweb"
wandb_project = "fineweb"
wandb_run_name = "gpt-40m-modern"

batch_size = 16
block_size = 1024
gradient_accumulation_steps = 32

n_layer = 12
n_head = 12
n_embd = 384
dropout = 0.0
bias = False
rotary = True
qk_norm = True
mlp = "relu2"
norm = "rmsnorm"
tie_embeddings = False  # +19.3M embedding parameters: a lookup, no extra FLOPs per token
zero_init_proj = True

learning_rate = 1.5e-3  # 3x the reference's 5e-4: QK-norm and zero-init keep it stable
max_iters = 6000
lr_schedule = "wsd"  # the stable phase is open-ended: the run can be extended (README 'Long runs')
warmup_iters = 200
cooldown_frac = 0.2
min_lr = 1.5e-4
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95

eval_interval = 250
eval_iters = 100
log_interval = 10

dtype = "auto"
compile = True
