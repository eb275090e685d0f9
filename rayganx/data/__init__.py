"""The data: every source a job reads, in the order it reads it.

`sources` (image folders, Parquet, CelebA, digits: listing, splitting, decoding), `order` (the
permutation per seed and epoch), `rows` (what a worker reads from any position), `points` (the
2-D Gaussian mixtures), `prepare` (`rayganx data prepare`), `generate` (labelled images from a
generator as Parquet parts), `synthetic` (those images as classifier rows).

May import: job, store, models.
"""
