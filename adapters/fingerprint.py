"""The backbone fingerprint that ties an adapter to the exact backbone it was trained on."""

from __future__ import annotations

import hashlib

import torch


def unet_fingerprint(unet: torch.nn.Module) -> str:
    """sha256 over the UNet weights' names, shapes and float32 content.

    Float32 content makes the fingerprint independent of the dtype a backbone is served in
    as long as the weights are exactly representable (a float16-stored backbone is)."""
    h = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
