"""Networks, built by name from the job spec. Plain PyTorch: no Ray needed to load them.

Discriminators return one logit per image; conditional ones take the labels and add the
projection term of Miyato & Koyama (2018). Conditional generators use conditional BatchNorm.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _sn

from rayganx.job.spec import JobSpec


# --------------------------------------------------------------------------- building blocks


class CondBatchNorm2d(nn.Module):
    """BatchNorm whose scale and shift come from the class label (de Vries et al. 2017)."""

    def __init__(self, features: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(features, affine=False)
        self.gain = nn.Embedding(num_classes, features)
        self.bias = nn.Embedding(num_classes, features)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x, y):
        return self.bn(x) * self.gain(y)[:, :, None, None] + self.bias(y)[:, :, None, None]


class _Seq(nn.Module):
    """A sequence whose conditional layers also receive the labels."""

    def __init__(self, *layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x, y=None):
        for layer in self.layers:
            x = layer(x, y) if isinstance(layer, (CondBatchNorm2d, ResBlockUp)) else layer(x)
        return x


def _bn(features: int, num_classes: int | None):
    return CondBatchNorm2d(features, num_classes) if num_classes else nn.BatchNorm2d(features)


class Projection(nn.Module):
    """Discriminator head: linear logit plus the class projection <embed(y), h>."""

    def __init__(self, features: int, num_classes: int | None):
        super().__init__()
        self.linear = nn.Linear(features, 1)
        self.embed = nn.Embedding(num_classes, features) if num_classes else None

    def forward(self, h, y=None):
        out = self.linear(h).squeeze(1)
        if self.embed is not None:
            out = out + (self.embed(y) * h).sum(1)
        return out


def dcgan_init(module: nn.Module) -> None:
    """Radford et al.: weights N(0, 0.02), BatchNorm scales N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def apply_spectral_norm(module: nn.Module) -> nn.Module:
    """One power iteration per forward on every conv/linear/embedding layer (Miyato et al.).

    Conditional BatchNorm's gain and shift embeddings are left alone, as in SNGAN and BigGAN:
    they are per-class affine parameters, not a layer whose Lipschitz constant matters, and the
    shift starts at zero, where the normalisation divides by a zero singular value (NaN).
    A projection discriminator's class embedding is a layer of D and keeps spectral norm."""
    for name, child in list(module.named_children()):
        if isinstance(child, CondBatchNorm2d):
            continue
        if isinstance(child, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
            setattr(module, name, _sn(child))
        else:
            apply_spectral_norm(child)
    return module


# --------------------------------------------------------------------------- vanilla MLP GAN


def _mlp(width: int, hidden: list[int], out: int, last: nn.Module | None = None) -> nn.Sequential:
    layers = []
    for h in hidden:
        layers += [nn.Linear(width, h), nn.LeakyReLU(0.2)]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, out), *([last] if last else []))


class MLPGenerator(nn.Module):
    """With `components` K > 0 the latent prior is a mixture of K Gaussians with fixed means from
    N(0, spread^2 I) (static GM-GAN, Ben-Yosef & Weinshall 2018): a continuous map of one Gaussian
    bridges disconnected modes (Khayatkhoei et al. 2018). Callers still draw z ~ N(0, I): the
    component is k = floor(K * Phi(z_0)). Learned means (DeLiGAN) did worse (the ring job's comment)."""

    def __init__(self, latent_dim: int, hidden: list[int], out_shape: tuple[int, ...], tanh: bool,
                 components: int = 0, spread: float = 2.0):
        super().__init__()
        self.net, self.out_shape = _mlp(latent_dim, hidden, math.prod(out_shape), nn.Tanh() if tanh else None), out_shape
        # Seeded by K alone: every worker and rebuild draws the same means; a buffer, so checkpoints keep them.
        means = torch.randn(components, latent_dim, generator=torch.Generator().manual_seed(components)) * spread
        self.register_buffer("means", means if components else None)

    def component(self, z):
        return (torch.special.ndtr(z[:, 0]) * len(self.means)).long().clamp_(0, len(self.means) - 1)

    def forward(self, z, y=None):
        z = z.flatten(1)
        if self.means is not None:
            z = z + self.means[self.component(z)]
        return self.net(z).view(-1, *self.out_shape)


class MLPDiscriminator(nn.Module):
    """With `fourier` F > 0, D also sees sin and cos of F fixed random projections of each point
    (Tancik et al. 2020): an MLP on raw coordinates learns fine detail slowly (spectral bias)."""

    def __init__(self, in_shape: tuple[int, ...], hidden: list[int], fourier: int = 0, scale: float = 1.0):
        super().__init__()
        freqs = torch.randn(2, fourier, generator=torch.Generator().manual_seed(fourier)) * scale  # 2-D points
        self.register_buffer("freqs", freqs if fourier else None)
        self.net = _mlp(math.prod(in_shape) * (1 + fourier), list(reversed(hidden)), 1)  # + 2F per 2-D point

    def forward(self, x, y=None):
        x = x.flatten(1)
        if self.freqs is not None:
            a = (2 * math.pi) * (x.view(len(x), -1, 2) @ self.freqs)
            x = torch.cat([x, a.sin().flatten(1), a.cos().flatten(1)], 1)
        return self.net(x).squeeze(1)


# --------------------------------------------------------------------------- DCGAN


class DCGANGenerator(nn.Module):
    def __init__(self, latent_dim: int, ngf: int, channels: int, size: int, num_classes=None):
        super().__init__()
        n_up = int(math.log2(size)) - 2  # 4x4 -> size
        width = ngf * 2 ** (n_up - 1)
        layers = [nn.ConvTranspose2d(latent_dim, width, 4, 1, 0, bias=False), _bn(width, num_classes),
                  nn.ReLU(True)]
        for _ in range(n_up - 1):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                       _bn(width // 2, num_classes), nn.ReLU(True)]
            width //= 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1), nn.Tanh()]
        self.net = _Seq(*layers)

    def forward(self, z, y=None):
        return self.net(z.view(z.shape[0], -1, 1, 1), y)


class DCGANDiscriminator(nn.Module):
    def __init__(self, ndf: int, channels: int, size: int, batchnorm: bool, num_classes=None):
        super().__init__()
        n_down = int(math.log2(size)) - 2
        layers, width = [nn.Conv2d(channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)], ndf
        for _ in range(n_down - 1):
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=not batchnorm)]
            layers += [nn.BatchNorm2d(width * 2)] if batchnorm else []
            layers += [nn.LeakyReLU(0.2, True)]
            width *= 2
        self.body = nn.Sequential(*layers)
        # The paper's final 4x4 valid convolution is this linear layer on the flattened map;
        # as a linear it also carries the projection term for conditional models.
        self.head = Projection(width * 16, num_classes)

    def forward(self, x, y=None):
        return self.head(self.body(x).flatten(1), y)


# --------------------------------------------------------------------------- SNGAN-style ResNet


class ResBlockUp(nn.Module):
    def __init__(self, cin: int, cout: int, num_classes=None):
        super().__init__()
        self.bn1, self.bn2 = _bn(cin, num_classes), _bn(cout, num_classes)
        self.c1, self.c2 = nn.Conv2d(cin, cout, 3, 1, 1), nn.Conv2d(cout, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1)
        self.cond = bool(num_classes)

    def _norm(self, bn, x, y):
        return bn(x, y) if self.cond else bn(x)

    def forward(self, x, y=None):
        h = nn.functional.interpolate(torch.relu(self._norm(self.bn1, x, y)), scale_factor=2)
        h = self.c2(torch.relu(self._norm(self.bn2, self.c1(h), y)))
        return h + self.skip(nn.functional.interpolate(x, scale_factor=2))


class ResBlockDown(nn.Module):
    def __init__(self, cin: int, cout: int, down: bool, first: bool):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(cin, cout, 3, 1, 1), nn.Conv2d(cout, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1) if (cin != cout or down) else None
        self.down, self.first = down, first

    def forward(self, x):
        h = self.c2(torch.relu(self.c1(x if self.first else torch.relu(x))))
        s = x if self.skip is None else self.skip(x)  # there is a skip conv whenever down
        if self.down:
            h, s = nn.functional.avg_pool2d(h, 2), nn.functional.avg_pool2d(s, 2)
        return h + s


class ResNetGenerator(nn.Module):
    def __init__(self, latent_dim: int, ngf: int, channels: int, size: int, num_classes=None):
        super().__init__()
        self.width = ngf * 4
        self.fc = nn.Linear(latent_dim, 16 * self.width)
        n_up = int(math.log2(size)) - 2
        self.blocks = _Seq(*[ResBlockUp(self.width, self.width, num_classes) for _ in range(n_up)])
        self.out = nn.Sequential(nn.BatchNorm2d(self.width), nn.ReLU(True),
                                 nn.Conv2d(self.width, channels, 3, 1, 1), nn.Tanh())

    def forward(self, z, y=None):
        h = self.fc(z.flatten(1)).view(-1, self.width, 4, 4)
        return self.out(self.blocks(h, y))


class ResNetDiscriminator(nn.Module):
    def __init__(self, ndf: int, channels: int, size: int, num_classes=None):
        super().__init__()
        width = ndf * 2
        n_down = int(math.log2(size)) - 3  # down to 8x8 (32 px: 2 downsamples, like SNGAN)
        blocks = [ResBlockDown(channels, width, down=True, first=True)]
        blocks += [ResBlockDown(width, width, down=True, first=False) for _ in range(n_down - 1)]
        blocks += [ResBlockDown(width, width, down=False, first=False) for _ in range(2)]
        self.body = nn.Sequential(*blocks)
        self.head = Projection(width, num_classes)

    def forward(self, x, y=None):
        h = torch.relu(self.body(x)).sum(dim=(2, 3))  # global sum pooling
        return self.head(h, y)


# --------------------------------------------------------------------------- classifier, VAE


class CNNClassifier(nn.Module):
    """Convolution, pooling and fully connected layers; `features` is the penultimate layer."""

    def __init__(self, channels: int, size: int, num_classes: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(2),
            nn.Conv2d(width, width * 2, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(width * 2 * (size // 4) ** 2, 128), nn.ReLU(True))
        self.classifier = nn.Sequential(nn.Dropout(0.25), nn.Linear(128, num_classes))

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.classifier(self.body(x))


class ConvVAE(nn.Module):
    """A DCGAN-shaped encoder/decoder; the decoder returns logits of pixel intensity in [0, 1]."""

    def __init__(self, latent_dim: int, ngf: int, ndf: int, channels: int, size: int):
        super().__init__()
        self.encoder = DCGANDiscriminator(ndf, channels, size, batchnorm=True).body
        feat = ndf * 2 ** (int(math.log2(size)) - 3) * 16
        self.mu, self.logvar = nn.Linear(feat, latent_dim), nn.Linear(feat, latent_dim)
        self.decoder = DCGANGenerator(latent_dim, ngf, channels, size)
        self.decoder.net.layers = self.decoder.net.layers[:-1]  # logits: the loss applies the sigmoid

    def encode(self, x):
        h = self.encoder(x).flatten(1)
        return self.mu(h), self.logvar(h).clamp(-20, 10)

    def forward(self, x, eps=None):
        mu, logvar = self.encode(x)
        z = mu + (torch.randn_like(mu) if eps is None else eps) * (0.5 * logvar).exp()
        return self.decoder(z), mu, logvar

    def generate(self, z, y=None):
        return torch.sigmoid(self.decoder(z)) * 2 - 1


# --------------------------------------------------------------------------- registry


def build(spec: JobSpec, num_classes: int | None = None) -> dict[str, nn.Module]:
    """Networks for a job: {"g", "d"} for GANs, {"net"} for the classifier and the VAE."""
    m, d = spec.model, spec.data
    c, s = d.channels, d.image_size
    cond = num_classes if m.conditional else None
    k = m.pack  # D's input: k samples side by side (PacGAN), its first layer k times wider
    if m.kind == "mlp_gan":
        points = d.source == "gaussian_mixture"
        shape = (2,) if points else (c, s, s)
        nets = {"g": MLPGenerator(m.latent_dim, m.hidden, shape, not points, m.latent_components, m.latent_spread),
                "d": MLPDiscriminator((shape[0] * k, *shape[1:]), m.hidden, m.fourier_features, m.fourier_scale)}
    elif m.kind == "dcgan":
        nets = {"g": DCGANGenerator(m.latent_dim, m.ngf, c, s, cond),
                "d": DCGANDiscriminator(m.ndf, c * k, s, m.d_batchnorm, cond)}
        for net in nets.values():
            dcgan_init(net)
    elif m.kind == "resnet_gan":
        nets = {"g": ResNetGenerator(m.latent_dim, m.ngf, c, s, cond),
                "d": ResNetDiscriminator(m.ndf, c * k, s, cond)}
    elif m.kind == "cnn":
        return {"net": CNNClassifier(c, s, num_classes or 10, width=m.ndf)}
    elif m.kind == "vae":
        return {"net": ConvVAE(m.latent_dim, m.ngf, m.ndf, c, s)}
    else:  # the spec's Literal makes this unreachable for validated specs
        raise ValueError(f"model.kind: unknown {m.kind!r}")
    if m.spectral_norm in ("d", "both"):
        apply_spectral_norm(nets["d"])
    if m.spectral_norm in ("g", "both"):
        apply_spectral_norm(nets["g"])
    return nets


def pack(x: torch.Tensor, m: int) -> torch.Tensor:
    """PacGAN packing: (N, C, ...) -> (N/m, m*C, ...), each m consecutive samples concatenated
    along channels (images) or features (points). The identity for m = 1."""
    if m == 1:
        return x
    if x.shape[0] % m:
        raise ValueError(f"model.pack: a batch of {x.shape[0]} does not divide into packs of {m}")
    return x.reshape(x.shape[0] // m, m * x.shape[1], *x.shape[2:])


def generate(g: nn.Module, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Samples in [-1, 1] from a generator or a VAE's decoder."""
    return g.generate(z, y) if hasattr(g, "generate") else g(z, y)
