"""What a trained model is used for beyond sampling.

`complete` (image completion over a dataset), `inpaint` (completing one batch: GAN latent
search, VAE, the mean and nearest baselines).

May import: job, store, models, data.
"""
