"""The CoDi objective (Algorithm 1, eq. 11-12) and the fine-tuning loss, checked against hand computations
with stand-in networks whose outputs are known."""

import pytest
import torch
from diffusers import DDIMScheduler

from cdd.runtime.factory import scheduler_config
from cdd.runtime.schedule import NoiseSchedule
from cdd.training.codi import CoDiLoss, DiffusionLoss, boundary_scalings, distance

T, N, B = 1000, 50, 3
SHAPE = (B, 3, 4, 4)


def reference_alpha_sigma(t):
    """alpha_t, sigma_t straight from diffusers' alphas_cumprod (independent of NoiseSchedule)."""
    abar = DDIMScheduler.from_config(scheduler_config("epsilon")).alphas_cumprod.double()[torch.as_tensor(t)]
    return abar.sqrt().float().view(-1, 1, 1, 1), (1 - abar).sqrt().float().view(-1, 1, 1, 1)


class Recorder:
    """A stand-in network: returns fixed (x_hat, eps_hat) (scaled by a learnable weight) and records its inputs."""

    def __init__(self, seed, weight=None):
        g = torch.Generator().manual_seed(seed)
        self.x_hat, self.eps_hat = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        self.weight = weight
        self.calls = []

    def __call__(self, z, t, c, text):
        self.calls.append((z, torch.as_tensor(t).clone(), c, text))
        w = self.weight if self.weight is not None else 1.0
        return self.x_hat * w, self.eps_hat * w


@pytest.fixture
def schedule():
    return NoiseSchedule.from_scheduler_config(scheduler_config("epsilon"))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(123)
    return torch.randn(SHAPE, generator=g), torch.rand(SHAPE, generator=g), torch.randn(B, 5, 8, generator=g)


def draws(seed, same_t=True):
    """What CoDiLoss draws from a generator seeded with `seed`: n first, then eps (documented order)."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(1, N + 1, (1 if same_t else B,), generator=g)
    eps = torch.randn(SHAPE, generator=g)
    return (n.repeat(B) if same_t else n), eps


def test_z_hat_s_is_eq_12_with_the_same_noise(schedule, batch):
    x, c, text = batch
    student, ema_target = Recorder(1, weight=torch.ones((), requires_grad=True)), Recorder(2)
    loss = CoDiLoss(schedule, N=N)
    loss(student, ema_target, None, x, c, text, torch.Generator().manual_seed(7))
    n, eps = draws(7)
    t = n * (T // N) - 1
    s = (t - T // N).clamp(min=0)
    alpha_t, sigma_t = reference_alpha_sigma(t)
    alpha_s, sigma_s = reference_alpha_sigma(s)
    z_t, t_seen, c_seen, text_seen = student.calls[0]
    z_hat_s, s_seen, _, _ = ema_target.calls[0]
    assert torch.equal(t_seen, t) and torch.equal(s_seen, s)
    assert c_seen is c and text_seen is text
    torch.testing.assert_close(z_t, alpha_t * x + sigma_t * eps)  # eq. 1
    torch.testing.assert_close(z_hat_s, alpha_s * student.x_hat + sigma_s * eps)  # eq. 12: the SAME eps
    assert not z_hat_s.requires_grad  # sg(x_hat_t)


def test_ddim_and_teacher_predictors(schedule, batch):
    x, c, text = batch
    student, target, teacher = Recorder(1), Recorder(2), Recorder(3)
    CoDiLoss(schedule, N=N, prev_predictor="ddim")(student, target, None, x, c, text, torch.Generator().manual_seed(7))
    n, _ = draws(7)
    s = (n * (T // N) - 1 - T // N).clamp(min=0)
    alpha_s, sigma_s = reference_alpha_sigma(s)
    torch.testing.assert_close(target.calls[0][0], alpha_s * student.x_hat + sigma_s * student.eps_hat)

    student, target = Recorder(1), Recorder(2)
    CoDiLoss(schedule, N=N, prev_predictor="teacher")(student, target, teacher, x, c, text, torch.Generator().manual_seed(7))
    z_t, t, _, _ = student.calls[0]
    assert torch.equal(teacher.calls[0][0], z_t) and torch.equal(teacher.calls[0][1], t)  # the teacher steps from z_t
    torch.testing.assert_close(target.calls[0][0], alpha_s * teacher.x_hat + sigma_s * teacher.eps_hat)


def test_loss_is_eq_11(schedule, batch):
    x, c, text = batch
    for r in (1.0, 0.0, 2.5):
        student, target = Recorder(1), Recorder(2)
        terms = CoDiLoss(schedule, N=N, r=r)(student, target, None, x, c, text, torch.Generator().manual_seed(3))
        distill = ((student.eps_hat - target.eps_hat) ** 2).mean()
        guidance = ((student.x_hat - x) ** 2).mean()
        torch.testing.assert_close(terms.loss, distill + r * guidance)
        torch.testing.assert_close(terms.parts["distillation"], distill)
        torch.testing.assert_close(terms.parts["guidance"], guidance)


def test_gradient_flows_only_through_the_student(schedule, batch):
    x, c, text = batch
    w_student, w_target = torch.ones((), requires_grad=True), torch.ones((), requires_grad=True)
    terms = CoDiLoss(schedule, N=N)(Recorder(1, w_student), Recorder(2, w_target), None, x, c, text, torch.Generator())
    terms.loss.backward()
    assert w_student.grad is not None and w_student.grad != 0
    assert w_target.grad is None  # the EMA target runs under no_grad


def test_one_t_per_batch_by_default_and_per_sample_with_the_flag(schedule, batch):
    x, c, text = batch
    for same_t in (True, False):
        student = Recorder(1)
        loss = CoDiLoss(schedule, N=N, same_t=same_t)
        g = torch.Generator().manual_seed(0)
        for _ in range(20):
            loss(student, Recorder(2), None, x, c, text, g)
        ts = torch.stack([call[1] for call in student.calls])  # [calls, B]
        assert ((ts + 1) % (T // N) == 0).all() and ts.min() >= T // N - 1 and ts.max() <= T - 1  # t = n T/N - 1
        rows_constant = (ts == ts[:, :1]).all(dim=1)
        if same_t:
            assert rows_constant.all()
            assert len(set(ts[:, 0].tolist())) > 1  # but it varies between batches
        else:
            assert not rows_constant.all()


def test_s_is_clamped_at_zero(schedule, batch):
    x, c, text = batch
    loss = CoDiLoss(schedule, N=N)
    loss.sample_n = lambda batch, generator: torch.ones(batch, dtype=torch.long)  # n = 1
    student, target = Recorder(1), Recorder(2)
    loss(student, target, None, x, c, text, torch.Generator())
    assert student.calls[0][1].tolist() == [T // N - 1] * B and target.calls[0][1].tolist() == [0] * B


def test_consistency_in_x_space_uses_boundary_scalings(schedule, batch):
    x, c, text = batch
    student, target = Recorder(1), Recorder(2)
    terms = CoDiLoss(schedule, N=N, consistency_space="x")(student, target, None, x, c, text, torch.Generator().manual_seed(5))
    z_t, t, _, _ = student.calls[0]
    z_hat_s, s, _, _ = target.calls[0]

    def scalings(step):
        u = 10 * step.double() / T  # continuous time t' = t / T, scaled by 10
        return (0.25 / (u**2 + 0.25)).float().view(-1, 1, 1, 1), (u / (u**2 + 0.25).sqrt()).float().view(-1, 1, 1, 1)

    (cs_t, co_t), (cs_s, co_s) = scalings(t), scalings(s)
    expected = ((cs_t * z_t + co_t * student.x_hat - (cs_s * z_hat_s + co_s * target.x_hat)) ** 2).mean()
    torch.testing.assert_close(terms.parts["distillation"], expected)
    c_skip, c_out = boundary_scalings(torch.tensor([0, 999]), T, x)
    assert c_skip[0].item() == 1 and c_out[0].item() == 0  # the boundary condition at t = 0
    assert c_skip[1].item() == pytest.approx(0.25 / (9.99**2 + 0.25)) and c_out[1].item() == pytest.approx(9.99 / (9.99**2 + 0.25) ** 0.5)


def test_distances():
    a, b = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([0.5, 1.0, 1.0])
    assert distance("l2")(a, b).item() == pytest.approx((0.25 + 0 + 9) / 3)
    c = 0.1
    expected = sum(((d**2 + c**2) ** 0.5 - c) for d in (0.5, 0.0, 3.0)) / 3
    assert distance("huber", c)(a, b).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="unknown distance"):
        distance("l1")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_finetune_loss_is_the_native_diffusion_loss(prediction_type, batch):
    schedule = NoiseSchedule.from_scheduler_config(scheduler_config(prediction_type))
    x, c, text = batch
    seen = {}

    def oracle(z, t, c_, text_):  # knows x: predicts it exactly, so the loss must vanish
        seen["t"] = t
        alpha, sigma = schedule.alpha_sigma(t, z)
        return x, (z - alpha * x) / sigma

    terms = DiffusionLoss(schedule)(oracle, None, None, x, c, text, torch.Generator().manual_seed(0))
    assert terms.loss.item() < 1e-8
    assert seen["t"].shape == (B,) and seen["t"].min() >= 0 and seen["t"].max() < T

    def native(out):  # a network whose raw output is `out` everywhere
        return lambda z, t, c_, text_: schedule.to_x_eps(out, z, t)

    out = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(4)
    terms = DiffusionLoss(schedule)(native(out), None, None, x, c, text, g)
    g = torch.Generator().manual_seed(4)
    t = torch.randint(0, T, (B,), generator=g)
    eps = torch.randn(SHAPE, generator=g)
    torch.testing.assert_close(terms.loss, ((out - schedule.target(x, eps, t)) ** 2).mean(), rtol=1e-4, atol=1e-5)
