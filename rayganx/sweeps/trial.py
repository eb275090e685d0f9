"""One sweep trial: the Tune function trainable that drives the trial's TorchTrainer.

The trainable is only a driver (the Train V2 pattern; `Tuner(TorchTrainer)` is deprecated). A
Ray Train callback passes each of the job's reports (one per checkpoint) back to it, and it
reports them to Tune with a small pointer checkpoint naming the job's own checkpoint; Tune and
PBT's exploit restore a trial from that pointer. Ray's own `TuneReportCallback` forwards
metrics only (the Tune session's queue calls `report(metrics)` without a checkpoint), and PBT
exploits nothing without a Tune checkpoint, hence this small bridge.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from pathlib import Path

from rayganx.job.spec import JobSpec
from rayganx.sweeps.sweep import from_dict
from rayganx.training.failures import root_cause


def trial_name(trial_id: str) -> str:
    return "trial_" + trial_id.rsplit("_", 1)[-1]


def _to_tune_callback(queue):
    """A Ray Train callback, run in the Train controller, that passes each report to the driver."""
    from ray.train import UserCallback

    class ToTune(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            # The folder's own name: it carries a generation after a PBT exploit (checkpointing.folder_name).
            queue.put((metrics[0], checkpoint.path.rstrip("/").rsplit("/", 1)[-1] if checkpoint else None))

    return ToTune()


def _restore_point(spec: JobSpec, restored) -> str | None:
    """The checkpoint a restored trial starts from (None: Ray Train resumes the trial's own run).

    Tune restores a trial from the pointer it last reported: its own run after --resume or a
    pause, another trial's for a PBT exploit. Its own run resumes from its newest checkpoint; a
    donor's named checkpoint is taken as named, or, pruned by the time a worker loads it, the
    donor's newest complete one (checkpointing.restore, where the load happens)."""
    if not restored:
        return None
    with restored.as_directory() as d:
        url = json.loads(Path(d, "pointer.json").read_text())["checkpoint"]
    return None if url.rstrip("/").rsplit("/", 1)[0] == spec.run_url else url


def _write_hparams(spec: JobSpec, config: dict, metrics: list[str], **kwargs) -> None:
    """TensorBoard's HParams view is a convenience: a store hiccup here must neither fail a trial
    nor mask the error it failed with."""
    from rayganx.store import tracking

    try:
        tracking.write_hparams(spec.run_url, spec.storage.endpoint_url, config, metrics, **kwargs)
    except Exception as e:  # noqa: BLE001
        logging.getLogger("rayganx").warning("%s: no HParams session written (%s)", spec.run_url, e)


def run_trial(config: dict, sweep_raw: dict, source: str) -> None:
    """The Tune function trainable: drives one trial's TorchTrainer."""
    from ray import tune

    from rayganx.training import runner, stopping

    sw = from_dict(sweep_raw, source)  # the base job travels inline
    spec = runner.resolve_paths(sw.trial_spec(config, trial_name(tune.get_context().get_trial_id())))
    p = runner.plan(spec)
    if spec.eval.every:
        runner.prepare_eval(spec, p)
    init_from = _restore_point(spec, tune.get_checkpoint())
    hp_metrics = list(dict.fromkeys([sw.metric, *(("loss_d", "loss_g") if spec.is_gan else ("loss",))]))
    # A trial holds its run's lock like any run, and a trial's newest attempt wins it: Tune stops a
    # trial's actor for a PBT exploit or a pause without a word to it, and a predecessor that still
    # writes (on a node that was cut off) stops within a heartbeat of the takeover.
    with stopping.locked(spec, force=True) as (lock, stop_on_lost):
        _write_hparams(spec, config, hp_metrics)
        failure = _drive(spec, p, init_from, lock.token, stop_on_lost)
    _write_hparams(spec, config, hp_metrics, status="failure" if failure else "success")
    if failure:
        raise runner.RunError(root_cause(failure[0])) from failure[0]


def _drive(spec: JobSpec, p, init_from: str | None, token: str, stop_on_lost) -> list[BaseException]:
    """Fit the trial's TorchTrainer in a thread, reporting each of its reports to Tune."""
    from ray import tune
    from ray.util.queue import Queue

    from rayganx.training import runner

    queue = Queue(actor_options={"num_cpus": 0})
    trainer = runner.trainer_for(spec, p, callbacks=[_to_tune_callback(queue), stop_on_lost], init_from=init_from,
                                 lock_token=token)
    # A trial's spec changes by design (PBT's mutations): every attempt's is kept, none refused.
    runner.begin_attempt(spec, runner.last_step(spec))
    failure: list[BaseException] = []

    def fit():
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial's thread
            failure.append(e)
        finally:
            queue.put(None)

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    while (item := queue.get()) is not None:
        metrics, folder = item
        report = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}
        if not folder:
            tune.report(report)
            continue
        with tempfile.TemporaryDirectory() as d:
            url = f"{spec.run_url}/{folder}"
            Path(d, "pointer.json").write_text(json.dumps({"checkpoint": url, "step": metrics["step"]}))
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))
    thread.join()
    return failure

