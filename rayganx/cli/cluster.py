"""Kubernetes manifests (render, validate, CRD schemas) and the benchmark."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from rayganx.job import spec as jobspec
from rayganx.job.config import load_yaml
from rayganx.cli.base import CrdsOpt, SetOpt, app, command, emit, err, k8s_app, out


def is_sweep(path: str) -> bool:
    raw = load_yaml(path)
    return "job" in raw and "model" not in raw


def _core_schema_note() -> None:
    from rayganx.ops import k8s

    if not k8s.core_schema_available():
        err.print("[yellow]note:[/yellow] pod templates not checked against the Kubernetes core schema "
                  "(pip install 'rayganx[k8s]')", highlight=False)


@k8s_app.command("render")
@command
def k8s_render(job: str = typer.Argument(..., help="job or sweep YAML"),
               image: str = typer.Option(..., "--image", help="container image with rayganx"),
               namespace: str = typer.Option("default", "--namespace"),
               gpus_per_worker: Optional[float] = typer.Option(None, "--gpus-per-worker",
                                                               help="GPU workers: same as --set scaling.use_gpu=true "
                                                                    "--set scaling.gpus_per_worker=N"),
               secret: str = typer.Option("rayganx-storage", "--secret", help="Secret with storage credentials"),
               pvc: Optional[str] = typer.Option(None, "--pvc", help="CLAIM:/mount: a PersistentVolumeClaim mounted "
                                                                     "in every pod; local paths under it are allowed"),
               crds: Optional[str] = CrdsOpt,
               out_file: Optional[str] = typer.Option(None, "--out", help="write here instead of stdout"),
               set_: Optional[list[str]] = SetOpt):
    """A ConfigMap + RayJob manifest for a job or a sweep: the ConfigMap holds the job as it will run
    (every --set applied), the cluster is sized from it. Checked against the CRDs when found."""
    from rayganx.ops import crds as kcrds
    from rayganx.ops import k8s

    volume = k8s.parse_pvc(pvc) if pvc else None
    gpu_sets = [] if gpus_per_worker is None else (
        ["scaling.use_gpu=true", f"scaling.gpus_per_worker={gpus_per_worker!r}"] if gpus_per_worker > 0
        else ["scaling.use_gpu=false"])
    if is_sweep(job):
        from rayganx.sweeps import sweep

        docs = k8s.render_sweep(sweep.load(job, set_), image, namespace, secret, volume, gpu_sets)
    else:
        docs = k8s.render(jobspec.load(job, [*(set_ or []), *gpu_sets]), image, namespace, secret, volume)
    try:
        schemas = kcrds.find(crds)
    except kcrds.SchemasMissing:
        schemas = None
    problems = [p for d in docs for p in k8s.validate_doc(d, "rendered manifest", schemas)]
    if problems:
        raise k8s.ManifestError("\n".join(problems))
    emit(k8s.dump(docs), out_file)
    if schemas is None:
        err.print("[yellow]note:[/yellow] not checked against the KubeRay CRD schemas (none found; "
                  "see rayganx k8s validate --help)", highlight=False)
    _core_schema_note()


@k8s_app.command("validate")
@command
def k8s_validate(files: list[str] = typer.Argument(..., help="manifest files"),
                 crds: Optional[str] = CrdsOpt,
                 server: bool = typer.Option(False, "--server", help="also let the API server of the current kube "
                                                                     "context validate them (kubectl apply "
                                                                     "--dry-run=server)")):
    """Validate manifests: KubeRay CRD schemas and controller rules, pod templates against Kubernetes.
    Exit 1: invalid; exit 3: no CRD schemas found (and how to get them)."""
    from rayganx.ops import crds as kcrds
    from rayganx.ops import k8s

    try:
        schemas = kcrds.find(crds)
    except kcrds.SchemasMissing:
        if not server:
            raise
        schemas = None
    problems = [p for f in files for p in k8s.validate_file(f, schemas)]
    if server:
        problems += [p for f in files for p in kcrds.server_dry_run(f)]
    if problems:
        raise k8s.ManifestError("\n".join(problems))
    checks = ([f"KubeRay CRDs from {schemas.source}"] if schemas else []) + (["the API server"] if server else [])
    out.print(f"{len(files)} manifest file(s) valid ({', '.join(checks)})", highlight=False, soft_wrap=True)
    _core_schema_note()


@k8s_app.command("crds")
@command
def k8s_crds(sources: list[str] = typer.Option(..., "--from", help="file, directory or URL holding the KubeRay "
                                                                   "CRDs (repeatable)")):
    """Cache the KubeRay RayJob/RayCluster CRDs for `k8s validate` (per user)."""
    from rayganx.ops import crds as kcrds

    dest, kinds = kcrds.fetch(sources)
    out.print(f"cached the {' and '.join(kinds)} CRDs in {dest}", highlight=False, soft_wrap=True)
    missing = sorted(set(kcrds.CRD_NAMES.values()) - set(kinds))
    if missing and not all((dest / f"ray.io_{k.lower()}s.yaml").is_file() for k in missing):
        err.print(f"[yellow]note:[/yellow] still missing: {', '.join(missing)} (add it with --from)", highlight=False)


@app.command()
@command
def bench(job: str, set_: Optional[list[str]] = SetOpt,
          steps: int = typer.Option(100, "--steps", help="timed steps per row"),
          warmup: int = typer.Option(20, "--warmup", help="steps excluded from timing"),
          workers: str = typer.Option("1", "--workers", help="worker counts, e.g. 1,2"),
          json_out: Optional[str] = typer.Option(None, "--json", help="write the results here")):
    """Measure the job through rayganx against a plain PyTorch loop, side by side."""
    import json

    from rayganx.training.bench import bench as run_bench

    spec = jobspec.load(job, set_)
    counts = [int(w) for w in workers.split(",") if w.strip()]
    res = run_bench(spec, steps=steps, warmup=warmup, workers=counts)
    p = res["plain"]
    size = "2-D points" if res["points"] else f"{res['image_size']} px"
    table = Table(title=f"{res['job']}: {res['model']} {size}, batch {res['per_worker_batch']}"
                        f"/worker, {steps} steps after {warmup} warm-up"
                        + (" (stand-in images)" if res["stand_in_data"] else ""))
    for col in ("row", "images/s", "step ms median (min-max)", "vs plain", "scaling", "first step",
                "peak RSS/worker", "FLOP util"):
        table.add_column(col, justify="right")

    def ms(st):
        return f"{st['median'] * 1e3:.1f} ({st['min'] * 1e3:.1f}-{st['max'] * 1e3:.1f})"

    def util(u):  # None: the step takes gradients of gradients, which torch's FLOP counter cannot follow
        return "n/a" if u is None else f"{u:.1%}"

    table.add_row("plain PyTorch", f"{p['images_per_s']:.0f}", ms(p["step_time"]), "1.00", "-", "-", "-",
                  util(p["flop_utilisation"]))
    for r in res["rayganx"]:
        table.add_row(f"rayganx {r['workers']} worker(s)", f"{r['images_per_s']:.0f}", ms(r["step_time"]),
                      f"{r['ratio_to_plain']:.2f}", f"{r['scaling_efficiency']:.2f}",
                      f"{r['time_to_first_step']:.1f} s (+{r['startup_over_bare_s']:.1f})",
                      f"{r['peak_rss_mb_per_worker']:.0f} MB", util(r["flop_utilisation"]))
    i = res["input_only"]
    table.add_row("input only (in memory)" if res["points"] else "input only (Ray Data)", f"{i['images_per_s']:.0f}", "-",
                  f"{i['multiple_of_consumption']:.1f}x need", "-", "-", "-", "-")
    out.print(table)
    out.print(f"bare TorchTrainer start-up {res['bare_trainer_startup_s']:.1f} s; matmul peak "
              f"{res['machine']['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s on {res['machine']['threads_per_worker']} "
              f"thread(s); whole command {res['command_s']:.0f} s")
    if json_out:
        with open(json_out, "w") as f:
            json.dump(res, f, indent=2)
        out.print(f"wrote {json_out}")
