# Experiment script. Produced docs/results/zoo-v2/edit-latent-condition/heldout.txt (docs/history.md, a prototype not kept).
"""Prototype experiment, not a product feature: does the edit adapter redraw the source's objects because its copy
path is weak? An edit ControlNet whose condition is the source's VAE latent (InstructPix2Pix feeds the source
latent to its UNet; here at the latent's resolution, through a condition embedding with no downsampling) against
the plain one that reads the source's pixels, one change at equal budget.

`train ARGS...` runs cdd-train-adapter with ARGS and the latent-condition ControlNet in place of a fresh adapter
(the rest of an `--init-from` entry, e.g. the SR teacher, is loaded; the condition embedding starts fresh, its
output convolution at zero as in every ControlNet). Its exported entry is labelled `controlnet` but takes a
4-channel latent: only this script can load it (`eval`).

`eval DATA_SEED N NOISE_SEED LABEL=ENTRY...` samples each entry with `prev` x 4 (an entry whose label
starts with `latent` as this prototype) on the edit stream DATA_SEED and prints PSNR (whole, inside / outside the
changed region, per kind) and SWD, beside copying the source.

    python experiments/edit_latent_condition.py train --task edit --method finetune --caption-dropout 0.1 \\
      --init-from runs/zoo-v2/sr-finetune/entry --max-train-steps 3000 --lr 3e-4 --output runs/edit-finetune-latent
    python experiments/edit_latent_condition.py eval 7 64 0 control=runs/zoo-v2/edit-finetune-sr/entry \\
      latent=runs/edit-finetune-latent/entry
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers import ControlNetModel
from safetensors.torch import load_file

import cdd.training.loop as loop
from cdd.adapters.architectures import ControlNetAdapter, _place
from cdd.adapters.zoo import default_backbone_dir, default_zoo_dir


class LatentControlNet(ControlNetAdapter):
    kind = "controlnet"

    def __init__(self, controlnet: ControlNetModel, encode):
        super().__init__(controlnet)
        self._encode = [encode]  # in a list: the VAE is the backbone's, not a submodule of the adapter

    @classmethod
    def build(cls, backbone) -> LatentControlNet:
        cn = ControlNetModel.from_unet(backbone.unet, conditioning_embedding_out_channels=(16,),
                                       conditioning_channels=backbone.model_channels)
        return cls(_place(cn, backbone.unet), backbone.to_model_space)

    def unet_kwargs(self, unet, z_t, t, text_emb, cond):
        with torch.no_grad():
            latent = self._encode[0](cond * 2 - 1)
        down, mid = self.controlnet(z_t, t, encoder_hidden_states=text_emb, controlnet_cond=latent.to(z_t.dtype),
                                    return_dict=False)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Everything but the condition embedding, whose shapes differ (pixels in the entry started from)."""
        keep = {k: v for k, v in state.items() if not k.startswith("controlnet.controlnet_cond_embedding.")}
        _, unexpected = self.load_state_dict(keep, strict=False)
        if unexpected:
            raise ValueError(f"unexpected weights: {unexpected[:5]}")


def evaluate(data_seed: int, n: int, noise_seed: int, entries: list[str]) -> None:
    from cdd.runtime.diffusion.backbone import load_backbone
    from cdd.runtime.diffusion.denoiser import ConditionedDenoiser
    from cdd.training import evaluate as ev
    from cdd.training.condition_metrics import edit_follow
    from cdd.training.metrics import psnr, sliced_wasserstein

    backbone = load_backbone(default_backbone_dir(), device=torch.device("cpu"))
    data = ev.held_out("edit", n, 64, seed=data_seed)
    source, target, text = ev.quantise(data["condition"] * 2 - 1), ev.quantise(data["target"]), data["text"]
    text_emb = backbone.encode_text(text)

    def show(label: str, images: torch.Tensor) -> None:
        r = edit_follow(images, source, target, text)
        print(f"{label:10s} psnr {float(psnr(images, target).mean()):.2f} in {r['psnr_in']:.2f} out {r['psnr_out']:.2f} "
              f"swd {float(sliced_wasserstein(images, target)['swd']):.1f} | "
              + " ".join(f"{k} {v['psnr']:.2f}" for k, v in sorted(r["edit_kinds"].items())), flush=True)

    show("copy", source)
    for item in entries:
        label, path = item.split("=", 1)
        if label.startswith("latent"):
            adapter = LatentControlNet.build(backbone)
            adapter.load_state_dict(load_file(Path(path) / "adapter.safetensors"))
            model = ConditionedDenoiser(backbone.unet, backbone.schedule, adapter.eval())
            images, _ = ev.generate(model, backbone, data, text_emb, "prev", 4, noise_seed, 8)
        else:
            [candidate] = ev.resolve_adapters(path, default_zoo_dir(), "edit", None)
            with ev.entry_model(candidate, backbone, 0) as model:
                images, _ = ev.generate(model, backbone, data, text_emb, "prev", 4, noise_seed, 8)
        show(label, images)


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("train", "eval"):
        print(__doc__, file=sys.stderr)
        return 2
    if sys.argv[1] == "train":
        loop._fresh_adapter = lambda config, backbone: LatentControlNet.build(backbone)
        from cdd.training.train_adapter import main as train_main

        return train_main(sys.argv[2:])
    evaluate(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
