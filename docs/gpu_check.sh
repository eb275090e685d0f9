#!/usr/bin/env bash
# The GPU table, in one command on a machine with an NVIDIA GPU (about 10 minutes):
#   bash docs/gpu_check.sh
# DCGAN at 64 px through `rayganx bench` (bf16, channels-last, torch.compile off and on, against
# the plain PyTorch loop on the same GPU), then the CelebA path (prepare, input, eval at 1 and 2
# workers on the GPU) on the script's stand-in. Rows land in docs/records/; the tables in
# docs/performance.md are regenerated from them. Nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to measure')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
for compile in false true; do
  timeout 240 python docs/bench_records.py jobs/dcgan_celeba.yaml --steps 60 --warmup 15 \
    --set scaling.use_gpu=true --set scaling.num_workers=1 --set train.precision=bf16 \
    --set train.channels_last=true --set train.compile=$compile
done
timeout 300 python docs/celeba_bench.py --images 4000 --eval-samples 10000 --gpu
python docs/records.py --write
