"""TensorBoard event files in the run store (`<run>/tb/`), written by rank 0.

Events are kept in memory and written as whole files at flush points (checkpoints, at most
every `flush_every_s` between them, the end), one new numbered file each time, never appended
to or rewritten: the store's whole-file write is a single PUT on object storage and a rename
on local disk, so no reader ever sees half a file. File names sort in write order, which is
the order TensorBoard's directory reader needs. A resumed attempt or a divergence rollback
logs steps again: every attempt begins, and every rollback is marked, with a SessionLog START
event at the step it goes on from, on which TensorBoard drops every point at or after that
step (its restart purge; the first START of a run only marks its beginning), so the curves show
one line, as the metrics log does with `restart_from`.

Only TensorBoard's protobufs are used: no TensorFlow, no writer thread.
"""

from __future__ import annotations

import io
import logging
import math
import posixpath
import re
import socket
import time

from rayganx.store.storage import Store

TB_DIR = "tb"
EVENT_RE = re.compile(r"^events\.out\.tfevents\.(\d{6})\.")
# Rows carry these, but they are bookkeeping, not curves.
NOT_SCALARS = {"step", "time", "first_step_at"}

log = logging.getLogger("rayganx")


def _pb():
    from tensorboard.compat.proto import event_pb2, summary_pb2

    return event_pb2, summary_pb2


def event_file(events: list) -> bytes:
    """The bytes of an event file: the version record, then each Event, TFRecord-framed."""
    from tensorboard.summary.writer.record_writer import RecordWriter

    event_pb2, _ = _pb()
    buf = io.BytesIO()
    w = RecordWriter(buf)
    w.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
    for e in events:
        w.write(e.SerializeToString())
    return buf.getvalue()


def next_seq(tb: Store) -> int:
    seqs = [int(m.group(1)) for e in tb.listdir() if (m := EVENT_RE.match(posixpath.basename(e["name"])))]
    return max(seqs) + 1 if seqs else 0


def event_name(seq: int, tag: str = "rayganx") -> str:
    return f"events.out.tfevents.{seq:06d}.{int(time.time())}.{socket.gethostname()}.{tag}"


def write_events(tb: Store, events: list, seq: int, tag: str = "rayganx") -> str:
    name = event_name(seq, tag)
    tb.write_bytes(event_file(events), name)
    return name


def scalar_values(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k not in NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


class TensorBoardLog:
    """Rank 0's TensorBoard log of one run attempt: scalars, sample grids, the spec as text."""

    def __init__(self, run: Store, flush_every_s: float = 30.0, uploader=None):
        self.tb, self.flush_every_s, self.uploader = run.child(TB_DIR), flush_every_s, uploader
        self.seq = next_seq(self.tb)
        self.pending: list = []
        self.last_flush = time.monotonic()

    def restart(self, step: int) -> None:
        """Points at `step` and after, logged before, are superseded (a resume, a rollback)."""
        event_pb2, _ = _pb()
        self.pending.append(event_pb2.Event(wall_time=time.time(), step=step, session_log=event_pb2.SessionLog(
            status=event_pb2.SessionLog.START)))

    def _event(self, step: int, values: list, wall_time: float | None = None):
        event_pb2, summary_pb2 = _pb()
        return event_pb2.Event(wall_time=wall_time or time.time(), step=step,
                               summary=summary_pb2.Summary(value=values))

    def spec(self, step: int, spec_yaml: str) -> None:
        from torch.utils.tensorboard.summary import text

        # Four-space indentation makes TensorBoard's markdown render the YAML as code.
        body = "\n".join("    " + line for line in spec_yaml.splitlines())
        self.pending.append(self._event(step, list(text("spec", body).value)))

    def scalars(self, row: dict) -> None:
        _, summary_pb2 = _pb()
        values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalar_values(row).items()]
        if values:
            self.pending.append(self._event(row["step"], values, row.get("time")))

    def image(self, step: int, png: bytes, tag: str = "samples") -> None:
        """A PNG as it is (no re-encoding): TensorBoard's image summary holds encoded bytes."""
        from PIL import Image

        _, summary_pb2 = _pb()
        im = Image.open(io.BytesIO(png))
        colorspace = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}.get(im.mode, 3)
        value = summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
            height=im.height, width=im.width, colorspace=colorspace, encoded_image_string=png))
        self.pending.append(self._event(step, [value]))

    def log(self, row: dict, png: bytes | None = None, force: bool = False) -> None:
        """A logged row (and the sample grid made at its step); force: a flush point (checkpoint)."""
        self.scalars(row)
        if png:
            self.image(row["step"], png)
        if force or time.monotonic() - self.last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        if self.uploader is not None:
            self.uploader.put(self.tb, event_file(self.pending), event_name(self.seq))
        else:
            write_events(self.tb, self.pending, self.seq)
        self.seq, self.pending, self.last_flush = self.seq + 1, [], time.monotonic()


def open_log(run_url: str, endpoint_url: str | None, step: int, spec_yaml: str, uploader=None) -> TensorBoardLog | None:
    """Rank 0's log, or None (with one warning) where TensorBoard is not installed: curves are
    a convenience, and the metrics log holds the same numbers."""
    try:
        import tensorboard.compat.proto.event_pb2  # noqa: F401
    except ImportError:
        log.warning("tensorboard is not installed on the workers; no TensorBoard events for this run")
        return None
    tb = TensorBoardLog(Store(run_url, endpoint_url), uploader=uploader)
    tb.restart(step)
    tb.spec(step, spec_yaml)
    return tb


# --------------------------------------------------------------------------- sweeps: the HParams view


def _hparam_value(v):
    if isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def write_hparams(run_url: str, endpoint_url: str | None, config: dict, metrics: list[str],
                  status: str | None = None) -> str:
    """A trial's HParams session in its run's tb/ folder, beside the scalars the metrics name.

    Written by the trial's driver: at the start (the session and the experiment's columns) and
    at the end (status: "success" or "failure"), each as a whole new event file."""
    from tensorboard.plugins.hparams import api_pb2
    from torch.utils.tensorboard.summary import hparams

    hp = {k: _hparam_value(v) for k, v in config.items()}
    exp, ssi, sei = hparams(hp, {m: 0.0 for m in metrics})
    tb = Store(run_url, endpoint_url).child(TB_DIR)
    event_pb2, _ = _pb()
    if status is None:
        events = [event_pb2.Event(wall_time=time.time(), summary=exp),
                  event_pb2.Event(wall_time=time.time(), summary=ssi)]
    else:
        s = sei.value[0]
        from tensorboard.plugins.hparams import plugin_data_pb2

        content = plugin_data_pb2.HParamsPluginData.FromString(s.metadata.plugin_data.content)
        content.session_end_info.status = (api_pb2.STATUS_SUCCESS if status == "success"
                                           else api_pb2.STATUS_FAILURE)
        s.metadata.plugin_data.content = content.SerializeToString()
        events = [event_pb2.Event(wall_time=time.time(), summary=sei)]
    return write_events(tb, events, next_seq(tb), tag="hparams")


# --------------------------------------------------------------------------- reading, syncing


def find_runs(store: Store) -> list[Store]:
    """The runs at a location: the run itself, or a sweep's trials (folders with a spec.yaml)."""
    if store.exists("spec.yaml"):
        return [store]
    runs = []
    for entry in store.listdir():
        if entry.get("type") == "directory":
            child = store.child(posixpath.basename(entry["name"].rstrip("/")))
            if child.exists("spec.yaml"):
                runs.append(child)
    return sorted(runs, key=lambda s: s.url)


def sync_events(run: Store, dest: str) -> int:
    """Copy a run's event files into a local folder, skipping those already there: event files
    are never rewritten, so a file present with the same size is the same file. Returns the
    number of files copied."""
    import os

    copied = 0
    os.makedirs(dest, exist_ok=True)
    for entry in run.child(TB_DIR).listdir():
        name = posixpath.basename(entry["name"])
        if entry.get("type") != "file" or not EVENT_RE.match(name):
            continue
        target = os.path.join(dest, name)
        if os.path.exists(target) and os.path.getsize(target) == entry.get("size"):
            continue
        data = run.child(TB_DIR).read_bytes(name)
        tmp = os.path.join(dest, f".partial_{os.getpid()}")  # no "tfevents" in it: TensorBoard skips it
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
        copied += 1
    return copied


class Telemetry:
    """Training metrics as Ray custom metrics, scraped from each node's Prometheus endpoint."""

    EXPORTED = ("loss_d", "loss_g", "loss", "images_per_s", "step", "step_time", "val_accuracy", "elbo", "fid",
                "kid", "rollbacks", "last_checkpoint_time")

    def __init__(self, job: str, rank: int):
        from ray.util import metrics as rm

        self.tags = {"job": job, "rank": str(rank)}
        self.gauges = {k: rm.Gauge(f"rayganx_{k}", description=f"rayganx training metric {k}",
                                   tag_keys=("job", "rank")) for k in self.EXPORTED}

    def record(self, metrics: dict) -> None:
        # Rows name rollbacks only after the first one; 0 before keeps the series (and its panel) alive.
        metrics = {"rollbacks": 0} | metrics
        for k, gauge in self.gauges.items():
            if k in metrics and metrics[k] is not None:
                gauge.set(float(metrics[k]), tags=self.tags)

    def checkpointed(self) -> None:
        """The time of the last checkpoint: Grafana shows its age as time() - this."""
        self.gauges["last_checkpoint_time"].set(time.time(), tags=self.tags)
