"""A training worker's checkpoints: what a checkpoint holds, how rank 0's folder reaches the run
store (Ray's upload, then the completion marker, last), and where a (re)started worker resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import torch

from rayganx.store.lock import pid_alive
from rayganx.store.runs import (MARKER, checkpoint_manifest, checkpoint_step, list_checkpoints, load_state,
                                split_checkpoint_url)
from rayganx.job.spec import JobSpec
from rayganx.store.storage import Store, StorageError


def to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def folder_name(step: int, generation: int = 0) -> str:
    """A checkpoint's folder. A run that restarted from a state other than the one Ray offered
    (a PBT donor's, or an older complete checkpoint) may reach a step it reported before: its
    generation in the name keeps every folder name of a run unique, so Ray never prunes a folder
    that holds newer state under an old entry's name."""
    return f"checkpoint_{step:06d}" + (f"_{generation}" if generation else "")


def save_checkpoint(path: str, spec: JobSpec, state: dict, step: int, metrics: dict, num_classes: int | None,
                    rng: list, lineage: str | None) -> None:
    """state.pt (tensors and plain data only: it loads with weights_only=True), spec.yaml, meta.json.
    state: the task's state_dict (a CPU copy when written off the training thread)."""
    state = state | {"step": step, "num_classes": num_classes, "spec": spec.to_dict(), "rng": rng,
                     "lineage": lineage}
    torch.save(state, os.path.join(path, "state.pt"))
    with open(os.path.join(path, "spec.yaml"), "w") as f:
        f.write(spec.to_yaml())
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({"step": step, "time": time.time(), "metrics": metrics}, f)


def upload_with_marker(checkpoint, dir_name: str):
    """Ray's own upload, then the completion marker, last: a folder without it was cut off."""
    import ray.train

    local = checkpoint.path
    manifest = checkpoint_manifest(local, checkpoint_step(dir_name))
    persisted = ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, dir_name)
    with persisted.filesystem.open_output_stream(f"{persisted.path}/{MARKER}") as f:
        f.write(json.dumps(manifest).encode())
    return persisted


def restore(spec: JobSpec, checkpoint, init_from: str | None, device) -> tuple[dict | None, str | None, bool]:
    """The state a worker starts from, a note when it is not the one Ray offered, and whether it
    is a PBT donor's.

    Ray offers the run's last reported checkpoint. It is used when complete (an incomplete one
    falls back to the newest complete checkpoint). `init_from` (a PBT donor) wins over Ray's unless
    that checkpoint was itself written after restoring from the same donor (a worker restart)."""
    state, note = None, None
    if checkpoint is not None:
        name = os.path.basename(checkpoint.path.rstrip("/"))
        try:
            state = load_state(f"{spec.run_url}/{name}", spec.storage.endpoint_url, map_location=device)
        except StorageError as e:
            if "incomplete" not in str(e):
                raise
            ckpts = list_checkpoints(Store(spec.run_url, spec.storage.endpoint_url), warn=False)
            note = f"{name} is incomplete; " + (f"resumed from {ckpts[-1]['name']}" if ckpts else "started afresh")
            state = load_state(ckpts[-1]["url"], spec.storage.endpoint_url, map_location=device) if ckpts else None
        else:
            state, note = _newest_of_the_same_line(spec, name, state, device)
    if init_from and (state is None or state.get("lineage") != init_from):
        url = _agreed(_donor_checkpoint(spec, init_from))
        state = load_state(url, spec.storage.endpoint_url, map_location=device)
        state["lineage"] = init_from  # what the trial was told to take: a worker restart recognises it
        return state, (None if url == init_from else f"{init_from} was pruned by its run; took {url}"), True
    return state, note, False


def _donor_checkpoint(spec: JobSpec, url: str) -> str:
    """The donor's checkpoint to take. The donor trial goes on training and pruning (storage.keep)
    while this one starts: the checkpoint Tune named may be gone by now, and then its newest
    complete one (which the donor prunes last) stands in."""
    run_url, name = split_checkpoint_url(url)
    ckpts = list_checkpoints(Store(run_url, spec.storage.endpoint_url), warn=False)
    if any(c["name"] == name for c in ckpts) or not ckpts:
        return url
    return ckpts[-1]["url"]


def _agreed(url: str) -> str:
    """Rank 0's choice on every rank: two ranks listing the donor a moment apart could see
    different newest checkpoints, and DDP ranks must start from one state."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return url
    box = [url]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _newest_of_the_same_line(spec: JobSpec, name: str, state: dict, device) -> tuple[dict, str | None]:
    """Ray offers the last checkpoint its controller registered; one written after it may already
    be complete in the store (a worker killed while the controller had not yet taken the report).
    Resume from the newest complete checkpoint written after Ray's, of the same lineage (a PBT
    trial's folders from before an exploit were written earlier, and are never taken)."""
    ckpts = list_checkpoints(Store(spec.run_url, spec.storage.endpoint_url), warn=False)
    names = [c["name"] for c in ckpts]
    if name not in names or names.index(name) == len(names) - 1:
        return state, None
    newest = ckpts[-1]
    candidate = load_state(newest["url"], spec.storage.endpoint_url, map_location=device)
    if candidate.get("lineage") != state.get("lineage") or candidate["step"] <= state["step"]:
        return state, None
    return candidate, f"resumed from {newest['name']}, complete but not yet registered by Ray (it offered {name})"


CKPT_PREFIX = "rayganx_ckpt_"


def sweep_stale_copies(tmp: str | None = None) -> list[str]:
    """Remove local checkpoint copies left by dead processes on this node.

    Ray deletes a copy once it is uploaded; a worker killed before that (node drain, Ctrl-C,
    OOM) leaves its state file behind, one per checkpoint in flight, and /tmp fills up over a
    day of restarts. A copy's name carries its writer's pid: a live writer's copies are never
    touched, even by another run on the same node."""
    import glob

    removed = []
    for path in glob.glob(os.path.join(tmp or tempfile.gettempdir(), f"{CKPT_PREFIX}*_*")):
        pid = os.path.basename(path)[len(CKPT_PREFIX):].split("_", 1)[0]
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def report_checkpoint(spec: JobSpec, state: dict, step: int, metrics: dict, num_classes, rng: list, lineage,
                      rank: int, generation: int = 0, lock_token: str | None = None, done=None,
                      slow: float = 0.0) -> None:
    """Every rank reports (a barrier); rank 0's folder is written and uploaded, its marker last.

    state: a CPU copy of the task's state that nothing changes afterwards (the rollback copy):
    with the asynchronous upload the folder is written in Ray's upload thread, so the training
    step pays only for that copy. The upload retries through a store outage of up to
    storage.outage_tolerance_s; the marker is written only while the run's lock is still this
    run's (lock_token), so a run that lost its lock never completes a checkpoint. done: set when
    the upload has ended, either way. slow: seconds each upload waits first (a throttled store,
    for the tests)."""
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    from rayganx.store.lock import LockLostError, holds
    from rayganx.store.uploads import retrying

    # ray.train.report is a barrier whose queue the controller drains on its own poll interval:
    # reporting every log step stalled training by half. Logs go to the metrics log and Ray's
    # metrics; Ray Train hears from us at checkpoints.
    checkpoint, upload = None, None
    name = folder_name(step, generation)
    if rank == 0:
        sweep_stale_copies()
        # Empty until the upload thread writes it; removed by Ray once uploaded, by
        # sweep_stale_copies when its writer died first.
        checkpoint = Checkpoint.from_directory(tempfile.mkdtemp(prefix=f"{CKPT_PREFIX}{os.getpid()}_"))
        run = Store(spec.run_url, spec.storage.endpoint_url)

        failed: list[BaseException] = []

        def upload(checkpoint, dir_name: str):
            if failed:  # called again after it failed (the local copy is gone): the same error
                raise failed[0]
            try:
                save_checkpoint(checkpoint.path, spec, state, step, metrics, num_classes, rng, lineage)

                def persist():
                    if slow:  # a throttled store (the tests' fault hook)
                        time.sleep(slow)
                    if not holds(run, lock_token):
                        raise LockLostError(f"{spec.run_url}: the run lock was taken over; {dir_name} left "
                                            f"incomplete and this run stopped")
                    return upload_with_marker(checkpoint, dir_name)

                return retrying(persist, f"{spec.run_url}/{dir_name}", spec.storage.outage_tolerance_s)
            except BaseException as e:
                failed.append(e)
                shutil.rmtree(checkpoint.path, ignore_errors=True)  # the run fails; no copy is left behind
                raise
            finally:
                if done is not None:
                    done.set()
    elif done is not None:
        done.set()
    # Asynchronous: writing, uploading and the marker run in a background thread while training
    # goes on; a failure there fails the run at the next step.
    mode = CheckpointUploadMode.ASYNC if spec.storage.async_upload else CheckpointUploadMode.SYNC
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                     checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=checkpoint is not None,
                     checkpoint_upload_fn=upload)
