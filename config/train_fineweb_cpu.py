# A tiny GPT that trains in a few minutes on a laptop CPU and visibly learns (loss from ~10.8 to
# well below 8): the quick start and the smoke test of the whole pipeline.
# $ python train.py config/train_fineweb_cpu.py
out_dir = "out-fineweb-cpu"
dataset = "fineweb"

batch_size = 8
block_size = 128
gradient_accumulation_steps = 2  # 2,048 tokens per iteration

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
bias = False

learning_rate = 2e-3  # small models tolerate (and need) a larger step
max_iters = 150
lr_schedule = "cosine"
warmup_iters = 10
lr_decay_iters = 150
min_lr = 2e-4
weight_decay = 0.1

eval_interval = 50
eval_iters = 20
log_interval = 10
sample_tokens = 32  # two short samples at each evaluation: watch it learn to write

device = "cpu"
dtype = "auto"  # bf16 where the CPU has native bf16 matmuls (AVX512-BF16/AMX), else fp32
compile = False  # measured: over 150 iterations compiling costs more time than the faster steps save
# (docs/performance.md, "The CPU quick start"; bench_memory.py --study=quickstart measures it on yours)
