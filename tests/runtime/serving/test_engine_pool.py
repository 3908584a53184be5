"""The adapter pool (residency, live slots, in-place swaps, backbone LoRA) and the executor's batching."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cdd.adapters.architectures import add_backbone_lora, backbone_lora_name, backbone_lora_state, build_adapter
from cdd.adapters.zoo import ADAPTER_FILE, ZooError, save_entry
from cdd.runtime.serving.engine import Engine, EngineError
from cdd.runtime.serving.executor import Batch, CachedSchedule
from cdd.runtime.diffusion.factory import make_backbone, save_backbone
from cdd.runtime.serving.imaging import to_uint8
from cdd.runtime.serving.metrics import Metrics
from cdd.runtime.serving.pool import AdapterConflict, AdapterGone, AdapterPool
from cdd.runtime.diffusion.samplers import initial_noise
from cdd.runtime.serving.settings import ServeSettings
from cdd.runtime.serving.tasks import check_strength, prepare

RES = 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def perturb(module, std, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def lora_of(bb, seed):
    unet = copy.deepcopy(bb.unet)
    cfg = add_backbone_lora(unet, "trained", rank=2)
    perturb(unet, 0.05, seed)
    return ({"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules)},
            backbone_lora_state(unet, "trained"))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    bb = make_backbone("latent", resolution=RES, seed=21)
    save_backbone(bb, root / "backbone")

    def entry(name, kind, seed, task="depth", **kw):
        adapter = perturb(build_adapter(kind, bb.unet, bb.vae_scale_factor), 0.03, seed)
        save_entry(root / "zoo" / name, adapter, name=name, task=task, backbone_fingerprint=bb.fingerprint,
                   condition={"channels": 3, "range": [0, 1], "resolution": RES}, **kw)
        return root / "zoo" / name

    paths = {
        "a": entry("a", "controlnet", 1),
        "b": entry("b", "controlnet", 2),
        "c": entry("c", "controlnet", 3),
        "t": entry("t", "t2i", 4),
        "lora": entry("lora", "controlnet", 5, mode="lora", backbone_lora=lora_of(bb, 6)),
        "cl": entry("cl", "controlnet-lora", 7),
        "g": entry("g", "controlnet-guided", 8, steps=16, sampler="gd"),
    }
    return root, paths


def fresh_backbone(root):
    from cdd.runtime.diffusion.backbone import load_backbone

    return load_backbone(root / "backbone")


def test_one_live_slot_per_architecture_and_swaps_copy_in_place(zoo):
    root, paths = zoo
    metrics = Metrics()
    pool = AdapterPool(fresh_backbone(root), budget_bytes=1 << 30, metrics=metrics)
    for name in ("a", "b", "t"):
        pool.register(paths[name])
    slot, _ = pool.activate("a")
    ptrs = slot.data_ptrs()
    stored = load_file(paths["a"] / ADAPTER_FILE)
    for name in ("b", "a", "t", "b", "a"):
        s, reg = pool.activate(name)
        assert s.key == reg.architecture
    assert len(pool.slots()) == 2  # controlnet and t2i
    assert slot.data_ptrs() == ptrs  # the same storage after every swap
    for k, v in stored.items():
        assert torch.equal(slot.tensors[k], v), k  # A's weights exactly, after A, B, A
    assert metrics.adapter_swaps._value.get() == 6  # a, b, a, b, a into the controlnet slot; t into its own
    pool.activate("a")
    assert metrics.adapter_swaps._value.get() == 6  # already live: no copy


def test_memory_budget_evicts_least_recently_used(zoo):
    root, paths = zoo
    metrics = Metrics()
    pool = AdapterPool(fresh_backbone(root), budget_bytes=1 << 30, metrics=metrics)
    for name in ("a", "b", "c"):
        pool.register(paths[name])
    pool.activate("a")
    one = pool.resident_bytes()
    pool.budget_bytes = int(2.5 * one)
    pool.activate("b")
    pool.activate("a")  # a is now more recent than b
    pool.activate("c")
    assert pool.resident_names() == ["a", "c"] and pool.resident_bytes() <= pool.budget_bytes
    assert metrics.adapter_evictions._value.get() == 1 and metrics.resident_adapters._value.get() == 2
    slot, _ = pool.activate("b")  # loaded again from the zoo
    for k, v in load_file(paths["b"] / ADAPTER_FILE).items():
        assert torch.equal(slot.tensors[k], v)
    pool.budget_bytes = 0
    pool.activate("a")
    assert pool.resident_names() == ["a"]  # one adapter over the budget still serves


def test_backbone_lora_is_switched_on_the_shared_unet_and_dropped_on_eviction(zoo):
    root, paths = zoo
    bb = fresh_backbone(root)
    dropped = []
    pool = AdapterPool(bb, budget_bytes=1 << 30, on_lora_dropped=dropped.append)
    for name in ("a", "lora", "cl"):
        pool.register(paths[name])
    name = backbone_lora_name("lora")
    x = torch.randn(1, 4, RES // 2, RES // 2, generator=torch.Generator().manual_seed(0))
    text = bb.encode_text([""])
    with torch.no_grad():
        plain = bb.unet(x, 500, text).sample
        pool.activate("lora")
        layers = [m for m in bb.unet.modules() if hasattr(m, "lora_A") and name in m.lora_A]
        assert layers and all(m.active_adapters == [name] and not m.disable_adapters for m in layers)
        with_lora = bb.unet(x, 500, text).sample
        pool.activate("cl")  # a LoRA-ControlNet slot built while the UNet carries LoRA layers
        assert all(m.disable_adapters for m in layers)
        assert torch.equal(bb.unet(x, 500, text).sample, plain)
    assert not torch.allclose(with_lora, plain)
    pool.unregister("lora")
    assert dropped == [name]
    assert not any(name in m.lora_A for m in bb.unet.modules() if hasattr(m, "lora_A"))


def test_register_refuses_what_cannot_be_served(zoo, tmp_path):
    root, paths = zoo
    bb = fresh_backbone(root)
    pool = AdapterPool(bb, budget_bytes=1 << 30)
    pool.register(paths["a"])
    with pytest.raises(AdapterConflict, match="already registered"):
        pool.register(paths["a"])
    with pytest.raises(AdapterGone):
        pool.unregister("nope")
    adapter = build_adapter("controlnet", bb.unet, bb.vae_scale_factor)
    common = dict(task="depth", backbone_fingerprint=bb.fingerprint)
    cond = {"channels": 3, "range": [0, 1], "resolution": RES}
    save_entry(tmp_path / "full", adapter, name="full", condition=cond, mode="full", unet_state=bb.unet.state_dict(), **common)
    save_entry(tmp_path / "many", adapter, name="many", condition=cond, steps=65, **common)
    save_entry(tmp_path / "odd", adapter, name="odd", condition={**cond, "resolution": 18}, **common)
    for name, match in (("full", "mode 'full'"), ("many", "1-64 steps"), ("odd", "multiple of 4")):
        with pytest.raises(ZooError, match=match):
            pool.register(tmp_path / name)


def test_a_guided_distillation_stage_one_entry_with_16_steps_registers_and_serves(zoo):
    """A gd stage-1 student is sampled with 16 steps: its entry must not make registration (and so
    Engine.start, which registers the whole zoo) refuse."""
    root, paths = zoo
    engine = Engine(ServeSettings(backbone=root / "backbone", zoo=root / "zoo", max_batch=2, warmup=False)).start()
    try:
        reg = engine.pool.get("g")
        assert (reg.manifest.steps, reg.manifest.sampler) == (16, "gd")
        work = engine.prepare(reg, torch.rand(3, RES, RES), steps=reg.manifest.steps, sampler="gd", seed=1, prompt="")
        rows = engine.run(work, timeout=300).rows
        assert rows.shape == (1, 3, RES, RES) and torch.isfinite(rows).all()
    finally:
        engine.stop()


def test_guided_adapter_keeps_its_guidance_on_the_device_in_float32(zoo):
    """The gd adapter's default w is a buffer that moves with the module (no host tensor is built inside a
    forward, which a CUDA graph capture refuses), stays float32 under `.to(bfloat16)`, and is not stored."""
    root, _ = zoo
    bb = fresh_backbone(root)
    adapter = build_adapter("controlnet-guided", bb.unet, bb.vae_scale_factor, guidance=2.7)
    assert "w_default" not in adapter.state_dict() and "w_default" in dict(adapter.named_buffers())
    adapter.to(torch.bfloat16)
    assert adapter.w_default.dtype == torch.float32 and adapter.w_default.item() == pytest.approx(2.7)
    adapter.float()
    z = torch.randn(2, 4, RES // 2, RES // 2)
    t = torch.full((2,), 999)
    text = bb.encode_text(["", ""])
    cond = torch.rand(2, 3, RES, RES)
    with torch.no_grad():
        default = adapter.unet_kwargs(bb.unet, z, t, text, cond)
        adapter.set_guidance(2.7)
        given = adapter.unet_kwargs(bb.unet, z, t, text, cond)
    for a, b in zip(default["down_block_additional_residuals"], given["down_block_additional_residuals"]):
        assert torch.equal(a, b)


def test_architecture_key_ignores_diffusers_bookkeeping(zoo):
    """Entries of one architecture share a live slot even when diffusers' `_use_default_values` (or another
    `_` key) differs; a real difference in the config still separates them."""
    from types import SimpleNamespace

    from cdd.runtime.serving.pool import architecture_key

    root, paths = zoo
    bb = fresh_backbone(root)
    config = build_adapter("controlnet", bb.unet, bb.vae_scale_factor).config()
    one = copy.deepcopy(config)
    one["controlnet"]["_use_default_values"] = ["global_pool_conditions", "addition_embed_type_num_heads"]
    two = copy.deepcopy(config)
    two["controlnet"]["_use_default_values"] = ["addition_embed_type_num_heads", "global_pool_conditions"]
    two["controlnet"]["_diffusers_version"] = "0.0.1"
    other = copy.deepcopy(config)
    other["controlnet"]["conditioning_channels"] = 1
    key = lambda c: architecture_key(SimpleNamespace(kind="controlnet", architecture=c))  # noqa: E731
    assert key(one) == key(two) != key(other)


def test_shipped_controlnets_share_one_slot():
    """edit and super-resolution of the embedded zoo are one ControlNet architecture: one slot; depth, a
    controlnet-guided entry (the same ControlNet plus a w branch), has a slot of its own."""
    from cdd.adapters.zoo import Manifest, default_zoo_dir
    from cdd.runtime.serving.pool import architecture_key

    keys = {name: architecture_key(Manifest.from_file(default_zoo_dir() / name / "manifest.json"))
            for name in ("depth", "edit", "super-resolution")}
    assert keys["edit"] == keys["super-resolution"] != keys["depth"], keys
    assert keys["depth"].startswith("controlnet-guided:"), keys


@pytest.mark.parametrize("device, exact, expected", [
    ("cpu", False, (1, 2, 3, 4, 5, 6)), ("cuda", False, (1, 2, 4, 6)), ("cpu", True, (6,)), ("cuda", True, (6,)),
])
def test_batch_buckets_fit_the_device(device, exact, expected):
    """On a CPU every size is its own bucket (a lone request is not padded); on CUDA powers of two (each a
    captured graph); exact batching: max_batch only."""
    assert ServeSettings(device=device, max_batch=6, exact_batching=exact).batch_buckets() == expected


def test_engine_start_names_missing_folders(tmp_path, zoo):
    root, _ = zoo
    with pytest.raises(EngineError, match=str(tmp_path / "no-backbone")):
        Engine(ServeSettings(backbone=tmp_path / "no-backbone", zoo=tmp_path)).start()
    with pytest.raises(EngineError, match=str(tmp_path / "no-zoo")):
        Engine(ServeSettings(backbone=root / "backbone", zoo=tmp_path / "no-zoo")).start()


def test_cached_schedule_gives_the_schedule_numbers():
    bb = make_backbone("pixel", resolution=RES, seed=0)
    cached = CachedSchedule.of(bb.schedule)
    like = torch.zeros(3, 4, 5, 5)
    for t in (999, 749, 0, -1):
        for a, b in zip(cached.alpha_sigma(t, like), bb.schedule.alpha_sigma(torch.full((3,), t), like)):
            assert torch.equal(a.expand_as(b), b)
    assert cached.alpha_sigma(999, like)[0] is cached.alpha_sigma(999, like)[0]


def test_a_row_gives_the_same_bytes_alone_or_in_any_batch(zoo):
    """Exact batching: every batch runs at max_batch rows, so a row's result cannot depend on its company."""
    root, paths = zoo
    engine = Engine(ServeSettings(backbone=root / "backbone", zoo=root / "zoo", max_batch=4, warmup=False,
                                  exact_batching=True)).start()
    try:
        bb = engine.backbone
        slot, reg = engine.pool.activate("t")
        g = torch.Generator().manual_seed(1)
        n = 6
        cond = torch.rand(n, 3, RES, RES, generator=g)
        z_T = initial_noise(range(100, 100 + n), (4, RES // 2, RES // 2))
        text = torch.cat([bb.encode_text([p]) for p in ["a red sphere", "", "night", "a cube", "make it red", "blue"]])

        def run(idx):
            batch = Batch(z_T[idx], cond[idx], text[idx], None, 2, "prev")
            return to_uint8(engine.executor.run(slot, reg, batch))

        alone = [run([i])[0] for i in range(n)]
        for idx in ([0, 1], [1, 0], [2, 2, 2], [5, 4, 3, 2, 1, 0], [3, 0, 1]):
            together = run(idx)
            for row, i in zip(together, idx):
                np.testing.assert_array_equal(row, alone[i])
    finally:
        engine.stop()


def test_engine_drains_admitted_work_on_stop(zoo):
    root, _ = zoo
    engine = Engine(ServeSettings(backbone=root / "backbone", zoo=root / "zoo", max_batch=2, warmup=False)).start()
    reg = engine.pool.get("a")
    engine.pause()
    jobs = [engine.submit(engine.prepare(reg, torch.rand(3, RES, RES), steps=1, sampler="prev", seed=s, prompt=""))
            for s in range(3)]
    engine.stop()
    assert all(j.future.result(timeout=0).rows.shape == (1, 3, RES, RES) for j in jobs)
    assert not engine._thread.is_alive()


def _mixed_works(engine):
    """Requests of every kind in the zoo: adapters of four architectures (one with a backbone LoRA), steps
    1/2/4/16, every sampler, a non-square output, and a super-resolution request of four tiles."""
    g = torch.Generator().manual_seed(5)
    works = []
    for name, steps, sampler, seed, prompt, size in (
        ("a", 1, "ddim", 11, "a red sphere", None), ("b", 4, "cm", 12, "", None), ("t", 2, "prev", 13, "night", None),
        ("cl", 4, "ddim", 14, "a cube", None), ("lora", 2, "prev", 15, "blue", None), ("g", 2, "gd", 16, "", None),
        ("a", 2, "ddim", 18, "wide", (24, 16)),
    ):
        width, height = size or (None, None)
        works.append(engine.prepare(engine.pool.get(name), torch.rand(3, RES, RES, generator=g), steps=steps,
                                    sampler=sampler, seed=seed, prompt=prompt, width=width, height=height))
    works.append(prepare("super-resolution", torch.rand(3, 6, 6, generator=g), adapter="c", resolution=RES,
                         model_channels=4, scale_factor=2, steps=2, sampler="ddim", seed=17, prompt=""))
    assert works[-2].size == (16, 24) and works[-1].rows == 4
    return works


def test_a_request_gives_the_same_image_alone_and_inside_mixed_traffic(zoo):
    """Step-level batching: a request's image does not depend on what else is in flight, and equals what the
    per-adapter batching (the whole loop of one adapter's batch) gives; the backbone runs once per step for
    every row in flight, so mixed traffic takes far fewer backbone calls than the same requests one by one."""
    root, _ = zoo
    common = dict(backbone=root / "backbone", zoo=root / "zoo", max_batch=8, warmup=False)
    engine = Engine(ServeSettings(batching="step", **common)).start()
    old = Engine(ServeSettings(batching="request", **common)).start()
    calls = []
    hook = engine.backbone.unet.register_forward_pre_hook(lambda m, args: calls.append(1))
    try:
        works = _mixed_works(engine)
        alone = [engine.run(w, timeout=300) for w in works]
        alone_calls = len(calls)
        assert [r.batch_rows for r in alone] == [w.rows for w in works]  # each ran alone
        engine.pause()
        jobs = [engine.submit(w) for w in works]
        engine.resume()
        mixed = [j.future.result(timeout=600) for j in jobs]
        # a, b, t, cl and g (four architectures, four samplers) shared their first backbone call; the
        # super-resolution tiles joined b's and cl's later steps once enough rows were free
        assert mixed[0].batch_rows == 5 and mixed[-1].batch_rows == 6
        assert len(calls) - alone_calls < alone_calls / 2
        for w, a, m in zip(works, alone, mixed):
            assert m.rows.shape == a.rows.shape == (w.rows, 3, *w.size)
            assert (m.rows - a.rows).abs().max() < 1e-4, w.adapter
            ref = old.run(w, timeout=300).rows
            assert (ref - a.rows).abs().max() < 1e-4, w.adapter
    finally:
        hook.remove()
        engine.stop()
        old.stop()


def test_step_level_batching_keeps_the_sampler_state_in_float32(zoo):
    """bf16 weights: the sample and the schedule maths stay float32 and only the network inputs are cast."""
    root, _ = zoo
    engine = Engine(ServeSettings(backbone=root / "backbone", zoo=root / "zoo", max_batch=2, warmup=False,
                                  dtype="bfloat16")).start()
    try:
        reg = engine.pool.get("a")
        work = engine.prepare(reg, torch.rand(3, RES, RES), steps=2, sampler="ddim", seed=3, prompt="")
        flight = engine.executor.board(None, reg, z_T=work.z_T, cond=work.cond, text_emb=engine.backbone.encode_text([""]),
                                       fresh=None, steps=2, sampler="ddim")
        assert flight.z.dtype == torch.float32 and flight.cond.dtype == torch.bfloat16
        engine.executor.evaluate(engine.pool, [flight])
        assert flight.z.dtype == torch.float32 and flight.i == 1
        out = engine.run(work, timeout=300).rows
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
    finally:
        engine.stop()


def test_adapters_in_flight_together_over_a_tight_memory_budget(zoo):
    """Several adapters in flight share evaluations even when the budget holds one of them at a time: each
    evaluation makes each resident again (LRU) before it computes its rows, and the images do not change."""
    root, _ = zoo
    engine = Engine(ServeSettings(backbone=root / "backbone", zoo=root / "zoo", max_batch=4, warmup=False,
                                  memory_budget_mb=0, batching="step")).start()
    try:
        g = torch.Generator().manual_seed(9)
        works = [engine.prepare(engine.pool.get(name), torch.rand(3, RES, RES, generator=g), steps=2, sampler="ddim",
                                seed=i, prompt="") for i, name in enumerate(("a", "t"))]
        alone = [engine.run(w, timeout=300).rows for w in works]
        evictions = engine.metrics.adapter_evictions._value.get()
        engine.pause()
        jobs = [engine.submit(w) for w in works]
        engine.resume()
        for job, ref in zip(jobs, alone):
            result = job.future.result(timeout=300)
            assert result.batch_rows == 2 and (result.rows - ref).abs().max() < 1e-4
        assert engine.metrics.adapter_evictions._value.get() >= evictions + 4  # two evaluations, two adapters
        assert len(engine.pool.resident_names()) == 1
    finally:
        engine.stop()


@contextlib.contextmanager
def both_batching_modes(zoo):
    """A step-level and a per-adapter batching engine on the test zoo, stopped afterwards."""
    root, _ = zoo
    common = dict(backbone=root / "backbone", zoo=root / "zoo", max_batch=8, warmup=False)
    step = Engine(ServeSettings(batching="step", **common)).start()
    batch = Engine(ServeSettings(batching="request", **common)).start()
    try:
        yield step, batch
    finally:
        step.stop()
        batch.stop()


def sr_work(image, sampler):
    """A 2-step super-resolution request for entry "c" of the test zoo, seed 3, no prompt."""
    return prepare("super-resolution", image, adapter="c", resolution=RES, model_channels=4, scale_factor=2,
                   steps=2, sampler=sampler, seed=3, prompt="")


def test_ilvr_super_resolution_serves_as_the_library_sampler_in_both_batching_modes(zoo):
    """`prev+ilvr` (super-resolution): each x_hat keeps the input's low frequencies. On a latent backbone a
    one-tile request equals the library's `samplers.ilvr` around the same denoiser (decode, correct, encode);
    step-level and per-adapter batching agree on a four-tile request; and ILVR changes the image."""
    from cdd.runtime.diffusion import samplers

    with both_batching_modes(zoo) as (step, batch):
        g = torch.Generator().manual_seed(9)
        one, four = torch.rand(3, RES // 4, RES // 4, generator=g), torch.rand(3, 6, 6, generator=g)
        w = sr_work(one, "prev+ilvr")
        assert w.rows == 1
        got = step.run(w, timeout=300).rows
        bb = step.backbone
        slot, _ = step.pool.activate("c")
        with torch.no_grad():
            bound = slot.denoiser.bind(w.cond, bb.encode_text([""]))
            model = samplers.ilvr(bound, w.cond * 2 - 1, 4, to_pixels=bb.from_model_space, to_model=bb.to_model_space)
            z_0 = samplers.sample_prev(model, w.z_T, bb.schedule.trailing_timesteps(2), bb.schedule)
            low = samplers.LowPass(RES, RES, 4)
            x = samplers.ilvr_output(bb.from_model_space(z_0), low(w.cond * 2 - 1), low)  # the decoded output's update
            want = (x * 0.5 + 0.5).clamp(0, 1)
        assert (got - want).abs().max() < 1e-4
        plain = step.run(sr_work(one, "prev"), timeout=300).rows
        assert (plain - got).abs().max() > 1e-2

        w4 = sr_work(four, "cm+ilvr")  # a stochastic sampler: its fresh noise is drawn for the base sampler
        assert w4.rows == 4 and w4.fresh is not None
        a, b = step.run(w4, timeout=300).rows, batch.run(w4, timeout=300).rows
        assert (a - b).abs().max() < 1e-4


def test_ilvr_out_corrects_only_the_decoded_output_in_both_batching_modes(zoo):
    """`prev+ilvr-out` (super-resolution): the plain sampler, then ILVR's update on the decoded output only. A
    request equals `samplers.ilvr_output` on the library's plain sample, makes no VAE encode (no round trip per
    step), and step-level and per-adapter batching agree on a four-tile request."""
    from cdd.runtime.diffusion import samplers

    with both_batching_modes(zoo) as (step, batch):
        g = torch.Generator().manual_seed(5)
        one, four = torch.rand(3, RES // 4, RES // 4, generator=g), torch.rand(3, 6, 6, generator=g)
        w = sr_work(one, "prev+ilvr-out")
        encodes = []
        for engine in (step, batch):
            encode = engine.backbone.vae.encode
            engine.backbone.vae.encode = lambda *a, _e=encode, **k: (encodes.append(1), _e(*a, **k))[1]
        got = step.run(w, timeout=300).rows
        assert (got - batch.run(w, timeout=300).rows).abs().max() < 1e-4
        assert encodes == []
        bb = step.backbone
        slot, _ = step.pool.activate("c")
        with torch.no_grad():
            bound = slot.denoiser.bind(w.cond, bb.encode_text([""]))
            z_0 = samplers.sample_prev(bound, w.z_T, bb.schedule.trailing_timesteps(2), bb.schedule)
            low = samplers.LowPass(RES, RES, 4)
            want = (samplers.ilvr_output(bb.from_model_space(z_0), low(w.cond * 2 - 1), low) * 0.5 + 0.5).clamp(0, 1)
            plain = (bb.from_model_space(z_0) * 0.5 + 0.5).clamp(0, 1)
        assert (got - want).abs().max() < 1e-4
        assert (got - plain).abs().max() > 1e-2  # the update changed the output
        every = step.run(sr_work(one, "prev+ilvr"), timeout=300).rows
        assert (got - every).abs().max() > 1e-3  # and it is not ILVR at every step

        w4 = sr_work(four, "cm+ilvr-out")
        assert w4.rows == 4 and w4.fresh is not None
        a, b = step.run(w4, timeout=300).rows, batch.run(w4, timeout=300).rows
        assert (a - b).abs().max() < 1e-4


def test_keep_edit_serves_as_the_library_sampler_in_both_batching_modes(zoo, tmp_path):
    """`prev+keep` (edit): the decoded output gets back the autoencoder's error on the source where it still is the
    source's round trip. A request equals `samplers.keep_source` on the library's sample of the same denoiser, in
    step-level and per-adapter batching, and the step changes the image (the test is not vacuous)."""
    from cdd.runtime.diffusion import samplers
    from cdd.runtime.diffusion.backbone import load_backbone

    root, _ = zoo
    bb = load_backbone(root / "backbone", device=torch.device("cpu"))
    # an adapter that adds nothing: the output is the backbone's, near enough to the round trip for the gate to open
    adapter = perturb(build_adapter("controlnet", bb.unet, bb.vae_scale_factor), 0.0, 0)
    save_entry(tmp_path / "zoo" / "e", adapter, name="e", task="edit", backbone_fingerprint=bb.fingerprint,
               condition={"channels": 3, "range": [0, 1], "resolution": RES})
    common = dict(backbone=root / "backbone", zoo=tmp_path / "zoo", max_batch=8, warmup=False)
    step = Engine(ServeSettings(batching="step", **common)).start()
    batch = Engine(ServeSettings(batching="request", **common)).start()
    try:
        image = torch.rand(3, RES, RES, generator=torch.Generator().manual_seed(4))

        def work(sampler):
            return prepare("edit", image, adapter="e", resolution=RES, model_channels=4, scale_factor=2, steps=2,
                           sampler=sampler, seed=3, prompt="make the cube red")

        w = work("prev+keep")
        got, other = step.run(w, timeout=300).rows, batch.run(w, timeout=300).rows
        assert (got - other).abs().max() < 1e-4
        sbb, (slot, _) = step.backbone, step.pool.activate("e")
        with torch.no_grad():
            bound = slot.denoiser.bind(w.cond, sbb.encode_text(["make the cube red"]))
            x = sbb.from_model_space(samplers.sample_prev(bound, w.z_T, sbb.schedule.trailing_timesteps(2), sbb.schedule))
            source = w.cond * 2 - 1
            kept = samplers.keep_source(x, source, sbb.from_model_space(sbb.to_model_space(source)))
        assert (got - (kept * 0.5 + 0.5).clamp(0, 1)).abs().max() < 1e-4
        plain = step.run(work("prev"), timeout=300).rows
        assert (plain - (x * 0.5 + 0.5).clamp(0, 1)).abs().max() < 1e-4 and (plain - got).abs().max() > 1e-3
    finally:
        step.stop()
        batch.stop()


def test_guidance_is_per_row_and_batches_in_both_modes(zoo, tmp_path):
    """A controlnet-guided entry serves each request at its own w (the entry's default when none is given), in
    one adapter pass per step: a request's image is the same alone and batched with requests at other w, in
    step-level and in per-adapter batching; w changes the image; a w outside the entry's range, or a w for an
    entry that takes none, is a ValueError naming it."""
    root, _ = zoo
    bb = fresh_backbone(root)
    adapter = perturb(build_adapter("controlnet-guided", bb.unet, bb.vae_scale_factor, guidance=1.5), 0.03, 9)
    with torch.no_grad():  # a w branch strong enough to see in two steps of a random network
        adapter.controlnet.time_embedding.cond_proj.weight.normal_(0, 1, generator=torch.Generator().manual_seed(2))
    save_entry(tmp_path / "gw", adapter, name="gw", task="depth", backbone_fingerprint=bb.fingerprint,
               condition={"channels": 3, "range": [0, 1], "resolution": RES})
    common = dict(backbone=root / "backbone", zoo=root / "zoo", max_batch=4, warmup=False)
    engines = [Engine(ServeSettings(batching=mode, **common)).start() for mode in ("step", "request")]
    try:
        for engine in engines:
            reg = engine.register(tmp_path / "gw")
            default, w_min, w_max = reg.manifest.guidance
            assert (default, w_min, w_max) == (1.5, 0.0, 2.0)
            cond = torch.rand(3, RES, RES, generator=torch.Generator().manual_seed(3))

            def work(w):
                return engine.prepare(reg, cond, steps=2, sampler="prev", seed=5, prompt="a cube", guidance=w)

            ws = [0.0, 2.0, None, default, 0.5]
            alone = [engine.run(work(w), timeout=300).rows for w in ws]
            engine.pause()
            jobs = [engine.submit(work(w)) for w in ws]
            engine.resume()
            together = [j.future.result(timeout=300) for j in jobs]
            assert max(r.batch_rows for r in together) > 1  # they did share evaluations
            for a, r in zip(alone, together):
                assert (a - r.rows).abs().max() < 1e-4
            assert (alone[0] - alone[1]).abs().max() > 1e-2  # w is read
            assert torch.equal(alone[2], alone[3])  # no w: the entry's default
            with pytest.raises(ValueError, match=r"outside adapter 'gw'.s range \[0, 2\]"):
                work(2.5)
            with pytest.raises(ValueError, match="takes no guidance"):
                engine.prepare(engine.pool.get("a"), cond, steps=1, sampler="prev", seed=1, prompt="", guidance=1.0)
    finally:
        for engine in engines:
            engine.stop()


def test_a_run_from_the_input_serves_as_the_library_sampler_in_both_batching_modes(zoo):
    """`strength` < 1 (super-resolution): the run starts from the enlarged input encoded and noised to the span's
    first timestep with the request's own z_T. One tile equals the library's `start_from` + `sample_prev` + the
    ILVR output step on the same denoiser; step-level and per-adapter batching agree on a four-tile request (the
    tiles' starts averaged where they overlap); it differs from the run from noise; and depth, whose input is no
    picture of its output, is refused with a message naming the tasks that can."""
    from cdd.runtime.diffusion import samplers

    with both_batching_modes(zoo) as (step, batch):
        g = torch.Generator().manual_seed(11)
        one, four = torch.rand(3, RES // 4, RES // 4, generator=g), torch.rand(3, 6, 6, generator=g)

        def sr(image, steps, sampler, **kw):  # entry "c" as a super-resolution adapter
            return prepare("super-resolution", image, adapter="c", resolution=RES, model_channels=4, scale_factor=2,
                           steps=steps, sampler=sampler, seed=3, prompt="", **kw)

        w = sr(one, 1, "prev+ilvr-out", strength=0.5)
        assert w.strength == 0.5 and w.key[4] == 0.5
        got = step.run(w, timeout=300).rows
        assert (got - batch.run(w, timeout=300).rows).abs().max() < 1e-4
        bb = step.backbone
        slot, _ = step.pool.activate("c")
        with torch.no_grad():
            bound = slot.denoiser.bind(w.cond, bb.encode_text([""]))
            timesteps = bb.schedule.trailing_timesteps(1, 0.5)
            z_start = samplers.start_from(bb.to_model_space(w.cond * 2 - 1), w.z_T, timesteps, bb.schedule)
            z_0 = samplers.sample_prev(bound, w.z_T, timesteps, bb.schedule, z_start=z_start)
            low = samplers.LowPass(RES, RES, 4)
            want = (samplers.ilvr_output(bb.from_model_space(z_0), low(w.cond * 2 - 1), low) * 0.5 + 0.5).clamp(0, 1)
        assert (got - want).abs().max() < 1e-4
        noise = step.run(sr(one, 1, "prev+ilvr-out"), timeout=300).rows
        assert (noise - got).abs().max() > 1e-2

        w4 = sr(four, 2, "cm", strength=0.75)
        assert w4.rows == 4 and w4.layout.latent_blend
        a, b = step.run(w4, timeout=300).rows, batch.run(w4, timeout=300).rows
        assert (a - b).abs().max() < 1e-4

        with pytest.raises(ValueError, match="task 'depth' cannot start from its input .*super-resolution, edit"):
            step.prepare(step.pool.get("a"), torch.rand(3, RES, RES), steps=1, sampler="prev", seed=0, prompt="",
                         strength=0.5)
        with pytest.raises(ValueError, match=r"strength 0.002 covers 2 timestep\(s\): at most 2 step\(s\), got 3"):
            check_strength("super-resolution", 0.002, 3, step.backbone.schedule.num_train_timesteps)
