"""The CoDi objective (Algorithm 1, eq. 11-12) and the fine-tuning loss, checked against hand computations
with stand-in networks whose outputs are known."""

import pytest
import torch
from diffusers import DDIMScheduler

from cdd.runtime.diffusion.factory import scheduler_config
from cdd.runtime.diffusion.schedule import NoiseSchedule
from cdd.training.codi import (CoDiLoss, DiffusionLoss, boundary_scalings, changed_region_weight, distance, noise_removed,
                               training_grid)

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


def test_weighted_guidance_weighs_each_element_and_leaves_the_consistency_term(schedule, batch):
    x, c, text = batch
    w = torch.rand(B, 1, *SHAPE[-2:], generator=torch.Generator().manual_seed(8)) + 0.5
    student, target = Recorder(1), Recorder(2)
    terms = CoDiLoss(schedule, N=N, r=2.0)(student, target, None, x, c, text, torch.Generator().manual_seed(3), weight=w)
    torch.testing.assert_close(terms.parts["distillation"], ((student.eps_hat - target.eps_hat) ** 2).mean())
    torch.testing.assert_close(terms.parts["guidance"], (w * (student.x_hat - x) ** 2).mean())
    # with truncated SNR as well: both weights multiply the squared difference
    student, target = Recorder(1), Recorder(2)
    terms = CoDiLoss(schedule, N=N, cond_weighting="truncated-snr", same_t=False)(
        student, target, None, x, c, text, torch.Generator().manual_seed(6), weight=w)
    n, _ = draws(6, same_t=False)
    alpha_t, sigma_t = reference_alpha_sigma(n * (T // N) - 1)
    snr = torch.maximum(alpha_t**2 / sigma_t**2, torch.ones(()))
    torch.testing.assert_close(terms.parts["guidance"], (snr * w * (student.x_hat - x) ** 2).mean())


def test_truncated_snr_guidance_is_the_larger_of_the_x_and_eps_losses(schedule, batch):
    x, c, text = batch
    student, target = Recorder(1), Recorder(2)
    terms = CoDiLoss(schedule, N=N, r=2.0, cond_weighting="truncated-snr", same_t=False)(
        student, target, None, x, c, text, torch.Generator().manual_seed(6))  # n = 31, 12, 4
    n, _ = draws(6, same_t=False)
    alpha_t, sigma_t = reference_alpha_sigma(n * (T // N) - 1)
    weight = torch.maximum(alpha_t**2 / sigma_t**2, torch.ones(()))  # max(SNR_t, 1), per sample
    assert weight.max() > 1 and weight.min() >= 1
    guidance = (weight * (student.x_hat - x) ** 2).mean()
    torch.testing.assert_close(terms.parts["guidance"], guidance)
    # at a small t it is the eps-space loss: (alpha/sigma)^2 |x_hat - x|^2 = |eps_hat - eps|^2 for eps_hat from x_hat
    torch.testing.assert_close(terms.loss, terms.parts["distillation"] + 2.0 * guidance)
    with pytest.raises(ValueError, match="cond_weighting"):
        CoDiLoss(schedule, N=N, cond_weighting="snr")


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


def test_boundary_pair_targets_the_true_noise(schedule, batch):
    """n = 1: s = 0 and the eps-space target is the real eps of eq. 12, not the EMA network's eps_hat at s = 0."""
    x, c, text = batch
    loss = CoDiLoss(schedule, N=N)
    loss.sample_n = lambda batch, generator: torch.ones(batch, dtype=torch.long)  # n = 1
    student, target = Recorder(1), Recorder(2)
    terms = loss(student, target, None, x, c, text, torch.Generator().manual_seed(11))
    assert student.calls[0][1].tolist() == [T // N - 1] * B and target.calls[0][1].tolist() == [0] * B
    g = torch.Generator().manual_seed(11)
    eps = torch.randn(SHAPE, generator=g)
    torch.testing.assert_close(terms.parts["distillation"], ((student.eps_hat - eps) ** 2).mean())

    # per-sample n: only the samples at the boundary take the true noise, the others the EMA network's eps_hat
    loss = CoDiLoss(schedule, N=N, same_t=False)
    loss.sample_n = lambda batch, generator: torch.tensor([1, 2, 1])
    student, target = Recorder(1), Recorder(2)
    terms = loss(student, target, None, x, c, text, torch.Generator().manual_seed(11))
    expected = torch.stack([eps[0], target.eps_hat[1], eps[2]])
    torch.testing.assert_close(terms.parts["distillation"], ((student.eps_hat - expected) ** 2).mean())

    # the DDIM predictor's step uses eps_hat_t: at the boundary that is the target (no gradient from it)
    loss = CoDiLoss(schedule, N=N, prev_predictor="ddim")
    loss.sample_n = lambda batch, generator: torch.ones(batch, dtype=torch.long)
    terms = loss(Recorder(1), Recorder(2), None, x, c, text, torch.Generator().manual_seed(11))
    assert terms.parts["distillation"].item() == 0


def test_training_grid_holds_the_served_timesteps(schedule):
    grid = training_grid(48, T).tolist()
    assert len(grid) == 48 and grid == sorted(grid) and grid[-1] == 999 and grid[0] == 20
    for k in (1, 2, 3, 4):
        assert set(schedule.trailing_timesteps(k)) <= set(grid), k
    assert training_grid(50, T).tolist() == [20 * n - 1 for n in range(1, 51)]  # t = n T/N - 1 when N divides T
    assert not set(schedule.trailing_timesteps(4)) <= set(training_grid(50, T).tolist())  # 749, 249: never trained
    # the loss steps from t_n to t_(n-1) on that grid
    seen = []
    loss = CoDiLoss(schedule)  # the default N = 48
    for n in (1, 12, 36, 48):
        loss.sample_n = lambda batch, generator, n=n: torch.full((batch,), n)
        student, target = Recorder(1), Recorder(2)
        x = torch.zeros(SHAPE)
        loss(student, target, None, x, x, torch.zeros(B, 5, 8), torch.Generator())
        seen.append((student.calls[0][1][0].item(), target.calls[0][1][0].item()))
    assert seen == [(20, 0), (249, 228), (749, 728), (999, 978)]


def test_noise_removed_is_the_regression_on_the_added_noise(schedule, batch):
    x, c, text = batch
    eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    t = 99
    alpha, sigma = reference_alpha_sigma(torch.tensor([t]))
    other = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    other = other - (other * eps).sum() / (eps * eps).sum() * eps  # orthogonal to eps: does not count

    def keeps(p):  # x_hat = x + p (sigma/alpha) eps + (something uncorrelated with eps)
        return lambda z, t_, c_, text_: (x + p * (z - alpha * x) / alpha + 0.3 * other, None)

    for p in (0.0, 0.25, 1.0):
        assert noise_removed(keeps(p), x, c, text, t, eps, schedule) == pytest.approx(1 - p, abs=1e-5)
    assert noise_removed(keeps(1.0), x, c, text, t, eps, schedule) == pytest.approx(0.0, abs=1e-5)  # z_t / alpha_t


def test_consistency_in_x_space_uses_boundary_scalings(schedule, batch):
    x, c, text = batch
    student, target = Recorder(1), Recorder(2)
    terms = CoDiLoss(schedule, N=N, consistency_space="x")(student, target, None, x, c, text, torch.Generator().manual_seed(5))
    z_t, t, _, _ = student.calls[0]
    z_hat_s, s, _, _ = target.calls[0]

    def scalings(step):
        u = 10 * step.double()  # the integer timestep scaled by 10, as the public CoDi / LCM code
        return (0.25 / (u**2 + 0.25)).float().view(-1, 1, 1, 1), (u / (u**2 + 0.25).sqrt()).float().view(-1, 1, 1, 1)

    (cs_t, co_t), (cs_s, co_s) = scalings(t), scalings(s)
    expected = ((cs_t * z_t + co_t * student.x_hat - (cs_s * z_hat_s + co_s * target.x_hat)) ** 2).mean()
    torch.testing.assert_close(terms.parts["distillation"], expected)
    c_skip, c_out = boundary_scalings(torch.tensor([0, 1, 19, 999, -1]), x)
    assert c_skip[0].item() == 1 and c_out[0].item() == 0  # the boundary condition at t = 0
    assert c_skip[1].item() == pytest.approx(0.25 / 100.25) and c_out[1].item() == pytest.approx(10 / 100.25**0.5)
    assert c_skip[2].item() == pytest.approx(0.25 / (190**2 + 0.25)) and c_skip[2].item() < 1e-5
    assert c_skip[3].item() == pytest.approx(0.25 / (9990**2 + 0.25)) and c_out[3].item() == pytest.approx(1, abs=1e-8)
    assert c_skip[4].item() == 1 and c_out[4].item() == 0  # FINAL, past t = 0, is the boundary too


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

    # weighted: the same draws, each element's squared error times its weight
    w = torch.rand(B, 1, *SHAPE[-2:], generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(4)
    terms = DiffusionLoss(schedule)(native(out), None, None, x, c, text, g, weight=w)
    torch.testing.assert_close(terms.loss, (w * (out - schedule.target(x, eps, t)) ** 2).mean(), rtol=1e-4, atol=1e-5)


def test_changed_region_weight_by_hand():
    source = torch.zeros(3, 3, 4, 4)
    target = source.clone()
    target[0, 1, 0, 0] = 0.5  # image 0: one pixel of one channel changes (the top-left 2x2 cell once pooled)
    target[1, 2, 3, 3] = 0.05  # image 1: under the threshold, unchanged
    target[2] = 1.0  # image 2: everything changes (a time-of-day edit)
    w = changed_region_weight(target, source, (2, 2), weight=3.0)
    assert w.shape == (3, 1, 2, 2)
    # image 0: weights 4, 1, 1, 1 divided by their mean 7/4
    torch.testing.assert_close(w[0, 0], torch.tensor([[16 / 7, 4 / 7], [4 / 7, 4 / 7]]))
    torch.testing.assert_close(w[1], torch.ones(1, 2, 2))  # no change: the plain loss
    torch.testing.assert_close(w[2], torch.ones(1, 2, 2))  # all changed: the plain loss too
    assert changed_region_weight(target, source, (4, 4), weight=0.0).eq(1).all()


class TextTeacher:
    """A teacher whose prediction depends on the text: x_hat = a(text) z_t, eps_hat = b(text) z_t, with
    a = 1 + mean|text| and b = 2 - mean|text| per sample (the empty text, zeros, gives a = 1, b = 2)."""

    def __init__(self):
        self.calls = []

    def __call__(self, z_t, t, c, text):
        self.calls.append((z_t, t, c, text))
        m = text.abs().mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return (1 + m) * z_t, (2 - m) * z_t


@pytest.mark.parametrize("predictor", ["prev", "teacher"])
def test_guided_codi_steps_with_the_classifier_free_guided_teacher(schedule, batch, predictor):
    x, c, text = batch
    empty = torch.zeros(1, *text.shape[1:])
    seen_w = []
    student, target, teacher = Recorder(1), Recorder(2), TextTeacher()
    loss = CoDiLoss(schedule, N=N, prev_predictor=predictor, guidance=(0.5, 3.0), empty_text=empty,
                    set_w=lambda w: seen_w.append(None if w is None else w.clone()))
    loss(student, target, teacher, x, c, text, torch.Generator().manual_seed(7))
    # draws: n, eps, then w ~ U[0.5, 3] per sample
    g = torch.Generator().manual_seed(7)
    n = torch.randint(1, N + 1, (1,), generator=g).repeat(B)
    eps = torch.randn(SHAPE, generator=g)
    w = 0.5 + 2.5 * torch.rand(B, generator=g)
    assert len(seen_w) == 2 and torch.equal(seen_w[0], w) and seen_w[1] is None  # w set for student and theta^-, then cleared
    t = n * (T // N) - 1
    s = (t - T // N).clamp(min=0)
    alpha_t, sigma_t = reference_alpha_sigma(t)
    alpha_s, sigma_s = reference_alpha_sigma(s)
    z_t = alpha_t * x + sigma_t * eps
    # both branches in one call: the caption, then the empty text; the condition image goes to both
    (z_both, t_both, c_both, text_both), = teacher.calls
    torch.testing.assert_close(z_both, torch.cat([z_t, z_t]))
    assert torch.equal(t_both, torch.cat([t, t])) and torch.equal(c_both, torch.cat([c, c]))
    assert torch.equal(text_both, torch.cat([text, empty.expand(B, -1, -1)]))
    # by hand: (1 + w) f(text) - w f("") with f(text) = (1 + m) z_t, f("") = z_t for x; (2 - m) z_t and 2 z_t for eps
    m = text.abs().mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
    ww = w.reshape(-1, 1, 1, 1)
    x_w = (1 + ww) * (1 + m) * z_t - ww * z_t
    eps_w = (1 + ww) * (2 - m) * z_t - ww * 2 * z_t
    expected = alpha_s * x_w + sigma_s * (eps if predictor == "prev" else eps_w)
    torch.testing.assert_close(target.calls[0][0], expected)
    # eq. 11, its conditional term's target the data moved along the teacher's guidance direction (x at w = 0) ...
    student, target = Recorder(1), Recorder(2)
    terms = loss(student, target, TextTeacher(), x, c, text, torch.Generator().manual_seed(7))
    shift = ww * m * z_t  # w (x_c - x_u): x_c = (1 + m) z_t, x_u = z_t
    torch.testing.assert_close(terms.parts["guidance"], ((student.x_hat - (x + shift)) ** 2).mean())
    torch.testing.assert_close(terms.parts["distillation"], ((student.eps_hat - target.eps_hat) ** 2).mean())
    # ... or the data itself with guided_cond_term=False (the ablation)
    plain = CoDiLoss(schedule, N=N, prev_predictor=predictor, guidance=(0.5, 3.0), empty_text=empty,
                     set_w=lambda w: None, guided_cond_term=False)
    student = Recorder(1)
    terms = plain(student, Recorder(2), TextTeacher(), x, c, text, torch.Generator().manual_seed(7))
    torch.testing.assert_close(terms.parts["guidance"], ((student.x_hat - x) ** 2).mean())
    # ... or the guided teacher's own prediction moved along it, x_c + w (x_c - x_u) (guided_cond_target="teacher")
    own = CoDiLoss(schedule, N=N, prev_predictor=predictor, guidance=(0.5, 3.0), empty_text=empty,
                   set_w=lambda w: None, guided_cond_target="teacher")
    student = Recorder(1)
    terms = own(student, Recorder(2), TextTeacher(), x, c, text, torch.Generator().manual_seed(7))
    torch.testing.assert_close(terms.parts["guidance"], ((student.x_hat - x_w) ** 2).mean())
    with pytest.raises(ValueError, match="guided_cond_target 'mean' is not data or teacher"):
        CoDiLoss(schedule, N=N, guidance=(0.5, 3.0), empty_text=empty, set_w=lambda w: None, guided_cond_target="mean")


class ConditionTextTeacher(TextTeacher):
    """TextTeacher plus the condition image: x_hat = (1 + m + q) z_t with q = mean(c) per sample (0 when the
    condition is None); eps_hat as TextTeacher's. No adapter attribute: both_branches calls it with c = None for the
    backbone alone."""

    def __call__(self, z_t, t, c, text):
        self.calls.append((z_t, t, c, text))
        m = text.abs().mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        q = 0 if c is None else c.mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1)
        return (1 + m + q) * z_t, (2 - m) * z_t


def test_guided_codi_with_the_condition_dropped_from_the_unconditional_branch(schedule, batch):
    """guidance_unconditional text+condition: f(c, text) and the backbone alone with "" (c = None), two calls; the
    guidance then pushes along the condition with the empty prompt too, where the text-only guidance is zero."""
    x, c, text = batch
    c = c.abs() + 0.1  # q > 0
    empty = torch.zeros(1, *text.shape[1:])
    for prompt in (text, empty.expand(B, -1, -1)):
        student, target, teacher = Recorder(1), Recorder(2), ConditionTextTeacher()
        loss = CoDiLoss(schedule, N=N, guidance=(0.5, 3.0), empty_text=empty, set_w=lambda w: None,
                        unconditional="text+condition")
        terms = loss(student, target, teacher, x, c, prompt, torch.Generator().manual_seed(7))
        g = torch.Generator().manual_seed(7)
        n = torch.randint(1, N + 1, (1,), generator=g).repeat(B)
        eps = torch.randn(SHAPE, generator=g)
        ww = (0.5 + 2.5 * torch.rand(B, generator=g)).reshape(-1, 1, 1, 1)
        t = n * (T // N) - 1
        alpha_t, sigma_t = reference_alpha_sigma(t)
        z_t = alpha_t * x + sigma_t * eps
        (z1, t1, c1, text1), (z2, t2, c2, text2) = teacher.calls
        assert torch.equal(c1, c) and c2 is None and torch.equal(text1, prompt)
        assert torch.equal(text2, empty.expand(B, -1, -1)) and torch.equal(t1, t) and torch.equal(t2, t)
        m = prompt.abs().mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        q = c.mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1)
        shift = ww * (m + q) * z_t  # w (x_c - x_u): x_c = (1 + m + q) z_t, x_u = z_t
        torch.testing.assert_close(terms.parts["guidance"], ((student.x_hat - (x + shift)) ** 2).mean())
        s = (t - T // N).clamp(min=0)
        alpha_s, sigma_s = reference_alpha_sigma(s)
        torch.testing.assert_close(target.calls[0][0], alpha_s * (z_t * (1 + m + q) + shift) + sigma_s * eps)


def test_guided_codi_drops_the_condition_only_where_the_prompt_is_empty(schedule, batch):
    """text+condition-if-empty: the rows whose prompt is "" take the backbone alone as their unconditional branch
    (shift w q z_t, the condition's), the captioned rows the teacher with c and "" (shift w m z_t, the caption's)."""
    x, c, text = batch
    c = c.abs() + 0.1
    empty = torch.zeros(1, *text.shape[1:])
    prompt = text.clone()
    prompt[1] = 0  # the second sample's caption was dropped
    is_empty = torch.tensor([i == 1 for i in range(B)])
    student, teacher = Recorder(1), ConditionTextTeacher()
    loss = CoDiLoss(schedule, N=N, guidance=(0.5, 3.0), empty_text=empty, set_w=lambda w: None,
                    unconditional="text+condition-if-empty")
    terms = loss(student, Recorder(2), teacher, x, c, prompt, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    n = torch.randint(1, N + 1, (1,), generator=g).repeat(B)
    eps = torch.randn(SHAPE, generator=g)
    ww = (0.5 + 2.5 * torch.rand(B, generator=g)).reshape(-1, 1, 1, 1)
    alpha_t, sigma_t = reference_alpha_sigma(n * (T // N) - 1)
    z_t = alpha_t * x + sigma_t * eps
    (z1, _, c1, text1), (z2, _, c2, text2) = teacher.calls
    keep = ~is_empty
    torch.testing.assert_close(z1, torch.cat([z_t, z_t[keep]]))  # caption rows' "" branch batched with the caption
    assert torch.equal(c1, torch.cat([c, c[keep]])) and c2 is None and torch.equal(z2, z_t[is_empty])
    m = prompt.abs().mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
    q = c.mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1)
    shift = ww * torch.where(is_empty.reshape(-1, 1, 1, 1), q, m) * z_t
    torch.testing.assert_close(terms.parts["guidance"], ((student.x_hat - (x + shift)) ** 2).mean())
    with pytest.raises(ValueError, match="unconditional 'both' is not one of"):
        CoDiLoss(schedule, guidance=(0.0, 2.0), empty_text=empty, set_w=print, unconditional="both")


def test_guided_codi_needs_its_inputs(schedule):
    with pytest.raises(ValueError, match="empty_text"):
        CoDiLoss(schedule, guidance=(0.0, 2.0))
    with pytest.raises(ValueError, match="not ddim"):
        CoDiLoss(schedule, guidance=(0.0, 2.0), prev_predictor="ddim", empty_text=torch.zeros(1, 2, 3), set_w=print)
