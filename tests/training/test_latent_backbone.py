"""The latent backbone's pieces: photo patches, the autoencoder trainer, the CLIP tokenizer, latent
pretraining with a zero-terminal-SNR schedule, and the shipped folder in plain diffusers."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cdd.runtime.diffusion.backbone import load_backbone
from cdd.runtime.diffusion.denoiser import ConditionedDenoiser
from cdd.runtime.diffusion.samplers import initial_noise, sample_ddim
from cdd.runtime.diffusion.schedule import NoiseSchedule
from cdd.runtime.diffusion.text import build_clip_tokenizer, save_tokenizer
from cdd.training import autoencoder, pretrain
from cdd.training.data.photos import HELD_OUT, TRAIN, PhotoPatches, bundled_photo
from cdd.training.data.scenes import scene_vocabulary


def test_photo_patches_are_a_deterministic_dataset(tmp_path):
    assert not set(TRAIN) & set(HELD_OUT) and {"skimage:astronaut", "skimage:chelsea"} <= set(HELD_OUT)
    rng = np.random.default_rng(0)
    for k in range(2):
        Image.fromarray((rng.random((40, 50 + k, 3)) * 255).astype(np.uint8)).save(tmp_path / f"p{k}.png")
    ds = PhotoPatches.from_folder(tmp_path, size=16, seed=3)
    a, b = ds[7], ds[7]
    assert a["image"].shape == (3, 16, 16) and a["text"] == "a photo"
    assert torch.equal(a["image"], b["image"]) and not torch.equal(a["image"], ds[8]["image"])
    assert -1 <= a["image"].min() and a["image"].max() <= 1
    assert bundled_photo("skimage:chelsea").shape == (300, 451, 3)
    with pytest.raises(ValueError, match="smaller than"):
        PhotoPatches.from_folder(tmp_path, size=64)


def test_clip_tokenizer_files_are_standard(tmp_path):
    from transformers import CLIPTokenizer

    words = scene_vocabulary() + ["photo"]
    tok = build_clip_tokenizer(words, max_length=12)
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in words)
    save_tokenizer(tok, tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").unlink()  # vocab.json + merges.txt alone must do
    loaded = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    text = ["a red sphere and a photo", "an astronaut"]  # an unknown word splits into pieces
    kw = dict(padding="max_length", max_length=12, truncation=True)
    assert loaded(text, **kw).input_ids == tok(text, **kw).input_ids


def test_zero_terminal_snr_schedule():
    from diffusers import DDIMScheduler

    config = dict(DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing").config)
    schedule = NoiseSchedule.from_scheduler_config(config, "v_prediction")
    assert schedule.abar(torch.tensor([999])).item() == 0.0
    z, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x_hat, eps_hat = schedule.to_x_eps(v, z, torch.tensor([999, 999]))
    torch.testing.assert_close(x_hat, -v)  # alpha_T = 0, sigma_T = 1: x_hat = -v, eps_hat = z
    torch.testing.assert_close(eps_hat, z)
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        NoiseSchedule.from_scheduler_config(config, "epsilon")


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    out = tmp_path_factory.mktemp("ae") / "run"
    args = ["--output", str(out), "--resolution", "16", "--channels", "8,16", "--batch-size", "2",
            "--max-train-steps", "2", "--checkpoint-every", "2", "--eval-images", "2"]
    assert autoencoder.main(args) == 0
    return out


def test_autoencoder_run_writes_a_scaled_vae(tiny_vae):
    from diffusers import AutoencoderKL

    record = json.loads((tiny_vae / "eval.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and {"psnr_scenes", "psnr_photos"} <= set(record)
    vae = AutoencoderKL.from_pretrained(tiny_vae / "vae")
    assert vae.config.scaling_factor == pytest.approx(1 / record["latent_std"], rel=1e-4)
    x = autoencoder.held_out_images(2, 16)
    assert autoencoder.reconstruct(vae, x).shape == x.shape


def test_latent_pretraining_resumes_exports_and_runs_in_plain_diffusers(tiny_vae, tmp_path):
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "run"
    common = ["--output", str(run), "--vae", str(tiny_vae / "vae"), "--resolution", "16", "--channels", "16,32",
              "--text-hidden", "32", "--text-layers", "1", "--max-length", "12", "--tokenizer", "clip",
              "--zero-snr", "--beta-schedule", "scaled_linear", "--photo-fraction", "0.25", "--pool-chunk", "8",
              "--pool-start", "8", "--pool-growth", "4", "--pool-size", "16", "--batch-size", "2",
              "--checkpoint-every", "2", "--sample-every", "100", "--warmup-steps", "2"]
    assert pretrain.main(common + ["--max-train-steps", "2"]) == 0
    assert pretrain.main(common + ["--max-train-steps", "4", "--resume"]) == 0
    assert len(list((run / "pool").glob("chunk_*.pt"))) == 2  # 8 + 4 items a step, capped at 16
    assert pretrain.main(["--output", str(run), "--export", str(tmp_path / "shipped")]) == 0
    assert json.loads((tmp_path / "shipped" / "training.json").read_text())["images_seen"] == 8
    for f in ("vocab.json", "merges.txt"):
        assert (tmp_path / "shipped" / "tokenizer" / f).is_file()
    # a lost run continues from its shipped snapshot: the step count (data stream, images seen) goes on
    again = [*common, "--output", str(tmp_path / "again"), "--init-from", str(tmp_path / "shipped")]
    assert pretrain.main(again + ["--max-train-steps", "4"]) == 2  # already at step 4: says so, trains nothing
    assert pretrain.main(again + ["--max-train-steps", "6"]) == 0
    assert json.loads(read_state_json(tmp_path / "again"))["step"] == 6

    bb = load_backbone(tmp_path / "shipped")
    assert bb.latent and bb.schedule.abar(torch.tensor([999])).item() == 0.0
    prompt, seed = "a red sphere on a plain floor at noon", 5
    z = sample_ddim(ConditionedDenoiser(bb.unet, bb.schedule).bind(None, bb.encode_text([prompt])),
                    initial_noise([seed], (4, 8, 8)), bb.schedule.trailing_timesteps(4), bb.schedule)
    with torch.no_grad():
        ours = (bb.from_model_space(z) / 2 + 0.5).clamp(0, 1)
    # float16 UNet and VAE files, float32 text encoder: plain diffusers with no torch_dtype loads all three in float32
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "shipped", safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt, num_inference_steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(seed),
               output_type="pt").images
    assert torch.isfinite(ours).all() and ref.shape == ours.shape == (1, 3, 16, 16)
    torch.testing.assert_close(ref, ours, atol=1e-5, rtol=1e-5)


def read_state_json(run):
    return (run / "checkpoint" / "state.json").read_text()


def test_decoder_only_keeps_the_latent_space(tiny_vae, tmp_path):
    from diffusers import AutoencoderKL

    args = ["--output", str(tmp_path / "ft"), "--resolution", "16", "--channels", "8,16", "--batch-size", "2",
            "--max-train-steps", "2", "--checkpoint-every", "2", "--eval-images", "2", "--lr", "1e-2",
            "--init-from", str(tiny_vae / "vae"), "--decoder-only"]
    assert autoencoder.main(args) == 0
    before, after = AutoencoderKL.from_pretrained(tiny_vae / "vae"), AutoencoderKL.from_pretrained(tmp_path / "ft" / "vae")
    assert after.config.scaling_factor == before.config.scaling_factor
    enc_a, enc_b = before.encoder.state_dict(), after.encoder.state_dict()
    assert all(torch.equal(enc_a[k], enc_b[k]) for k in enc_a)
    assert not torch.equal(before.decoder.conv_out.weight, after.decoder.conv_out.weight)
