"""What a failed run says: the user-facing line inside Ray's layers of wrapping (`root_cause`) and
the one line a run ends with (`failure_line`)."""

from __future__ import annotations

from rayganx.job.errors import UserError


def seen_errors(err: BaseException) -> list[BaseException]:
    out, stack = [], [err]
    while stack:
        e = stack.pop()
        if e is None or any(e is o for o in out):
            continue
        out.append(e)
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__,
                  getattr(e, "controller_failure", None), *getattr(e, "worker_failures", {}).values()]
    return out


def root_cause(err: BaseException, storage_url: str | None = None) -> str:
    """The user-facing line inside Ray's layers of wrapping. storage_url: the run store, named
    when the cause is that the store went away (Ray's own uploads fail with botocore's text)."""
    from rayganx.job.errors import user_error_names
    from rayganx.store.storage import explain

    for e in seen_errors(err):
        # Ray's RayTaskError(X) is an X too, but its text starts with Ray's own header: its cause,
        # the error itself, comes later in the chain.
        if isinstance(e, UserError) and getattr(e, "cause", None) is None:
            return str(e).splitlines()[0]
    if storage_url:  # the store went away under Ray's own uploads (botocore's or pyarrow's text)
        for e in seen_errors(err):
            line = str(explain(storage_url, e))
            if line.endswith("unreachable"):
                return line
    # Ray Data re-raises worker errors as text: find our error's line in the whole chain.
    import re

    names = "|".join(user_error_names())
    for text in (str(e) for e in seen_errors(err)):
        m = re.search(rf"\b(?:{names}): (.+)", text)
        if m:
            return m.group(1).strip()
    text = str(err).strip().splitlines()
    lines = [ln for ln in text if ln.strip() and not ln.startswith(" ")]
    return (lines[-1] if lines else type(err).__name__)[:500]


def failure_line(err: BaseException, storage_url: str | None = None, embedded: bool = True) -> str:
    """The one line a failed run ends with: what failed and, for what Ray reports (a lost worker or
    node, lost objects), where the details are."""
    line = root_cause(err, storage_url)
    if any(isinstance(e, UserError) for e in seen_errors(err)) or line.endswith("unreachable"):
        return line
    from rayganx.job.cluster import logs_dir

    where = f"Ray's logs in {logs_dir()}" if embedded else "the job's logs (rayganx logs JOB_ID --address ...)"
    return f"the run failed in Ray: {line} (details: run with --verbose, and {where})"
