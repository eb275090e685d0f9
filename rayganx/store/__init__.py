"""The run store: what a run keeps, on local disk or object storage.

`storage` (paths and URLs, whole-file writes, weights-only loading), `pyarrow_fs` (the
filesystems Ray reads and writes through), `runs` (metrics parts, checkpoints and their marker),
`lock` (the fenced run lock), `uploads` (the background writer that rides out store outages),
`tracking` (TensorBoard event files, Ray's custom metrics).

May import: job.
"""
