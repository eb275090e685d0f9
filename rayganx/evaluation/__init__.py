"""Scoring a generator: the metrics registry and what feeds it.

`metrics` (FID, KID, IS, precision/recall, CAS, mode coverage), `extractors` (the feature
networks), `inception` (the standard FID Inception, pinned), `scoring` (a generator scored during
training, from the CLI, across a cluster).

May import: job, store, models, data.
"""
