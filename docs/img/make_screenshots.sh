#!/usr/bin/env bash
# Remakes docs/img/*.png from real runs: two digits DCGAN runs and a three-trial sweep (about
# 6 minutes on 2 CPU cores), then `runs compare` and TensorBoard in headless Chromium
# (docs/img/screenshot.py). Run from the repository root; runs go to $1 (default /tmp/rayganx-shots).
set -euo pipefail
OUT=${1:-/tmp/rayganx-shots}
RGX=(python -m rayganx.cli)
rayganx() { "${RGX[@]}" "$@"; }
IMG=docs/img
mkdir -p "$OUT"
COMMON=(--set "storage.path=$OUT/runs" --set train.steps=300 --set train.log_every=10 --set samples.every=100
        --set storage.checkpoint_every=200 --set eval.every=100 --set eval.num_samples=256)
if [ -z "${SKIP_TRAINING:-}" ]; then
  rayganx submit jobs/dcgan_digits.yaml --set name=digits_lr2e-4 "${COMMON[@]}"
  rayganx submit jobs/dcgan_digits.yaml --set name=digits_lr5e-5 --set train.optim_g.lr=5e-5 \
      --set train.optim_d.lr=5e-5 "${COMMON[@]}"
  cat > "$OUT/sweep.yaml" <<YAML
name: digits_lr_sweep
job: $PWD/jobs/dcgan_digits.yaml
storage: $OUT/sweeps
metric: fid
search: grid
num_samples: 1
report_every: 50
space:
  scaling.num_workers: 1
  train.batch_size: 64
  train.log_every: 10
  samples.every: 100
  eval.num_samples: 256
  train.optim_g.lr: {grid: [5.0e-5, 2.0e-4, 8.0e-4]}
scheduler: {kind: fifo, max_steps: 150}
YAML
  rayganx tune "$OUT/sweep.yaml"
fi

rayganx runs compare "$OUT/runs/digits_lr2e-4" "$OUT/runs/digits_lr5e-5" --out "$IMG/runs_compare.png"

shoot() {  # shoot PORT OUT.png FRAGMENT [JS...]: screenshot of the TensorBoard on PORT
  local port=$1 png=$2 frag=$3; shift 3
  python docs/img/screenshot.py "http://127.0.0.1:$port/$frag" "$png" --wait 10 --size 1400x900 "$@"
}
CLOSE_SETTINGS='document.querySelector("button[aria-label=\"Close settings\"]")?.click()'
PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"${RGX[@]}" tb "$OUT/runs/digits_lr2e-4" "$OUT/runs/digits_lr5e-5" --port "$PORT" & TB=$!
sleep 15
shoot "$PORT" "$IMG/tensorboard_runs.png" "?tagFilter=loss_d%7Closs_g%7Cfid%7Csamples#timeseries" --js "$CLOSE_SETTINGS"
kill $TB; wait $TB || true
"${RGX[@]}" tb "$OUT/sweeps/digits_lr_sweep" --port "$PORT" & TB=$!
sleep 15
shoot "$PORT" "$IMG/tensorboard_hparams.png" "#hparams"
kill $TB; wait $TB || true
# Small PNGs for the repository: a 64-colour palette keeps TensorBoard's flat UI readable.
python - "$IMG" <<'PY'
import sys, pathlib
from PIL import Image
for p in pathlib.Path(sys.argv[1]).glob("*.png"):
    im = Image.open(p).convert("RGB")
    im.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(p, optimize=True)
    print(p, p.stat().st_size // 1024, "KB")
PY
