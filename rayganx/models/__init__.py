"""The networks and what they are trained with, in plain PyTorch (no Ray).

`networks` (built by name from the spec), `losses` (adversarial losses, GP, R1, DiffAugment,
EMA), `randomness` (the training draws, RNG capture and restore), `images` (generator output as
images), `trained` (a trained generator outside its run: load, export, sample).

May import: job, store.
"""
