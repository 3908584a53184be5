"""Every adapter kind runs forward and backward; its gate / zero-initialised parts get gradient
at initialisation where the CoDi paper's section 4.1 says they should, and start at the identity."""

import pytest
import torch

from cdd.adapters.architectures import ADAPTER_KINDS, build_adapter, unet_encoder_features
from cdd.runtime.diffusion.denoiser import ConditionedDenoiser


def _batch(backbone, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = backbone.unet.config.sample_size
    z = torch.randn(n, backbone.model_channels, size, size, generator=g)
    cond = torch.rand(n, 3, backbone.resolution, backbone.resolution, generator=g)
    text = backbone.encode_text(["a red sphere", "a blue cube on a striped floor"][:n])
    return z, torch.tensor([999, 400][:n]), cond, text


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
@pytest.mark.parametrize("backbone_name", ["pixel_backbone", "latent_backbone"])
def test_adapter_starts_at_identity_and_trains(kind, backbone_name, request):
    backbone = request.getfixturevalue(backbone_name)
    adapter = build_adapter(kind, backbone.unet, backbone.vae_scale_factor)
    z, t, cond, text = _batch(backbone)
    plain = ConditionedDenoiser(backbone.unet, backbone.schedule)
    adapted = ConditionedDenoiser(backbone.unet, backbone.schedule, adapter)

    with torch.no_grad():
        ref = plain.predict(z, t, None, text)
    out = adapted.predict(z, t, cond, text)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # identity at initialisation

    out.square().mean().backward()
    grads = {n: p.grad for n, p in adapter.named_parameters() if p.requires_grad}
    assert grads, "adapter has no trainable parameters"
    assert all(p.grad is None for p in backbone.unet.parameters()), "the frozen backbone received gradient"

    def nonzero(prefix):
        return any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix))

    if kind in ("controlnet", "controlnet-lora"):
        assert nonzero("controlnet.controlnet_down_blocks"), "zero convs got no gradient"
        assert nonzero("controlnet.controlnet_mid_block")
    elif kind == "controlnet-gated":
        assert grads["mu"].abs() > 0, "gate mu got no gradient (eq. 10)"
    elif kind == "t2i":
        assert (grads["gates"].abs() > 0).all(), "a T2I level gate got no gradient"


def test_lora_controlnet_trains_only_lora_zero_convs_and_embedding(pixel_backbone):
    adapter = build_adapter("controlnet-lora", pixel_backbone.unet, rank=4)
    trainable = [n for n, p in adapter.named_parameters() if p.requires_grad]
    assert trainable and all(
        "lora_" in n or ".controlnet_down_blocks" in n or ".controlnet_mid_block" in n or ".controlnet_cond_embedding" in n
        for n in trainable
    )
    assert set(adapter.weights()) == set(trainable)
    full = build_adapter("controlnet", pixel_backbone.unet)
    assert sum(p.numel() for p in adapter.trainable_parameters()) < 0.6 * sum(p.numel() for p in full.parameters())


def test_lora_merge_equals_unmerged(pixel_backbone, perturb):
    adapter = build_adapter("controlnet-lora", pixel_backbone.unet, rank=4)
    perturb(adapter, 0.05)
    z, t, cond, text = _batch(pixel_backbone)
    merged = adapter.merged_controlnet()
    with torch.no_grad():
        a = adapter.controlnet(z, t, text, cond, return_dict=False)
        b = merged(z, t, text, cond, return_dict=False)
    for x, y in zip(a[0], b[0]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_encoder_features_are_the_unets(pixel_backbone):
    """h_theta of eq. 10 are exactly the skip features the UNet itself computes."""
    unet = pixel_backbone.unet
    z, t, cond, text = _batch(pixel_backbone)
    captured = []
    hooks = [b.register_forward_hook(lambda m, i, o: captured.append(o[1])) for b in unet.down_blocks]
    with torch.no_grad():
        unet(z, t, encoder_hidden_states=text)
        for h in hooks:
            h.remove()
        feats, _ = unet_encoder_features(unet, z, t, text)
    flat = [x for res in captured for x in res]
    assert len(feats) == len(flat) + 1
    for a, b in zip(feats[1:], flat):
        torch.testing.assert_close(a, b)


def test_unknown_kind_is_named(pixel_backbone):
    with pytest.raises(ValueError, match="unknown adapter kind 'controlnet-xl'"):
        build_adapter("controlnet-xl", pixel_backbone.unet)
