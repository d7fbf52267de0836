#!/usr/bin/env bash
# The issue's accelerator checks in one run on a GPU machine, each line of JSON into $OUT (or
# ./gpu_checks): the bfloat16 B/16 train step's images/s and MFU with each attention kernel
# ("auto" = cudnn there, explicit, XLA's fused; "auto" also traced: its kernels' time by category,
# and the trace kept under $out/trace_b16_auto), and XLA:GPU's memory for B/16 at 384 px with and without `--remat block`.
# Usage: bash bench/gpu_checks.sh   (JAX with CUDA, flax, optax and ml_collections importable)
set -u
out=${OUT:-gpu_checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
$py - <<'PY' | tee "$out/matmul.json"
import json, time, jax, jax.numpy as jnp
n = 8192
a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
f = jax.jit(lambda a: a @ a)
f(a).block_until_ready()
best = []
for _ in range(5):
    t = time.perf_counter()
    for _ in range(10):
        r = f(a)
    r.block_until_ready()
    best.append((time.perf_counter() - t) / 10)
best.sort()
print(json.dumps({"bench": "matmul_bf16_8192", "tflops_median": 2 * n**3 / best[2] / 1e12,
                  "device_kind": jax.devices()[0].device_kind}))
PY
run() { local name=$1; shift; echo "== $name"; timeout 150 "$py" "$@" 2>"$out/$name.err" | tee "$out/$name.json"; tail -3 "$out/$name.err"; }
run mfu_b16_auto bench/train_mfu.py configs/imagenet.py:B/16 --per_device_batch 256 --steps 15 --profile "$out/trace_b16_auto"
run mem_b16_384_remat bench/train_memory.py configs/finetune.py:B/16-cifar10 --devices 1 --remat block
run mfu_b16_explicit bench/train_mfu.py configs/imagenet.py:B/16 --per_device_batch 256 --steps 15 --set model.attention_impl=explicit
run mem_b16_384 bench/train_memory.py configs/finetune.py:B/16-cifar10 --devices 1
run mfu_b16_fused bench/train_mfu.py configs/imagenet.py:B/16 --per_device_batch 256 --steps 15 --set model.attention_impl=fused
