"""Each loss and regulariser against a value computed by hand on a tiny case."""

import math

import pytest
import torch
from torch import nn

from rayganx.models import losses, networks

REAL = torch.tensor([0.0, 2.0])
FAKE = torch.tensor([1.0, -1.0])


def sp(x):  # softplus by hand
    return math.log1p(math.exp(x))


def test_non_saturating_is_softplus_on_logits():
    want_d = (sp(-0.0) + sp(-2.0)) / 2 + (sp(1.0) + sp(-1.0)) / 2
    assert losses.d_loss("non_saturating", REAL, FAKE).item() == pytest.approx(want_d)
    assert losses.g_loss("non_saturating", FAKE).item() == pytest.approx((sp(-1.0) + sp(1.0)) / 2)
    # it equals binary cross-entropy on probabilities, not a sum of raw logits
    bce = nn.functional.binary_cross_entropy(torch.sigmoid(REAL), torch.ones(2)) + \
        nn.functional.binary_cross_entropy(torch.sigmoid(FAKE), torch.zeros(2))
    assert losses.d_loss("non_saturating", REAL, FAKE).item() == pytest.approx(bce.item(), rel=1e-5)


def test_one_sided_label_smoothing():
    # real logit 0 with target 0.9: 0.9·softplus(0) + 0.1·softplus(0) = log 2; fakes untouched
    got = losses.d_loss("non_saturating", torch.zeros(1), torch.full((1,), -50.0), smoothing=0.1)
    assert got.item() == pytest.approx(math.log(2), abs=1e-6)
    got = losses.d_loss("least_squares", torch.ones(1), torch.zeros(1), smoothing=0.1)
    assert got.item() == pytest.approx(0.5 * 0.1 ** 2)


def test_hinge_wasserstein_least_squares():
    assert losses.d_loss("hinge", REAL, FAKE).item() == pytest.approx((1 + 0) / 2 + (2 + 0) / 2)
    assert losses.g_loss("hinge", FAKE).item() == pytest.approx(0.0)
    assert losses.d_loss("wasserstein", REAL, FAKE).item() == pytest.approx(0.0 - 1.0)
    assert losses.g_loss("wasserstein", torch.tensor([3.0, 1.0])).item() == pytest.approx(-2.0)
    assert losses.d_loss("least_squares", REAL, FAKE).item() == pytest.approx(0.5 * 1 + 0.5 * 1)
    assert losses.g_loss("least_squares", FAKE).item() == pytest.approx(0.5 * (0 + 4) / 2)


class Linear(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x, y=None):
        return x.flatten(1) @ self.w


def test_gradient_penalty_of_a_linear_critic():
    # ∇D = w everywhere, so the penalty is (||w|| - 1)² = (3 - 1)² = 4 whatever the interpolates
    d = Linear(torch.tensor([2.0, 1.0, 2.0, 0.0]))
    gp = losses.gradient_penalty(d, torch.randn(5, 1, 2, 2), torch.randn(5, 1, 2, 2))
    assert gp.item() == pytest.approx(4.0)
    gp.backward()  # differentiable w.r.t. the critic: d/dw (||w||-1)² = 2(||w||-1)·w/||w||
    assert torch.allclose(d.w.grad, 2 * 2 * d.w.detach() / 3)


def test_r1_of_a_quadratic_discriminator():
    # D(x) = ½||x||², ∇D = x, so R1 = E||x||²
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0]], requires_grad=True)
    r1 = losses.r1_penalty(0.5 * (x ** 2).sum(1), x)
    assert r1.item() == pytest.approx((5 + 9) / 2)


def test_spectral_norm_bounds_the_largest_singular_value():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
    with torch.no_grad():
        for layer in (net[0], net[2]):
            layer.weight.mul_(5.0)
    d = networks.apply_spectral_norm(net)
    for _ in range(30):  # power iterations run in training-mode forwards
        d(torch.randn(8, 16))
    d.eval()
    for layer in (d[0], d[2]):
        sigma = torch.linalg.matrix_norm(layer.weight.detach(), ord=2).item()
        assert sigma == pytest.approx(1.0, abs=0.02)
    raw = d[0].parametrizations.weight.original.detach()
    assert torch.linalg.matrix_norm(raw, ord=2).item() > 1.5  # the unnormalised weight is larger


@pytest.mark.parametrize("kind", ["dcgan", "resnet_gan"])
def test_spectral_norm_on_a_conditional_generator_spares_the_batchnorm_embeddings(kind):
    # The conditional BatchNorm shift embedding starts at zero (sigma 0): normalising it gave NaN.
    from rayganx.job.spec import from_dict

    spec = from_dict({"name": "x", "model": {"kind": kind, "ngf": 8, "ndf": 8, "conditional": True,
                                             "spectral_norm": "both"},
                      "data": {"labels": True}, "train": {"steps": 1}})
    torch.manual_seed(0)
    nets = networks.build(spec, num_classes=10)
    y = torch.arange(8) % 10
    x = nets["g"](torch.randn(8, spec.model.latent_dim), y)
    assert torch.isfinite(x).all() and x.std() > 0
    assert torch.isfinite(nets["d"](x, y)).all()
    cbn = [m for m in nets["g"].modules() if isinstance(m, networks.CondBatchNorm2d)]
    assert cbn and not any(hasattr(e, "parametrizations") for m in cbn for e in (m.gain, m.bias))
    assert torch.equal(cbn[0].gain.weight, torch.ones_like(cbn[0].gain.weight))  # gain 1 at the start
    # The projection discriminator's class embedding keeps spectral norm (SNGAN, BigGAN).
    assert hasattr(nets["d"].head.embed, "parametrizations")


def test_ema_arithmetic():
    g = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(g.weight)
    ema = losses.EMA(g, decay=0.9, start=2)
    with torch.no_grad():
        g.weight.fill_(1.0)
    ema.update(g, step=1)  # before start: a plain copy
    assert ema.model.weight.item() == pytest.approx(1.0)
    with torch.no_grad():
        g.weight.fill_(2.0)
    ema.update(g, step=2)
    assert ema.model.weight.item() == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)
    ema.update(g, step=3)
    assert ema.model.weight.item() == pytest.approx(0.9 * 1.1 + 0.1 * 2.0)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_ema_on_averaged_model_equals_the_hand_written_update():
    """The EMA now rides on torch's AveragedModel; the update it replaced, written out, gives the
    same weights and buffers on a fixed sequence (start, ramp-up and BatchNorm included)."""
    import copy

    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    ema = losses.EMA(g, decay=0.99, start=3, rampup=0.05)
    ref = copy.deepcopy(g).eval().requires_grad_(False)
    for step in range(1, 40):
        with torch.no_grad():
            for p in g.parameters():
                p.add_(0.1 * torch.randn_like(p))
        g.train()(torch.randn(16, 4))  # moves BatchNorm's running statistics
        ema.update(g, step)
        beta = losses.ema_beta(0.99, step, 0.05) if step >= 3 else 0.0
        with torch.no_grad():
            for e, p in zip(ref.parameters(), g.parameters()):
                e.lerp_(p, 1.0 - beta)
            for e, b in zip(ref.buffers(), g.buffers()):
                e.copy_(b)
        for (k, a), (_, b) in zip(ema.model.state_dict().items(), ref.state_dict().items()):
            assert torch.allclose(a.float(), b.float(), atol=1e-6), (step, k)
    assert set(ema.model.state_dict()) == set(g.state_dict())  # checkpoints keep g's keys


def test_ema_ramp_up_follows_stylegan2_ada():
    # ADA: ema_nimg = min(ema_nimg, cur_nimg * rampup); beta = 0.5 ** (batch / ema_nimg)
    batch, decay, rampup = 64, 0.999, 0.05
    ema_nimg = batch * math.log(0.5) / math.log(decay)  # the half-life in images that 0.999 means
    for step in (0, 1, 10, 100, 1000, 20000):
        nimg = min(ema_nimg, step * batch * rampup)
        expected = 0.5 ** (batch / nimg) if nimg > 0 else 0.0
        assert losses.ema_beta(decay, step, rampup) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert losses.ema_beta(decay, 20000, rampup) == pytest.approx(decay)  # ramp over: the plain decay
    assert losses.ema_beta(decay, 5, None) == decay


def test_ema_generator_of_a_short_run_is_not_its_initial_weights():
    from rayganx.job.spec import from_dict
    from rayganx.training.tasks import GANTask

    spec = from_dict({"name": "x", "model": {"kind": "mlp_gan", "hidden": [16]}, "data": {"image_size": 8},
                      "train": {"steps": 30, "batch_size": 16, "ema_decay": 0.999,
                                "optim_g": {"lr": 0.01}}, "scaling": {"num_workers": 1}})
    torch.manual_seed(0)
    task = GANTask(spec, None, torch.device("cpu"), distributed=False)
    start = torch.cat([p.detach().flatten() for p in task.g.parameters()]).clone()
    for it in range(30):
        task.step(torch.rand(16, 1, 8, 8) * 2 - 1, torch.zeros(16, dtype=torch.long), it, it, 30)
    now = torch.cat([p.detach().flatten() for p in task.g.parameters()])
    ema = torch.cat([p.detach().flatten() for p in task.ema.model.parameters()])
    # Without a ramp-up, 30 updates at 0.999 leave the average 97% at the initial weights.
    assert (ema - now).norm() < 0.5 * (ema - start).norm()
    assert spec.train.ema_rampup == 0.05  # on by default


def test_diffaugment_translation_is_a_shift():
    torch.manual_seed(0)
    x = torch.zeros(64, 1, 16, 16)
    x[:, :, 8, 8] = 1.0  # one bright pixel
    out = losses.diffaugment(x, ["translation"])
    assert out.shape == x.shape
    pos = out[:, 0].flatten(1).argmax(1)
    dy, dx = pos // 16 - 8, pos % 16 - 8
    assert (out.flatten(1).sum(1) == 1).all()  # content kept, only moved
    assert dy.abs().max() <= 2 and dx.abs().max() <= 2  # ratio 1/8 of 16 px
    assert len(set(zip(dy.tolist(), dx.tolist()))) > 5  # fresh parameters per image


def test_diffaugment_cutout_and_color():
    torch.manual_seed(0)
    x = torch.ones(32, 3, 16, 16)
    cut = losses.diffaugment(x, ["cutout"])
    zeros = (cut[:, 0] == 0).flatten(1).sum(1)
    assert zeros.max() == 64 and zeros.min() > 0  # an 8x8 square (clipped at the borders)
    assert torch.equal(cut[:, 0] == 0, cut[:, 2] == 0)  # same square on every channel
    col = losses.diffaugment(x, ["color"])
    assert col.shape == x.shape and not torch.allclose(col, x)
    y = torch.rand(4, 3, 16, 16, requires_grad=True)
    losses.diffaugment(y, ["translation", "color", "cutout"]).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0  # differentiable, so G learns through it


def test_diffaugment_applies_the_same_policy_to_real_and_fake():
    from rayganx.job.spec import from_dict
    from rayganx.training.tasks import GANTask

    spec = from_dict({"name": "x", "model": {"ngf": 8, "ndf": 8}, "train": {"steps": 1, "diffaug": ["cutout"]},
                      "scaling": {"num_workers": 1}})
    task = GANTask(spec, None, torch.device("cpu"), distributed=False)
    for x in (torch.ones(8, 1, 32, 32), -torch.ones(8, 1, 32, 32)):  # "real" and "fake"
        assert ((task._d_input(x, 0, 10, None) == 0).flatten(1).sum(1) > 0).all()


def test_gradient_penalty_interpolates_the_augmented_inputs_d_trains_on():
    # DiffAugment: D only ever sees augmented images, so that is where its gradient is constrained.
    from rayganx.job.spec import from_dict
    from rayganx.training.tasks import GANTask

    spec = from_dict({"name": "x", "model": {"kind": "dcgan", "ngf": 8, "ndf": 8, "d_batchnorm": False},
                      "train": {"steps": 1, "loss": "wasserstein", "gp_lambda": 10.0,
                                "diffaug": ["translation", "cutout"]}, "scaling": {"num_workers": 1}})
    torch.manual_seed(0)
    task = GANTask(spec, None, torch.device("cpu"), distributed=False)
    seen = []
    task.d.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    task.step(torch.rand(8, 1, 32, 32) * 2 - 1, torch.zeros(8, dtype=torch.long), it=0, step=0, total=1)
    real_in, fake_in, penalty_in = seen[:3]  # then the generator step's call
    assert (real_in == 0).flatten(1).sum(1).min() >= 64  # D trained on cut-out reals
    # every interpolate lies on the segment between the real and the fake D was trained on
    diff = (real_in - fake_in).flatten(1)
    alpha = ((penalty_in - fake_in).flatten(1) * diff).sum(1) / diff.pow(2).sum(1)
    assert ((alpha >= 0) & (alpha <= 1)).all()
    assert torch.allclose(penalty_in, fake_in + alpha.view(-1, 1, 1, 1) * (real_in - fake_in), atol=1e-5)


def test_lazy_gradient_penalty_every_k_steps_scaled_by_k():
    from rayganx.job.spec import from_dict
    from rayganx.training.tasks import GANTask

    def task(lam, every):
        spec = from_dict({"name": "x", "model": {"kind": "dcgan", "ngf": 8, "ndf": 8, "d_batchnorm": False},
                          "train": {"steps": 4, "loss": "wasserstein", "gp_lambda": lam, "gp_every": every},
                          "scaling": {"num_workers": 1}})
        torch.manual_seed(0)
        return GANTask(spec, None, torch.device("cpu"), distributed=False)

    real = torch.rand(8, 1, 32, 32) * 2 - 1
    labels = torch.zeros(8, dtype=torch.long)
    lazy, calls = task(10.0, 2), []
    lazy.d.register_forward_pre_hook(lambda module, args: calls.append(1))
    eager = task(20.0, 1)  # the same penalty weight on the steps that have one
    torch.manual_seed(1)
    lazy.step(real, labels, it=0, step=0, total=4)
    torch.manual_seed(1)
    eager.step(real, labels, it=0, step=0, total=4)
    for a, b in zip(lazy.d.parameters(), eager.d.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert len(calls) == 4  # real, fake, the penalty's interpolates; then the generator step
    for it in (1, 2, 3):
        lazy.step(real, labels, it=it, step=it, total=4)
    assert len(calls) == 4 + 3 + 4 + 3  # no penalty on steps 1 and 3


def test_instance_noise_anneals_to_zero():
    x = torch.zeros(20000)
    assert losses.instance_noise(x, 0.5, step=0, total=10).std().item() == pytest.approx(0.5, rel=0.05)
    assert losses.instance_noise(x, 0.5, step=5, total=10).std().item() == pytest.approx(0.25, rel=0.05)
    assert torch.equal(losses.instance_noise(x, 0.5, step=10, total=10), x)
