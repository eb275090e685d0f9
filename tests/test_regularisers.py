"""Each regulariser a job can turn on, observed inside GANTask.step on a known batch.

tests/test_losses.py checks the functions; these check that the step applies them as the spec
asks: a step that silently dropped one would still train, just worse.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from rayganx.models import losses
from rayganx.models.randomness import Draws
from rayganx.job.spec import from_dict
from rayganx.training.tasks import GANTask

SEED, N, LATENT = 0, 8, 8
STAT = {name: i for i, name in enumerate(GANTask.names)}


def gan(model=None, data=None, **train):
    """A tiny GAN task (an MLP on 8 px images unless `model` says otherwise)."""
    spec = from_dict({"name": "x", "model": {"kind": "mlp_gan", "hidden": [16], "latent_dim": LATENT, **(model or {})},
                      "data": {"image_size": 8, **(data or {})},
                      "train": {"steps": 10, "batch_size": N, **train}, "scaling": {"num_workers": 1}})
    torch.manual_seed(0)
    return GANTask(spec, None, torch.device("cpu"), distributed=False)


def batch(n=N, size=8):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def run(task, real, it=0, step=0, total=10):
    """One step with the batch's draws; its stats and D's gradients as the optimiser got them
    (after backward and clipping, before Adam)."""
    got = {}
    opt_step = task.opt_d.step

    def capture(*args, **kwargs):
        got["grads"] = [p.grad.detach().clone() for p in task.d.parameters()]
        return opt_step(*args, **kwargs)

    task.opt_d.step = capture
    try:
        _, stats = task.step(real, None, it, step, total, Draws(SEED, it))
    finally:
        del task.opt_d.step
    return stats, got["grads"]


def inputs_of(d):
    """What D is called on, in order: the real batch, the fakes, then any penalty's or G's calls."""
    seen = []
    d.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen


def outputs_of(d):
    seen = []
    d.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    return seen


def grads(d, loss):
    return torch.autograd.grad(loss, list(d.parameters()))


def same(a, b, atol=1e-6):
    return all(torch.allclose(x, y, rtol=1e-5, atol=atol) for x, y in zip(a, b, strict=True))


def norm(gs):
    return torch.cat([g.flatten() for g in gs]).norm().item()


def differ(a, b):
    """Gradients apart by more than rounding: by a tenth of a's norm."""
    return norm([x - y for x, y in zip(a, b, strict=True)]) > 0.1 * norm(a)


# --------------------------------------------------------------------------- penalties on D's gradient


def test_gradient_penalty_adds_lambda_times_k_times_gp_to_ds_gradient():
    task = gan(loss="wasserstein", gp_lambda=10.0, gp_every=2)
    d0 = copy.deepcopy(task.d)  # before the hook: a copy would record too
    seen = inputs_of(task.d)
    _, got = run(task, batch(), it=0)
    real_in, fake_in = seen[:2]
    draws = Draws(SEED, 0)
    draws.randn(N, LATENT)  # the latents come first; the interpolation weights next
    alpha = draws.rand(N)

    def hand(lam):
        loss = losses.d_loss("wasserstein", d0(real_in), d0(fake_in))
        return grads(d0, loss + lam * losses.gradient_penalty(d0, real_in, fake_in, None, alpha))

    assert same(got, hand(10.0 * 2))  # lazy every 2 steps: weighted x 2 on the steps that have it
    assert differ(got, hand(0.0)) and differ(got, hand(10.0))


def r1_hand(d0, real, fake_in, gamma):
    """D's gradient of the non-saturating loss + gamma/2 · E||∇x D(x)||², the penalty written out."""
    x = real.clone().requires_grad_(True)
    logits = d0(x)
    (gx,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    penalty = gx.pow(2).flatten(1).sum(1).mean()
    return grads(d0, losses.d_loss("non_saturating", logits, d0(fake_in)) + 0.5 * gamma * penalty)


def test_r1_adds_half_gamma_times_the_squared_input_gradient_on_reals():
    task = gan(r1_gamma=10.0, r1_every=1)
    d0 = copy.deepcopy(task.d)
    seen = inputs_of(task.d)
    real = batch()
    _, got = run(task, real, it=0)
    assert torch.equal(seen[0], real)  # the penalty's x is the batch itself
    assert same(got, r1_hand(d0, real, seen[1], 10.0))
    assert differ(got, r1_hand(d0, real, seen[1], 0.0))


def test_lazy_r1_every_k_steps_scaled_by_k():
    task = gan(r1_gamma=10.0, r1_every=3)
    real = batch()
    for it in range(4):
        d0, seen = copy.deepcopy(task.d), []  # copied before the hook: a copy would record too
        hook = task.d.register_forward_pre_hook(lambda module, args, seen=seen: seen.append(args[0].detach().clone()))
        _, got = run(task, real, it=it, step=it)
        hook.remove()
        on = it % 3 == 0  # steps 0 and 3 only, weighted x 3
        assert same(got, r1_hand(d0, real, seen[1], 10.0 * 3 if on else 0.0)), it
        assert differ(got, r1_hand(d0, real, seen[1], 0.0 if on else 10.0 * 3)), it
        if on:
            assert differ(got, r1_hand(d0, real, seen[1], 10.0)), it


def test_grad_clip_scales_ds_gradient_to_the_clip_and_reports_the_norm_before():
    clip = 1e-3
    task = gan(grad_clip=clip)
    d0 = copy.deepcopy(task.d)
    seen = inputs_of(task.d)
    stats, got = run(task, batch())
    full = grads(d0, losses.d_loss("non_saturating", d0(seen[0]), d0(seen[1])))
    assert stats[STAT["grad_norm_d"]].item() == pytest.approx(norm(full), rel=1e-5)  # as clip_grad_norm_ returns it
    assert norm(full) > 100 * clip
    assert norm(got) == pytest.approx(clip, rel=1e-5)
    assert same(got, [g * (clip / norm(full)) for g in full], atol=1e-9)  # same direction, only shorter


# --------------------------------------------------------------------------- the loss D is trained on


def test_hinge_loss_is_what_the_step_reports_for_d():
    task = gan(loss="hinge")
    logits = outputs_of(task.d)
    stats, _ = run(task, batch())
    real, fake = logits[:2]
    want = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    assert stats[STAT["loss_d"]].item() == pytest.approx(want.item(), rel=1e-6)
    assert stats[STAT["d_real"]].item() == pytest.approx(real.mean().item(), rel=1e-6, abs=1e-7)  # raw, no sigmoid
    other = losses.d_loss("non_saturating", real, fake).item()
    assert abs(stats[STAT["loss_d"]].item() - other) > 0.1


@pytest.mark.parametrize("loss", ["non_saturating", "least_squares"])
def test_label_smoothing_targets_one_minus_s_on_reals_only(loss):
    task = gan(loss=loss, label_smoothing=0.2)
    with torch.no_grad():
        task.d.net[-1].bias.fill_(2.0)  # confident logits: at logit 0 every BCE target costs log 2
    logits = outputs_of(task.d)
    stats, _ = run(task, batch())
    real, fake = logits[:2]

    def hand(target):
        if loss == "non_saturating":
            return (F.binary_cross_entropy_with_logits(real, torch.full_like(real, target))
                    + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))).item()
        return (0.5 * (real - target).pow(2).mean() + 0.5 * fake.pow(2).mean()).item()

    assert stats[STAT["loss_d"]].item() == pytest.approx(hand(0.8), rel=1e-6)
    assert abs(stats[STAT["loss_d"]].item() - hand(1.0)) > 0.1


# --------------------------------------------------------------------------- what D sees


@pytest.mark.parametrize("policy", ["translation", "cutout", "color"])
def test_diffaugment_changes_what_d_sees_of_the_reals(policy):
    real = batch() * 0.25 + 0.75  # in [0.5, 1]: a zero can only be the augmentation's
    plain = gan()
    seen = inputs_of(plain.d)
    run(plain, real)
    assert torch.equal(seen[0], real)  # without diffaug D sees the batch itself
    task = gan(diffaug=[policy])
    seen = inputs_of(task.d)
    run(task, real)
    aug = seen[0]
    assert aug.shape == real.shape and not torch.equal(aug, real)
    kept = aug != 0
    if policy == "translation":  # moved, not altered: a zero pad or one of the image's own pixels
        for a, r in zip(aug, real):
            assert torch.isin(a[a != 0], r).all()
        assert (~kept).any()
    elif policy == "cutout":  # a square zeroed in each image, the rest untouched
        assert (~kept).flatten(1).any(1).all()
        assert torch.equal(aug[kept], real[kept])
    else:  # brightness, saturation and contrast move every pixel
        assert not torch.isin(aug, real).any()


def test_instance_noise_has_std_sigma_at_the_start_and_is_gone_at_the_end():
    real = batch(n=32, size=16)
    for step, std in ((0, 0.5), (5, 0.25), (10, 0.0)):
        task = gan(data={"image_size": 16}, batch_size=32, instance_noise=0.5)
        seen = inputs_of(task.d)
        run(task, real, step=step, total=10)
        noise = seen[0] - real
        if std == 0:
            assert torch.equal(seen[0], real)  # step == total: the batch itself
        else:
            assert noise.std().item() == pytest.approx(std, rel=0.1)
            assert abs(noise.mean().item()) < 0.1 * std


# --------------------------------------------------------------------------- the networks


def layers(d):
    return [m for m in d.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def test_spectral_norm_keeps_each_d_layers_largest_singular_value_at_one():
    def trained(sn):
        task = gan(model={"kind": "dcgan", "ngf": 4, "ndf": 4, "spectral_norm": sn}, data={"image_size": 32})
        with torch.no_grad():
            for layer in layers(task.d):  # sigma 5 to start: only the normalisation brings it to 1
                raw = layer.parametrizations.weight.original if sn == "d" else layer.weight
                raw.mul_(5.0 / torch.linalg.matrix_norm(raw.flatten(1), ord=2))
        for it in range(3):
            run(task, batch(size=32), it=it, step=it)
        return task.d.eval()

    def sigmas(d):
        with torch.no_grad():
            return [torch.linalg.matrix_norm(m.weight.flatten(1), ord=2).item() for m in layers(d)]

    d = trained("d")
    assert len(layers(d)) == 4 and all(parametrize.is_parametrized(m, "weight") for m in layers(d))
    assert sigmas(d) == pytest.approx([1.0] * 4, rel=0.03)
    plain = trained("none")
    assert not any(parametrize.is_parametrized(m) for m in layers(plain))
    assert max(sigmas(plain)) > 4.0


# --------------------------------------------------------------------------- the generator's average


def test_ema_blends_the_stepped_generator_with_the_beta_of_that_step():
    task = gan(ema_decay=0.9, optim_g={"lr": 0.01})
    with torch.no_grad():  # an average well away from G, so a wrong beta shows
        for p in task.ema.model.parameters():
            p.add_(1.0)
    old = [p.detach().clone() for p in task.ema.model.parameters()]
    run(task, batch(), it=0, step=100, total=200)
    beta = losses.ema_beta(0.9, 100, task.spec.train.ema_rampup)
    assert beta != pytest.approx(0.9, abs=0.01)  # ramped: the step's own beta, not the plain decay
    for e, o, p in zip(task.ema.model.parameters(), old, task.g.parameters(), strict=True):
        assert torch.allclose(e, beta * o + (1 - beta) * p.detach(), atol=1e-6)
