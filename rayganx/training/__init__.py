"""A job as one Ray Train run, and the loop every worker runs.

`runner` (the plan made before Ray starts, the trainer, a run start to end), `stopping` (Ctrl-C,
SIGTERM, a lost lock), `loop` (the worker loop, top to bottom), `tasks` (each model family's update
on one batch), `checkpointing`, `progress` (live rows read), `failures` (the line a failed run
ends with), `bench` (training speed against plain PyTorch).

May import: job, store, models, data, evaluation.
"""
