"""`rayganx bench`: the job's training speed through rayganx against a plain PyTorch loop,
measured side by side in one invocation, plus input-pipeline headroom, scaling, start-up,
memory and FLOP utilisation.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import numpy as np
import torch

from rayganx.training import runner
from rayganx.job.cluster import init_ray
from rayganx.job.spec import JobSpec
from rayganx.store.runs import read_metrics
from rayganx.store.storage import Store


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else {}


def matmul_flops(threads: int, seconds: float = 1.0, n: int = 1024) -> float:
    """The machine's dense fp32 matmul rate with the thread count one worker gets."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    rates = []
    for _ in range(5):  # the best of several short runs: other processes only ever slow it down
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 5:
            a @ b
            reps += 1
        rates.append(2 * n ** 3 * reps / (time.perf_counter() - t0))
    torch.set_num_threads(prev)
    return max(rates)


def plain(spec: JobSpec, steps: int, warmup: int) -> dict:
    """The job's networks, optimisers and loss in a bare single-process loop on in-memory tensors,
    on the job's device and with its options (bf16 autocast on GPU, channels-last, torch.compile)."""
    from torch.utils.flop_counter import FlopCounterMode

    from rayganx.training.tasks import TASKS

    device = torch.device("cuda" if spec.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    threads = max(1, int(spec.scaling.cpus_per_worker))  # what Ray gives one worker
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    num_classes = 10 if (spec.model.kind == "cnn" or spec.model.conditional) else None
    task = TASKS[spec.model.kind](spec, num_classes, device, distributed=False)
    b = spec.per_worker_batch
    shape = (2,) if spec.data.source == "gaussian_mixture" else (spec.data.channels, spec.data.image_size,
                                                                   spec.data.image_size)
    x = torch.rand(b, *shape, device=device) * 2 - 1
    y = torch.randint(0, num_classes or 1, (b,), device=device)
    if spec.train.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    it, times = 0, []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        stepped = False
        while not stepped:  # a generator step takes d_steps batches
            stepped, stats = task.step(x, y, it, step, warmup + steps)
            it += 1
        sync()  # per-step timing; the real loop reads values back only at log steps
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    flops = None
    try:
        with FlopCounterMode(display=False) as counter:
            stepped = False
            while not stepped:
                stepped, _ = task.step(x, y, it, 0, 1)
                it += 1
        flops = counter.get_total_flops()
    except RuntimeError:  # torch's FLOP counter cannot follow autograd.grad (R1, gradient penalty)
        if not (spec.train.r1_gamma or spec.train.gp_lambda):
            raise
    torch.set_num_threads(prev)
    images_per_step = b * spec.train.d_steps if spec.is_gan else b
    st = _spread(times)
    t = spec.train
    return {"step_time": st, "images_per_s": images_per_step / st["median"],
            "flops_per_step": flops, "threads": threads,
            "device": device.type, "precision": t.precision if device.type == "cuda" else "fp32",
            "channels_last": t.channels_last, "compile": t.compile}


def _rayganx_row(spec: JobSpec, workers: int, steps: int, warmup: int, storage: str) -> dict:
    s = spec.model_copy(deep=True)
    s.name = f"bench_{workers}w"
    s.scaling.num_workers = workers
    s.train.batch_size = spec.per_worker_batch * workers
    s.train.steps = warmup + steps
    s.storage.path = storage
    s.storage.keep = 1
    s.samples.every = max(s.samples.every, warmup + steps)  # sampling is not what we time
    s.train.log_every = max(1, min(s.train.log_every, steps // 5))  # enough intervals to time
    t0 = time.time()
    runner.run(s)
    history = read_metrics(Store(s.run_url))
    reports = [m for m in history if m["step"] > warmup]
    if not reports:
        raise runner.RunError(f"bench: no reports after the warm-up; raise --steps above {s.train.log_every}")
    st = _spread([m["step_time"] for m in reports])
    ips = [m["images_per_s"] for m in reports]
    first = history[0]
    return {"workers": workers, "step_time": st, "images_per_s": statistics.median(ips),
            "images_per_s_spread": _spread(ips), "time_to_first_step": first["first_step_at"] - t0,
            "peak_rss_mb_per_worker": max(m["peak_rss_mb"] for m in reports)}


def _input_only(spec: JobSpec, workers: int, batches: int, tmp: str) -> dict:
    """The job's rows read as training reads them (`rayganx.data.rows`), by Ray Train workers with no
    model."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rayganx.data import rows

    p = runner.plan(spec)
    source = rows.source(spec, p.split, p.rows)
    t = spec.train

    def loop(config):
        import ray.train

        ctx = ray.train.get_context()
        reader = rows.Reader(config["rows"], t.batch_size, t.seed, ctx.get_world_rank(), ctx.get_world_size())
        n, t0, seen = 0, None, 0
        for _, batch in reader.batches():
            if t0 is None:  # start the clock after the first batch: pipeline start-up is separate
                t0 = time.perf_counter()
            else:
                seen += len(batch["label"])
            n += 1
            if n >= config["batches"]:
                break
        rate = seen / (time.perf_counter() - t0)
        with open(os.path.join(config["out"], f"rank{ctx.get_world_rank()}"), "w") as f:
            f.write(str(rate))

    out = tempfile.mkdtemp(prefix="input_", dir=tmp)
    trainer = TorchTrainer(loop, train_loop_config={"batches": batches, "out": out, "rows": source},
                           scaling_config=ScalingConfig(num_workers=workers,
                                                        resources_per_worker={"CPU": spec.scaling.cpus_per_worker}),
                           run_config=RunConfig(name=f"bench_input_{time.time_ns()}", storage_path=out))
    trainer.fit()
    # Result.metrics is None for runs that report no checkpoint: the workers write files instead.
    rates = [float(open(os.path.join(out, f)).read()) for f in os.listdir(out) if f.startswith("rank")]
    return {"workers": workers, "images_per_s_per_worker": statistics.mean(rates), "images_per_s": sum(rates)}


def _bare_startup(tmp: str) -> float:
    """Seconds from building a bare TorchTrainer to its train function running."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = tempfile.mkdtemp(prefix="bare_", dir=tmp)

    def loop(config):
        with open(os.path.join(config["out"], "started"), "w") as f:
            f.write(str(time.time()))

    t0 = time.time()
    TorchTrainer(loop, train_loop_config={"out": out}, scaling_config=ScalingConfig(num_workers=1),
                 run_config=RunConfig(name=f"bench_bare_{time.time_ns()}", storage_path=out)).fit()
    return float(open(os.path.join(out, "started")).read()) - t0


def stand_in_data(spec: JobSpec, folder: str, n: int = 512) -> JobSpec:
    """Generated images of the job's size (in folder) when its dataset is not on this machine: JPEGs
    in CelebA's layout for a celeba job, a Parquet file of PNGs for a Parquet job (what `rayganx
    data prepare` writes), a folder of JPEGs otherwise."""
    import io

    from PIL import Image

    spec = spec.model_copy(deep=True)
    rng = np.random.default_rng(0)
    sub = os.path.join(folder, "img_align_celeba") if spec.data.source == "celeba" else folder
    os.makedirs(sub, exist_ok=True)
    h, w = (218, 178) if spec.data.source == "celeba" else (spec.data.image_size,) * 2
    mode = "L" if spec.data.channels == 1 else "RGB"
    encoded = []
    for i in range(n):
        arr = rng.integers(0, 255, (h, w) if mode == "L" else (h, w, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr, mode=mode).save(buf, format="PNG" if spec.data.source == "parquet" else "JPEG",
                                             quality=90)
        encoded.append(buf.getvalue())
    if spec.data.source == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({spec.data.image_column: pa.array(encoded, pa.binary()),
                                 spec.data.label_column: pa.array(np.zeros(n, np.int64))}),
                       os.path.join(sub, "part-00000.parquet"))
    else:
        for i, data in enumerate(encoded):
            with open(os.path.join(sub, f"{i:06d}.jpg"), "wb") as f:
                f.write(data)
    spec.data.path = folder
    return spec


def bench(spec: JobSpec, steps: int = 100, warmup: int = 20, workers: list[int] | None = None,
          stand_in: bool | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="rayganx_bench_") as tmp:  # stand-in images, runs: all removed
        return _bench(spec, steps, warmup, workers, stand_in, tmp)


def _bench(spec: JobSpec, steps: int, warmup: int, workers: list[int] | None, stand_in: bool | None,
           tmp: str) -> dict:
    t_command = time.time()
    spec = runner.resolve_paths(spec)
    if stand_in is None:
        stand_in = bool(spec.data.path) and not Store(spec.data.path, spec.data.endpoint_url).exists()
    if stand_in:
        spec = stand_in_data(spec, os.path.join(tmp, "data"))
    workers = workers or [1]
    storage = os.path.join(tmp, "runs")
    spec.storage.path = storage
    spec.storage.endpoint_url = None

    ref = plain(spec, steps, warmup)
    init_ray()
    bare = _bare_startup(tmp)
    rows = [_rayganx_row(spec, n, steps, warmup, storage) for n in sorted(set([1] + workers))]
    one = rows[0]
    consumption = one["images_per_s"]
    inp = _input_only(spec, 1, max(50, steps), tmp)
    peak, flops = matmul_flops(ref["threads"]), ref["flops_per_step"]
    for r in rows:
        r["ratio_to_plain"] = r["images_per_s"] / ref["images_per_s"]
        r["scaling_efficiency"] = r["images_per_s"] / (one["images_per_s"] * r["workers"])
        r["flop_utilisation"] = flops / r["step_time"]["median"] / peak if flops is not None else None
        r["startup_over_bare_s"] = r["time_to_first_step"] - bare
    ref["flop_utilisation"] = flops / ref["step_time"]["median"] / peak if flops is not None else None
    return {
        "job": spec.name, "model": spec.model.kind, "image_size": spec.data.image_size,
        "points": spec.data.source == "gaussian_mixture",
        "per_worker_batch": spec.per_worker_batch, "steps": steps, "warmup": warmup, "stand_in_data": stand_in,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "matmul_flops_per_s": peak,
                    "threads_per_worker": ref["threads"]},
        "plain": ref, "rayganx": rows,
        "input_only": inp | {"multiple_of_consumption": inp["images_per_s"] / consumption},
        "bare_trainer_startup_s": bare, "command_s": time.time() - t_command,
    }
