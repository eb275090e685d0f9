"""Sweeps: a job many times under Ray Tune.

`sweep` (the sweep file and its space), `tune` (the Tuner: ASHA, PBT, resume), `trial` (one
trial driving its TorchTrainer), `leaderboard` (the ranking and the best trial's job).

May import: job, store, training.
"""
