"""runtime/serving/cuda_graphs.py: the key, static buffers and the pointer check on any device; capture, replay and
swaps without recapture on a GPU (skipped without CUDA)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cdd.adapters.architectures import build_adapter
from cdd.adapters.zoo import save_entry
from cdd.runtime.serving.cuda_graphs import GraphCache, GraphKey, GraphPointerError, StaticInputs, StepGraphKey, check_pointers
from cdd.runtime.serving.engine import Engine
from cdd.runtime.diffusion.factory import make_backbone, save_backbone
from cdd.runtime.serving.imaging import to_uint8
from cdd.runtime.serving.settings import ServeSettings

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_graph_key_is_frozen_and_hashable():
    key = GraphKey("controlnet:abc", None, 4, 64, 2, "prev")
    assert {key: 1}[GraphKey("controlnet:abc", None, 4, 64, 2, "prev")] == 1
    assert key != dataclasses.replace(key, backbone_lora="cdd_x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        key.batch = 8


def test_static_inputs_copy_in_place_and_the_pointer_check():
    values = {"z_T": torch.randn(4, 4, 8, 8), "cond": torch.rand(4, 3, 16, 16), "fresh": [torch.randn(4, 4, 8, 8)] * 2}
    inputs = StaticInputs.like(values)
    ptrs = inputs.data_ptrs()
    assert set(ptrs) == {"z_T", "cond", "fresh.0", "fresh.1"}
    inputs.copy_in(values)
    assert inputs.data_ptrs() == ptrs and torch.equal(inputs.buffers["cond"], values["cond"])
    check_pointers(ptrs, inputs.data_ptrs(), "inputs")
    with pytest.raises(ValueError, match="shape"):
        inputs.copy_in({**values, "cond": torch.rand(2, 3, 16, 16)})
    with pytest.raises(ValueError, match="do not match"):
        inputs.copy_in({"z_T": values["z_T"]})
    inputs.buffers["z_T"] = torch.zeros(4, 4, 8, 8)  # rebinding instead of copying
    with pytest.raises(GraphPointerError, match="z_T"):
        check_pointers(ptrs, inputs.data_ptrs(), "inputs")


def test_graph_cache_refuses_a_cpu_device():
    with pytest.raises(RuntimeError, match="CUDA"):
        GraphCache("cpu")


@pytest.fixture(scope="module")
def gpu_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    bb = make_backbone("latent", resolution=16, seed=3)
    save_backbone(bb, root / "backbone")
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        adapter = build_adapter("controlnet", bb.unet, bb.vae_scale_factor)
        with torch.no_grad():
            for p in adapter.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.03)
        save_entry(root / "zoo" / name, adapter, name=name, task="depth", backbone_fingerprint=bb.fingerprint,
                   condition={"channels": 3, "range": [0, 1], "resolution": 16}, steps=2, sampler="prev")
    return root


def _engine(root, **kw):
    s = ServeSettings(backbone=root / "backbone", zoo=root / "zoo", device="cuda", max_batch=4, **kw)
    engine = Engine(s).start()
    assert engine.wait_ready(300) and engine.warmup_error is None
    return engine


def _run(engine, name, seed, steps=2, sampler="prev"):
    reg = engine.pool.get(name)
    cond = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(seed))
    work = engine.prepare(reg, cond, steps=steps, sampler=sampler, seed=seed, prompt="a red sphere")
    return to_uint8(engine.run(work, timeout=120).rows)[0]


@gpu
@needs_cuda
def test_replays_equal_eager_and_swaps_never_recapture(gpu_world):
    """Per-adapter batching: one graph per (architecture, bucket, resolution, steps, sampler) for the loop."""
    graphs = _engine(gpu_world, cuda_graphs=True, graph_debug=True, batching="request", exact_batching=True)
    eager = _engine(gpu_world, cuda_graphs=False, batching="request", exact_batching=True)
    try:
        cache = graphs.executor.graphs
        captured = cache.captures
        assert captured == 1  # warm-up: one architecture, one bucket, the manifests' steps and sampler
        outs = [_run(graphs, name, 7) for name in ("a", "b", "a", "b")]
        assert cache.captures == captured  # swaps copy into the captured tensors
        np.testing.assert_array_equal(outs[0], outs[2])
        assert not np.array_equal(outs[0], outs[1])
        for name, out in zip(("a", "b"), outs):
            assert np.abs(out.astype(int) - _run(eager, name, 7).astype(int)).max() <= 1
        _run(graphs, "a", 7, steps=4, sampler="cm")
        assert cache.captures == captured + 1  # a new (steps, sampler) is a new graph
        slot, _ = graphs.pool.activate("a")
        weight = slot.adapter.controlnet.conv_in.weight
        weight.data = weight.data.clone()  # rebinding, as a careless load_state_dict(assign=True) would
        with pytest.raises(GraphPointerError):
            _run(graphs, "a", 7)
    finally:
        graphs.stop()
        eager.stop()


@gpu
@needs_cuda
def test_bfloat16_graphs_serve(gpu_world):
    engine = _engine(gpu_world, cuda_graphs=True, dtype="bfloat16")
    try:
        out = _run(engine, "a", 1)
        assert out.shape == (16, 16, 3) and np.array_equal(out, _run(engine, "a", 1))
    finally:
        engine.stop()


def test_step_graph_key_is_frozen_and_hashable():
    key = StepGraphKey("unet:down_block_additional_residuals", None, 4, (4, 8, 8))
    assert {key: 1}[StepGraphKey("unet:down_block_additional_residuals", None, 4, (4, 8, 8))] == 1
    assert key != dataclasses.replace(key, shape=(4, 8, 12))
    with pytest.raises(dataclasses.FrozenInstanceError):
        key.batch = 8


@gpu
@needs_cuda
def test_step_level_graphs_per_bucket_whatever_the_steps_sampler_or_adapter(gpu_world, tmp_path):
    """Step-level batching: the backbone step is captured per row bucket (per-row timesteps a static input)
    and each adapter architecture per bucket; steps, samplers and swaps never recapture; a guided (gd)
    adapter captures (its guidance is a device buffer); replays equal eager."""
    graphs = _engine(gpu_world, cuda_graphs=True, graph_debug=True, batching="step")
    eager = _engine(gpu_world, cuda_graphs=False, batching="step")
    try:
        cache = graphs.executor.graphs
        buckets = graphs.executor.buckets
        assert buckets == (1, 2, 4) and cache.captures == 2 * len(buckets)  # warm-up: ControlNet and UNet per bucket
        captured = cache.captures
        outs = {}
        for name, steps, sampler in (("a", 2, "prev"), ("b", 4, "cm"), ("a", 1, "ddim"), ("b", 2, "gd")):
            outs[name, steps, sampler] = _run(graphs, name, 7, steps, sampler)
            ref = _run(eager, name, 7, steps, sampler)
            assert np.abs(outs[name, steps, sampler].astype(int) - ref.astype(int)).max() <= 1
        assert cache.captures == captured
        graphs.pause()  # a and b in flight together: rows of two adapters share the backbone's replays
        works = [graphs.prepare(graphs.pool.get(n), torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(7)),
                                steps=s, sampler=m, seed=7, prompt="a red sphere") for n, s, m in (("a", 2, "prev"), ("b", 4, "cm"))]
        jobs = [graphs.submit(w) for w in works]
        graphs.resume()
        for job, key in zip(jobs, (("a", 2, "prev"), ("b", 4, "cm"))):
            np.testing.assert_array_equal(to_uint8(job.future.result(timeout=120).rows)[0], outs[key])
        assert cache.captures == captured

        bb = make_backbone("latent", resolution=16, seed=3)  # gpu_world's backbone, on the CPU
        guided = build_adapter("controlnet-guided", bb.unet, bb.vae_scale_factor, guidance=2.0)
        save_entry(tmp_path / "g", guided, name="g", task="depth", backbone_fingerprint=bb.fingerprint,
                   condition={"channels": 3, "range": [0, 1], "resolution": 16}, steps=16, sampler="gd")
        for engine in (graphs, eager):
            engine.register(tmp_path / "g")
        out = _run(graphs, "g", 3, 2, "gd")
        assert np.abs(out.astype(int) - _run(eager, "g", 3, 2, "gd").astype(int)).max() <= 1
        assert cache.captures == captured + 1  # the guided architecture at bucket 1
    finally:
        graphs.stop()
        eager.stop()


@gpu
@needs_cuda
def test_a_run_from_the_input_replays_equal_eager(gpu_world, tmp_path):
    """`strength` < 1 under graphs: per-adapter batching captures the encode of the input into its loop (a new graph
    per strength), step-level batching encodes at boarding; both equal eager within a level."""
    from cdd.runtime.diffusion.backbone import load_backbone

    bb = load_backbone(gpu_world / "backbone")
    adapter = build_adapter("controlnet", bb.unet, bb.vae_scale_factor)
    save_entry(tmp_path / "zoo" / "sr", adapter, name="sr", task="super-resolution", backbone_fingerprint=bb.fingerprint,
               condition={"channels": 3, "range": [0, 1], "resolution": 16}, steps=1, sampler="prev", strength=0.5)
    for batching in ("request", "step"):
        common = dict(backbone=gpu_world / "backbone", zoo=tmp_path / "zoo", device="cuda", max_batch=4,
                      batching=batching)
        graphs, eager = (Engine(ServeSettings(cuda_graphs=g, **common)).start() for g in (True, False))
        try:
            assert graphs.wait_ready(300) and eager.wait_ready(300) and graphs.warmup_error is None
            low = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(2))
            outs = []
            for engine in (graphs, eager):
                reg = engine.pool.get("sr")
                for strength in (None, 0.25, 1.0):
                    work = engine.prepare(reg, low, steps=1, sampler="prev", seed=5, prompt="", strength=strength)
                    outs.append(to_uint8(engine.run(work, timeout=120).rows)[0].astype(int))
            for a, b in zip(outs[:3], outs[3:]):
                assert np.abs(a - b).max() <= 1
            assert np.abs(outs[0] - outs[2]).max() > 1  # from the input is not from noise
        finally:
            graphs.stop()
            eager.stop()
