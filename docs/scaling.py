"""The scaling model of docs/performance.md: predicted images/s for 1-64 GPUs.

    python docs/scaling.py            # prints the constants it measured here and the table

step time = compute + gradient all-reduce + input + checkpoint (amortised), per generator step,
with no overlap of communication and compute assumed (DDP overlaps part of the all-reduce with
the backward pass, so real runs sit between this and the compute-only line).

Measured here from the code: model FLOPs per step (torch's FLOP counter on the job's networks
and losses) and gradient bytes (the parameters each step all-reduces: D every D step, G every G
step). Taken from public figures: the accelerator's dense bf16 peak and link bandwidths. Assumed
and named: the model FLOP utilisation a small convolutional GAN reaches and a per-step floor of
kernel-launch and optimiser overhead. Re-measure those two with `rayganx bench` on the target
GPU (the plain row's step time and FLOP utilisation) and put them in ASSUMED.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rayganx.models import networks
from rayganx.job import spec as jobspec  # noqa: E402

JOBS = Path(__file__).resolve().parent.parent / "jobs"
# Public figures (vendor data sheets).
H100_BF16_DENSE = 989e12      # FLOP/s, H100 SXM
NVLINK_BUS = 450e9            # B/s per direction per GPU inside an 8-GPU HGX node (NVLink 4)
NET = {"100 Gb/s": 12.5e9, "400 Gb/s": 50e9}  # B/s per node between nodes (all its NICs together)
GPUS_PER_NODE = 8
# Assumed (re-measure with `rayganx bench` on the GPU): a small GAN uses a modest share of the
# tensor cores, and each step pays a floor of launch/optimiser/logging overhead.
ASSUMED = {"mfu": 0.25, "step_floor_s": 4e-3, "latency_s": 30e-6}
BATCH_PER_GPU = 128
CHECKPOINT_EVERY, CHECKPOINT_S = 2000, 2.0  # async upload: only the state copy blocks


def flops_and_bytes(job: str, sets: list[str]) -> tuple[float, float, int]:
    """(model FLOPs per generator step, gradient bytes all-reduced per generator step, images per step)."""
    from torch.utils.flop_counter import FlopCounterMode

    from rayganx.training.tasks import TASKS

    spec = jobspec.load(JOBS / job, [f"train.batch_size={BATCH_PER_GPU}", "scaling.num_workers=1", *sets])
    task = TASKS[spec.model.kind](spec, None, torch.device("cpu"), distributed=False)
    x = torch.rand(BATCH_PER_GPU, spec.data.channels, spec.data.image_size, spec.data.image_size) * 2 - 1
    y = torch.zeros(BATCH_PER_GPU, dtype=torch.long)
    it, stepped = 0, False
    with FlopCounterMode(display=False) as counter:
        while not stepped:
            stepped, _ = task.step(x, y, it, 0, 1)
            it += 1
    nets = networks.build(spec)
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in nets.items()}
    grad_bytes = 4 * (params["d"] * spec.train.d_steps + params["g"])  # fp32 gradients
    return counter.get_total_flops(), grad_bytes, BATCH_PER_GPU * spec.train.d_steps


def ring_allreduce_s(nbytes: float, n: int, bus: float, latency: float) -> float:
    """Ring all-reduce: each GPU sends and receives 2(n-1)/n of the buffer, in 2(n-1) steps."""
    if n == 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / bus + 2 * (n - 1) * latency


def step_s(flops: float, grad_bytes: float, n: int, net: float) -> float:
    compute = max(flops / (H100_BF16_DENSE * ASSUMED["mfu"]), 0.0) + ASSUMED["step_floor_s"]
    # Inside a node the ring runs over NVLink. Across nodes a hierarchical all-reduce has each of
    # the node's 8 GPUs carry a 1/8 shard over the node's network links: the whole buffer per
    # node over NET (the node's total bandwidth between nodes).
    if n <= GPUS_PER_NODE:
        comm = ring_allreduce_s(grad_bytes, n, NVLINK_BUS, ASSUMED["latency_s"])
    else:
        nodes = n // GPUS_PER_NODE
        comm = (ring_allreduce_s(grad_bytes, GPUS_PER_NODE, NVLINK_BUS, ASSUMED["latency_s"])
                + ring_allreduce_s(grad_bytes, nodes, net, ASSUMED["latency_s"] * 10))
    return compute + comm + CHECKPOINT_S / CHECKPOINT_EVERY  # input is prefetched: off the critical path


def main() -> None:
    rows = {"DCGAN 64 px": ("dcgan_celeba.yaml", []),
            "SNGAN ResNet 64 px (n_dis 5)": ("sngan_celeba.yaml", ["train.diffaug=[]"])}
    print(f"assumed: {ASSUMED}; batch {BATCH_PER_GPU}/GPU; H100 bf16 dense {H100_BF16_DENSE / 1e12:.0f} TFLOP/s")
    for name, (job, sets) in rows.items():
        flops, grad_bytes, images = flops_and_bytes(job, sets)
        print(f"\n{name}: {flops / 1e9:.1f} GFLOP and {grad_bytes / 1e6:.1f} MB of gradients per G step "
              f"({images} real images)")
        print("| GPUs | " + " | ".join(f"images/s ({k} between nodes) | efficiency" for k in NET) + " |")
        print("| ---: | " + " | ".join("---: | ---:" for _ in NET) + " |")
        one = {k: images / step_s(flops, grad_bytes, 1, v) for k, v in NET.items()}
        for n in (1, 2, 4, 8, 16, 32, 64):
            cells = []
            for k, v in NET.items():
                rate = n * images / step_s(flops, grad_bytes, n, v)
                cells.append(f"{rate:,.0f} | {rate / (one[k] * n):.2f}")
            print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
