"""`cdd-eval` on the tiny 16 px test backbone with random adapters: outputs and their schema, one row
recomputed by hand, determinism, --append, --record, modes pe/lora/full, and the refused inputs.
The torch hub cache points at an empty folder throughout, so LPIPS and FID must come out null."""

import contextlib
import io
import itertools
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cdd.adapters.architectures import add_backbone_lora, backbone_lora_state, build_adapter
from cdd.adapters.zoo import load_entry, save_entry, verify_entry
from cdd.runtime.diffusion.denoiser import ConditionedDenoiser
from cdd.runtime.diffusion.factory import make_backbone
from cdd.runtime.diffusion.samplers import initial_noise, sample_prev
from cdd.training import evaluate as ev
from cdd.training.condition_metrics import DEPTH_FIELDS
from cdd.training.data.datasets import build_dataset
from cdd.training.metrics import sliced_wasserstein

COND = {"channels": 3, "range": [0, 1], "resolution": 16}
ROW_KEYS = {"method", "sampler", "steps", "psnr", "ssim", "swd", "swd_levels", "kid_attr", "fid_attr", "attr_all", "lpips",
            "fid", "seconds_per_image"}


def perturbed(module, seed, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def entry(backbone, path, seed, task="depth", kind="controlnet", fingerprint=None, sampler="prev", **kw):
    torch.manual_seed(seed)  # the condition embedding's initialisation draws from the global generator
    adapter = perturbed(build_adapter(kind, backbone.unet), seed)
    save_entry(path, adapter, name=path.name, task=task, backbone_fingerprint=fingerprint or backbone.fingerprint,
               condition=COND, sampler=sampler, steps=2, training={"method": "codi"}, **kw)
    return path


def run(*argv):
    """main(argv) -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = ev.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def empty_hub(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("torch-home")
        mp.setenv("TORCH_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, pixel_backbone):
    root = tmp_path_factory.mktemp("zoo")
    entry(pixel_backbone, root / "a", seed=1)
    entry(pixel_backbone, root / "b", seed=2)
    return root


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """An untrained scenes-attribute classifier (a fixed initialisation): its features are real, if not meaningful."""
    from cdd.training import attributes

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("attributes")
    attributes.save(attributes.AttributeNet(), folder, {"note": "untrained, for tests"})
    return folder


@pytest.fixture(scope="module")
def first(tmp_path_factory, zoo, pixel_backbone_dir, empty_hub, classifier):
    out = tmp_path_factory.mktemp("eval") / "out"
    rc, stdout, stderr = run("--task", "depth", "--adapters", "a,b", "--zoo", zoo, "--backbone", pixel_backbone_dir,
                             "--steps", "2,1", "--num-images", 3, "--batch-size", 2, "--out", out,
                             "--attributes", classifier)
    assert rc == 0, stderr
    return out, stdout


def common(zoo, backbone_dir):
    return ["--task", "depth", "--zoo", zoo, "--backbone", backbone_dir, "--num-images", 3, "--batch-size", 2]


def rows_by_key(out):
    return {(r["method"], r["sampler"], r["steps"]): r for r in json.loads((out / "results.json").read_text())["rows"]}


def png(path):
    return np.asarray(Image.open(path))


def test_results_schema_outputs_and_null_lpips_fid(first, empty_hub):
    out, stdout = first
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "depth" and results["num_images"] == 3
    assert results["seed"] == 0 and results["data_seed"] == ev.EVAL_SEED and results["device"] == "cpu"
    assert [(r["method"], r["sampler"], r["steps"]) for r in results["rows"]] == [
        ("probe: truth", ev.PROBE, 0), ("a", "prev", 1), ("a", "prev", 2), ("b", "prev", 1), ("b", "prev", 2)]
    ceiling = results["rows"][0]  # depth: the renders' own edges against their maps, always measured
    assert ceiling["psnr"] > 90 and ceiling["depth_edge_corr"] > ceiling["depth_edge_other"]
    for r in results["rows"][1:]:
        assert ROW_KEYS | set(DEPTH_FIELDS) <= set(r) and r["training_method"] == "codi"
        assert "psnr_in" not in r and -1 <= r["depth_edge_corr"] <= 1 and 0 <= r["depth_edge_match"] <= 1
        assert all(math.isfinite(r[m]) for m in ("psnr", "ssim", "swd", "kid_attr", "fid_attr")) and r["seconds_per_image"] > 0
        assert 0 <= r["attr_all"] <= 1 and set(r["swd_levels"]) == {"swd_16"}  # 16 px: one pyramid level
        assert r["lpips"] is None and r["fid"] is None  # no weights in the (empty) hub cache
    assert len(results["swd_other_scenes"]) == ev.OTHER_SCENE_SETS
    assert 0 < results["swd_truth_vs_itself"] < min(results["swd_other_scenes"])
    assert all(math.isfinite(v) and v > 0 for v in results["swd_other_scenes"])
    rows = rows_by_key(out)
    assert rows["a", "prev", 2]["psnr"] != rows["b", "prev", 2]["psnr"]  # different adapters, different rows
    assert rows["a", "prev", 2]["swd"] != rows["b", "prev", 2]["swd"]

    md = (out / "results.md").read_text()
    assert ("| method | sampler | steps | KID-attr ↓ | FID-attr ↓ | SWD ↓ | PSNR ↑ | SSIM ↑ | caption ↑ | edges own ↑ "
            "| edges other | edge match ↑ | obj recall ↑ | obj precision ↑ | floor ↑ | time ↑ | LPIPS ↓ | FID ↓ | s/image ↓ |") in md
    assert "edge match (depth)" in md and "PSNR in" not in md
    assert str(empty_hub / "hub" / "checkpoints" / ev.FID_INCEPTION_FILE) in md and "LPIPS is empty" in md
    assert "[1/4] a prev x1: KID-attr" in stdout and "[4/4] b prev x2" in stdout and "| b | prev | 2 |" in stdout

    assert sorted(p.name for p in out.glob("plot_*.png")) == sorted(
        ["plot_attr_all.png", "plot_depth_edge_corr.png", "plot_depth_edge_match.png", "plot_fid_attr.png",
         "plot_kid_attr.png", "plot_psnr.png", "plot_seconds_per_image.png", "plot_ssim.png", "plot_swd.png",
         "plot_attr_recall.png", "plot_attr_precision.png", "plot_attr_floor.png", "plot_attr_time.png"])
    assert Image.open(out / "plot_psnr.png").format == "PNG"
    grid = Image.open(out / "grid.png")
    assert grid.format == "PNG" and grid.size == ((2 + 5) * 16, 3 * 16)  # condition, probe + 4 rows, truth; 3 examples
    assert png(out / "images" / "condition.png").shape == (3 * 16, 16, 3)


def test_a_row_equals_a_direct_computation(first, zoo, pixel_backbone):
    out, _ = first
    row = rows_by_key(out)["a", "prev", 2]
    samples = list(itertools.islice(iter(build_dataset("depth", "scenes", size=16, seed=ev.EVAL_SEED)), 3))
    cond = torch.stack([s["condition"] for s in samples])
    text = pixel_backbone.encode_text([s["text"] for s in samples])
    model = ConditionedDenoiser(pixel_backbone.unet, pixel_backbone.schedule,
                                   load_entry(zoo / "a", pixel_backbone.unet, pixel_backbone.fingerprint).adapter)
    z_0 = sample_prev(model.bind(cond, text), initial_noise(range(3), (3, 16, 16)), [999, 499], pixel_backbone.schedule)
    mine = ((z_0.clamp(-1, 1) + 1) * 127.5).round().numpy().transpose(0, 2, 3, 1).reshape(48, 16, 3)
    saved = png(out / row["image"]).astype(np.float64)
    assert np.abs(mine - saved).max() <= 1  # batches of 2 + 1 there, one batch of 3 here
    truth = ((torch.stack([s["target"] for s in samples]) + 1) * 127.5).round().numpy().transpose(0, 2, 3, 1)
    mse = ((saved.reshape(3, 16, 16, 3) - truth) / 255) ** 2
    assert row["psnr"] == pytest.approx(np.mean(10 * np.log10(1 / mse.reshape(3, -1).mean(1))), rel=1e-5)


def test_same_seed_same_metrics_and_record_keeps_entries_valid(first, zoo, pixel_backbone_dir, tmp_path, empty_hub):
    for name in ("a", "b"):
        shutil.copytree(zoo / name, tmp_path / name)
    rc, _, err = run(*common(zoo, pixel_backbone_dir), "--adapters", f"a={tmp_path / 'a'},b={tmp_path / 'b'}",
                     "--steps", "1,2", "--out", tmp_path / "out", "--record")
    assert rc == 0, err
    before, again = rows_by_key(first[0]), rows_by_key(tmp_path / "out")
    assert before.keys() == again.keys()
    for key in before:
        assert all(before[key][m] == again[key][m] for m in ("psnr", "ssim", "swd")), key
    for name in ("a", "b"):
        manifest = verify_entry(tmp_path / name, json.loads((tmp_path / "out" / "results.json").read_text())["backbone_fingerprint"])
        recorded = manifest.metrics["cdd-eval"]
        assert recorded["num_images"] == 3 and recorded["seed"] == 0 and recorded["task"] == "depth"
        assert [(r["method"], r["steps"], r["psnr"]) for r in recorded["rows"]] == [
            (name, k, before[name, "prev", k]["psnr"]) for k in (1, 2)]


def test_append_replaces_a_row_and_keeps_the_others(first, zoo, pixel_backbone_dir, tmp_path, empty_hub):
    out = tmp_path / "out"
    shutil.copytree(first[0], out)
    before = rows_by_key(out)
    rc, _, err = run(*common(zoo, pixel_backbone_dir), "--adapters", f"a={zoo / 'b'}", "--samplers", "prev,dpm-solver++",
                     "--steps", "2", "--out", out, "--append")
    assert rc == 0, err
    after = rows_by_key(out)
    assert list(after) == [("probe: truth", ev.PROBE, 0), ("a", "prev", 1), ("a", "prev", 2), ("a", "dpm-solver++", 2),
                           ("b", "prev", 1), ("b", "prev", 2)]
    assert after["a", "prev", 2]["psnr"] == before["b", "prev", 2]["psnr"]  # replaced: now entry b's numbers
    for key in [("a", "prev", 1), ("b", "prev", 1), ("b", "prev", 2)]:
        assert after[key] == before[key]
    assert Image.open(out / "grid.png").size == ((2 + 6) * 16, 3 * 16)
    assert "| a | dpm-solver++ | 2 |" in (out / "results.md").read_text()
    # a run on other held-out data is not merged
    rc, _, err = run(*common(zoo, pixel_backbone_dir)[:-4], "--num-images", 2, "--adapters", "a", "--out", out, "--append")
    assert rc == 2 and "num_images 3, this run 2" in err


def test_data_seed_draws_another_stream_and_is_not_merged_with_the_held_out_one(first, zoo, pixel_backbone_dir,
                                                                              tmp_path, empty_hub):
    out = tmp_path / "out"
    shutil.copytree(first[0], out)
    tuning = tmp_path / "tuning"
    rc, _, err = run(*common(zoo, pixel_backbone_dir), "--adapters", "a", "--steps", "2", "--data-seed", 7, "--out", tuning)
    assert rc == 0, err
    results = json.loads((tuning / "results.json").read_text())
    assert results["data_seed"] == 7
    truth = png(tuning / "images" / "target.png")
    samples = list(itertools.islice(iter(build_dataset("depth", "scenes", size=16, seed=7)), 3))
    mine = ((torch.stack([s["target"] for s in samples]) + 1) * 127.5).round().numpy().transpose(0, 2, 3, 1)
    assert np.abs(truth.astype(np.int64) - mine.reshape(48, 16, 3)).max() <= 1  # the stream of seed 7, not EVAL_SEED
    assert not np.array_equal(truth, png(out / "images" / "target.png"))
    rc, _, err = run(*common(zoo, pixel_backbone_dir), "--adapters", "a", "--steps", "2", "--data-seed", 7, "--out", out,
                     "--append")
    assert rc == 2 and f"data_seed {ev.EVAL_SEED}, this run 7" in err


def test_lora_full_and_guided_entries_are_sampled_as_trained(pixel_backbone_dir, pixel_backbone, tmp_path, empty_hub):
    # three entries with the same adapter weights (seed 3): plain, plus a backbone LoRA, plus a fine-tuned UNet;
    # all sampled with their manifest's sampler (cm), and a Guided-Distillation entry with its own (gd)
    entry(pixel_backbone, tmp_path / "pe", seed=3, sampler="cm")
    owner = make_backbone("pixel", resolution=16, seed=0)  # same weights as pixel_backbone; takes the LoRA
    assert owner.fingerprint == pixel_backbone.fingerprint
    cfg = add_backbone_lora(owner.unet, "training_lora", rank=2)
    perturbed(owner.unet, seed=4, std=0.2)  # only the LoRA weights are saved from it
    lora = ({"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules)},
            backbone_lora_state(owner.unet, "training_lora"))
    entry(pixel_backbone, tmp_path / "lora", seed=3, sampler="cm", mode="lora", backbone_lora=lora)
    tuned = perturbed(make_backbone("pixel", resolution=16, seed=0).unet, seed=5, std=0.02)
    entry(pixel_backbone, tmp_path / "full", seed=3, sampler="cm", mode="full", unet_state=tuned.state_dict())
    entry(pixel_backbone, tmp_path / "guided", seed=3, sampler="gd", kind="controlnet-guided")
    names = ("pe", "lora", "full", "guided")
    rc, _, err = run("--task", "depth", "--backbone", pixel_backbone_dir, "--num-images", 2, "--steps", "1,2",
                     "--adapters", ",".join(str(tmp_path / n) for n in names), "--out", tmp_path / "out")
    assert rc == 0, err
    rows = rows_by_key(tmp_path / "out")
    assert sorted(rows) == sorted([("probe: truth", ev.PROBE, 0)] + [(n, "gd" if n == "guided" else "cm", k)
                                                                     for n in names for k in (1, 2)])
    for k in (1, 2):
        assert rows["lora", "cm", k]["psnr"] != rows["pe", "cm", k]["psnr"]  # the LoRA was on
        assert rows["full", "cm", k]["psnr"] != rows["pe", "cm", k]["psnr"]  # the entry's own UNet was used
    assert rows["lora", "cm", 1]["mode"] == "lora" and rows["full", "cm", 1]["mode"] == "full"


def test_guided_entry_rows_at_each_guidance(pixel_backbone_dir, pixel_backbone, tmp_path, empty_hub):
    """--guidance W,W: one row per w for a controlnet-guided entry (each sampled at that w), other entries once."""
    entry(pixel_backbone, tmp_path / "plain", seed=3, sampler="prev")
    entry(pixel_backbone, tmp_path / "guided", seed=3, sampler="prev", kind="controlnet-guided")
    rc, _, err = run("--task", "depth", "--backbone", pixel_backbone_dir, "--num-images", 2, "--steps", "1",
                     "--adapters", f"{tmp_path / 'plain'},{tmp_path / 'guided'}", "--guidance", "0,3",
                     "--out", tmp_path / "out", "--attributes", "none")
    assert rc == 0, err
    rows = rows_by_key(tmp_path / "out")
    assert {k for k in rows if k[1] != ev.PROBE} == {("plain", "prev", 1), ("guided w=0", "prev", 1),
                                                     ("guided w=3", "prev", 1)}
    assert rows["guided w=0", "prev", 1]["guidance"] == 0 and rows["guided w=3", "prev", 1]["guidance"] == 3
    assert rows["guided w=0", "prev", 1]["psnr"] != rows["guided w=3", "prev", 1]["psnr"]  # w was applied
    # without --guidance, an entry with a per-step default (guidance_steps) is measured at the w it is served with
    manifest = json.loads((tmp_path / "guided" / "manifest.json").read_text())  # training range [0, 2], default 1
    (tmp_path / "guided" / "manifest.json").write_text(json.dumps({**manifest, "guidance_steps": {"1": 0.0}}))
    rc, _, err = run("--task", "depth", "--backbone", pixel_backbone_dir, "--num-images", 2, "--steps", "1",
                     "--adapters", tmp_path / "guided", "--out", tmp_path / "served", "--attributes", "none")
    assert rc == 0, err
    assert rows_by_key(tmp_path / "served")["guided", "prev", 1]["psnr"] == pytest.approx(
        rows["guided w=0", "prev", 1]["psnr"], abs=1e-4)


def test_cfg_rows_are_the_entry_with_two_pass_guidance(pixel_backbone_dir, pixel_backbone, tmp_path, empty_hub):
    """--cfg W: a row per w of the entry with classifier-free guidance; w = 0 is the entry itself."""
    entry(pixel_backbone, tmp_path / "plain", seed=3, sampler="prev")
    rc, _, err = run("--task", "depth", "--backbone", pixel_backbone_dir, "--num-images", 2, "--steps", "1",
                     "--adapters", tmp_path / "plain", "--cfg", "0,2", "--out", tmp_path / "out", "--attributes", "none")
    assert rc == 0, err
    rows = rows_by_key(tmp_path / "out")
    plain, zero, two = rows["plain", "prev", 1], rows["plain cfg=0", "prev", 1], rows["plain cfg=2", "prev", 1]
    assert zero["psnr"] == pytest.approx(plain["psnr"], abs=1e-3) and two["psnr"] != plain["psnr"]
    # --cfg-unconditional text+condition: the unconditional branch is the backbone alone (rows 'cfg-both')
    rc, _, err = run("--task", "depth", "--backbone", pixel_backbone_dir, "--num-images", 2, "--steps", "1",
                     "--adapters", tmp_path / "plain", "--cfg", "0,2", "--cfg-unconditional", "text+condition",
                     "--out", tmp_path / "both", "--attributes", "none")
    assert rc == 0, err
    rows = rows_by_key(tmp_path / "both")
    zero, both = rows["plain cfg-both=0", "prev", 1], rows["plain cfg-both=2", "prev", 1]
    assert zero["psnr"] == pytest.approx(plain["psnr"], abs=1e-3) and both["cfg_unconditional"] == "text+condition"
    assert both["psnr"] != two["psnr"]  # another unconditional branch than the condition with ""


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--guidance", "1,x"], "--guidance takes numbers separated by commas"),
        (["--samplers", "euler"], "unknown sampler 'euler'"),
        (["--steps", "1,0"], "--steps: '0' is not a positive integer"),
        (["--steps", "two"], "--steps: 'two' is not a positive integer"),
        (["--num-images", "1"], "--num-images is 1; at least 2"),
        (["--adapters", "nope"], "'nope' is neither a zoo entry folder nor an entry of the zoo"),
        (["--adapters", "notentry"], "notentry is not a zoo entry: manifest.json is missing"),
        (["--adapters", "edit"], "is for task 'edit', not --task 'depth'"),
        (["--adapters", "other"], "was made for backbone"),
        (["--adapters", "a,a"], "method 'a' is given twice"),
    ],
)
def test_bad_inputs_fail_naming_the_value(argv, message, zoo, pixel_backbone, pixel_backbone_dir, tmp_path):
    (zoo / "notentry").mkdir(exist_ok=True)
    if not (zoo / "edit").exists():
        entry(pixel_backbone, zoo / "edit", seed=1, task="edit")
        entry(pixel_backbone, zoo / "other", seed=1, fingerprint="0" * 64)
    args = {"--adapters": "a", "--steps": "1", "--num-images": "2"}
    args.update(zip(argv[::2], argv[1::2]))
    rc, _, err = run("--task", "depth", "--zoo", zoo, "--backbone", pixel_backbone_dir, "--out", tmp_path / "o",
                     *itertools.chain(*args.items()))
    assert rc == 2 and message in err, err
    assert not (tmp_path / "o" / "results.json").exists()


def test_optional_metrics_need_their_weights_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    status = ev.optional_metric_status()
    assert str(tmp_path / "hub" / "checkpoints" / ev.LPIPS_BACKBONE_FILE) in status["lpips"]
    assert str(tmp_path / "hub" / "checkpoints" / ev.FID_INCEPTION_FILE) in status["fid"]
    metrics = ev.OptionalMetrics(torch.rand(2, 3, 16, 16), torch.device("cpu"))  # constructs nothing, downloads nothing
    assert metrics.lpips(torch.rand(2, 3, 16, 16)) is None and metrics.fid(torch.rand(2, 3, 16, 16)) is None
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / ev.FID_INCEPTION_FILE).touch()
    assert ev.FID_INCEPTION_FILE not in (ev.optional_metric_status()["fid"] or "")


def test_swd_other_scenes_measures_other_streams_against_the_truth():
    first_other = ev.quantise(ev.held_out("depth", 3, 16, seed=ev.EVAL_SEED + 1)["target"])
    values = ev.swd_other_scenes("depth", 3, 16, first_other)  # the truth IS the first other set
    # SWD draws its patches at random, so even a set against itself is not 0; the same draw is the same number
    assert values[0] == sliced_wasserstein(first_other, first_other)["swd"]
    assert len(set(values)) == len(values) and all(v > 0 for v in values)


def test_table_marks_directions_and_missing_values():
    rows = [{"method": "m", "sampler": "prev", "steps": 1, "psnr": 20.0, "ssim": 0.5, "swd": 3.0, "lpips": 0.25,
             "fid": None, "seconds_per_image": 0.01, "kid_attr": 1.5, "fid_attr": 0.25, "attr_all": 0.75}]
    text = ev.table(rows)
    assert "| KID-attr ↓ | FID-attr ↓ | SWD ↓ | PSNR ↑ | SSIM ↑ | caption ↑ | LPIPS ↓ | FID ↓ | s/image ↓ |" in text
    assert "| m | prev | 1 | 1.5 | 0.25 | 3.00 | 20.00 | 0.5000 | 0.750 | 0.2500 | – | 0.01 |" in text
    del rows[0]["kid_attr"]  # a row measured before the attribute distances existed (--append)
    assert "| m | prev | 1 | – | 0.25 |" in ev.table(rows)


def test_lpips_and_fid_get_what_torchmetrics_expects(monkeypatch):
    """The available path, with stand-ins for the torchmetrics classes (their weights are not on this disk)."""
    fid_module = pytest.importorskip("torchmetrics.image.fid")
    lpip_module = pytest.importorskip("torchmetrics.image.lpip")
    made = {}

    class Stand_in:
        device = torch.device("cpu")

        def __init__(self, **kwargs):
            self.kwargs, self.seen, self.real = kwargs, [], 0
            made[type(self).__name__] = self

        def to(self, device):
            return self

        def reset(self):
            self.seen = []

    class LPIPS(Stand_in):
        def update(self, a, b):
            assert a.shape[-2:] == b.shape[-2:] == (ev.LPIPS_MIN_SIZE, ev.LPIPS_MIN_SIZE)
            self.seen.append((a - b).abs().mean(dim=(1, 2, 3)))

        def compute(self):
            return torch.cat(self.seen).mean()

    class FID(Stand_in):
        def update(self, images, real):
            if real:
                self.real += len(images)
            else:
                self.seen.append(images)

        def compute(self):
            return torch.tensor(1000.0 * self.real + sum(len(x) for x in self.seen))

    monkeypatch.setattr(ev, "optional_metric_status", lambda: {"lpips": None, "fid": None})
    monkeypatch.setattr(lpip_module, "LearnedPerceptualImagePatchSimilarity", LPIPS)
    monkeypatch.setattr(fid_module, "FrechetInceptionDistance", FID)
    truth = torch.rand(3, 3, 16, 16)
    metrics = ev.OptionalMetrics(truth, torch.device("cpu"))
    assert made["LPIPS"].kwargs == {"net_type": "alex", "normalize": True}
    fid_kwargs = made["FID"].kwargs
    assert fid_kwargs["normalize"] is True and fid_kwargs["reset_real_features"] is False
    assert fid_kwargs["feature_extractor_weights_path"].endswith(ev.FID_INCEPTION_FILE)  # never a download
    assert metrics.lpips(truth) == 0.0 and metrics.lpips(1 - truth) > 0
    assert metrics.fid(torch.rand(3, 3, 16, 16)) == metrics.fid(torch.rand(3, 3, 16, 16)) == 3003.0  # truth kept


def test_probe_rows_and_a_missing_classifier(tmp_path, zoo, pixel_backbone_dir, empty_hub, classifier):
    out = tmp_path / "probes"
    rc, stdout, stderr = run(*common(zoo, pixel_backbone_dir), "--adapters", "a", "--steps", "1", "--out", out,
                             "--probes", "--attributes", classifier)
    assert rc == 0, stderr
    rows = rows_by_key(out)
    probes = {k[0]: r for k, r in rows.items() if k[1] == ev.PROBE}
    assert set(probes) == {"probe: truth", f"probe: truth + noise {ev.PROBE_NOISE}", f"probe: truth blurred x{ev.PROBE_BLUR}",
                           "probe: other scenes"}
    truth = probes["probe: truth"]
    assert truth["psnr"] > 90 and truth["ssim"] == pytest.approx(1) and truth["fid_attr"] == pytest.approx(0, abs=1e-6)
    assert truth["kid_attr"] == 0  # the paired U-statistic of a set against itself
    for name, r in probes.items():
        if name != "probe: truth":
            assert r["fid_attr"] > truth["fid_attr"] and r["swd"] > truth["swd"], name
    assert ("a", "prev", 1) in rows and sorted(p.name for p in out.glob("plot_*.png"))  # probes are not plotted
    # caption following, read by the classifier against the captions: the same numbers as attributes.agreement
    from cdd.training import attributes

    data = ev.held_out("depth", 3, 16)
    agree = attributes.caption_agreement(attributes.load(classifier), ev.quantise(data["target"]), data["text"])
    assert truth["attr_recall"] == pytest.approx(agree["objects_recall"])
    assert truth["attr_precision"] == pytest.approx(agree["objects_precision"])
    assert (truth["attr_floor"], truth["attr_time"]) == pytest.approx((agree["floor"], agree["time"]))
    assert all(k in rows["a", "prev", 1] for k in ("attr_recall", "attr_precision", "attr_floor", "attr_time"))
    assert "probe rows" in (out / "results.md").read_text()

    rc, _, stderr = run(*common(zoo, pixel_backbone_dir), "--adapters", "a", "--steps", "1", "--out", tmp_path / "none",
                        "--attributes", tmp_path / "nowhere")
    assert rc == 0, stderr
    results = json.loads((tmp_path / "none" / "results.json").read_text())
    assert all(r["kid_attr"] is None and r["attr_all"] is None for r in results["rows"])
    assert "no attribute classifier in" in results["notes"]["attributes"]


def test_edit_rows_score_the_changed_region_beside_copy_input(tmp_path, pixel_backbone, pixel_backbone_dir, empty_hub):
    from cdd.training import condition_metrics as cm

    entry(pixel_backbone, tmp_path / "edit", seed=1, task="edit")
    out = tmp_path / "out"
    rc, stdout, stderr = run("--task", "edit", "--adapters", tmp_path / "edit", "--backbone", pixel_backbone_dir,
                             "--num-images", 3, "--steps", "1", "--out", out, "--attributes", "none")
    assert rc == 0, stderr
    rows = rows_by_key(out)
    assert list(rows) == [("probe: copy input", ev.PROBE, 0), ("edit", "prev", 1)]
    data = ev.held_out("edit", 3, 16)
    source, truth = ev.quantise(data["condition"] * 2 - 1), ev.quantise(data["target"])
    copy = rows["probe: copy input", ev.PROBE, 0]
    direct = cm.edit_follow(source, source, truth, data["text"])  # the unedited source, scored by hand
    assert copy["edit_kinds"] == direct["edit_kinds"] and copy["psnr_in"] == pytest.approx(direct["psnr_in"])
    assert copy["psnr_out"] == pytest.approx(direct["psnr_out"]) and copy["psnr_out"] > 90  # identical outside the edit
    assert copy["psnr_in"] < 30 and copy["psnr"] == pytest.approx(float(ev.psnr(source, truth).mean()))
    generated = rows["edit", "prev", 1]
    assert set(cm.EDIT_FIELDS) | {"edit_kinds"} <= set(generated) and "depth_edge_corr" not in generated
    assert sum(v["n"] for v in generated["edit_kinds"].values()) == 3
    md = (out / "results.md").read_text()
    assert ("| caption ↑ | obj recall ↑ | obj precision ↑ | floor ↑ | time ↑ | PSNR in ↑ | PSNR out ↑ | LPIPS ↓ |" in md
            and "'probe: copy input'" in md and "edges own" not in md)
    # per kind, the share of images nearer the target than the unedited input: none for the input itself
    assert all(v["closer"] == 0 for v in copy["edit_kinds"].values())
    images = torch.stack([torch.zeros(3, 16, 16), source[1] * 0.5 + truth[1] * 0.5, truth[2]])  # in [0, 1]
    by_hand = [float(ev.psnr(images[i : i + 1], truth[i : i + 1])) > float(ev.psnr(source[i : i + 1], truth[i : i + 1]))
               for i in range(3)]
    kinds = cm.edit_follow(images, source, truth, data["text"])["edit_kinds"]
    assert sum(v["closer"] * v["n"] for v in kinds.values()) == pytest.approx(sum(by_hand)) and by_hand[2]
    assert "probe copy input: " in stdout and "[1/1] edit prev x1" in stdout


# --- super-resolution: bicubic, prompts, held-out photographs, ILVR ----------------------------


@pytest.fixture(scope="module")
def sr_zoo(tmp_path_factory, pixel_backbone):
    root = tmp_path_factory.mktemp("sr-zoo")
    entry(pixel_backbone, root / "sr", seed=6, task="super-resolution")
    return root


def sr_run(sr_zoo, backbone_dir, out, *argv):
    rc, stdout, stderr = run("--task", "super-resolution", "--zoo", sr_zoo, "--backbone", backbone_dir, "--num-images", 3,
                             "--batch-size", 2, "--steps", "1", "--out", out, "--attributes", "none", *argv)
    assert rc == 0, stderr
    return json.loads((out / "results.json").read_text()), stdout


def test_bicubic_row_is_the_condition_measured_like_every_row(sr_zoo, pixel_backbone_dir, tmp_path, empty_hub):
    results, stdout = sr_run(sr_zoo, pixel_backbone_dir, tmp_path / "out", "--adapters", "sr", "--bicubic")
    rows = rows_by_key(tmp_path / "out")
    assert list(rows) == [(ev.BICUBIC, ev.NO_SAMPLER, 0), ("sr", "prev", 1)]
    bicubic = rows[ev.BICUBIC, ev.NO_SAMPLER, 0]
    data = ev.held_out("super-resolution", 3, 16)
    truth, images = ev.quantise(data["target"]), ev.quantise(data["condition"] * 2 - 1)
    assert bicubic["psnr"] == pytest.approx(float(ev.psnr(images, truth).mean()))
    assert bicubic["ssim"] == pytest.approx(float(ev.ssim(images, truth).mean()))
    assert bicubic["seconds_per_image"] is None and ROW_KEYS <= set(bicubic)
    # invented detail where the truth is flat: a column of every super-resolution row, the truth's own beside them
    assert bicubic["flat_hf"] == ev.mean_flat_hf(images, truth) and "flat_hf" in rows["sr", "prev", 1]
    assert results["flat_hf_truth"] == ev.mean_flat_hf(truth, truth)
    # the condition: bicubic (torch, align_corners=False) of the 4x smaller degraded image
    lr = torch.nn.functional.interpolate(data["condition"], size=4, mode="area")
    assert (data["condition"] - torch.nn.functional.interpolate(lr, size=16, mode="bicubic")).abs().mean() < 0.1
    assert results["prompt"] == "none" and results["dataset"] == "scenes" and results["degradation"] == "realesrgan"
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| bicubic | - | 0 |" in md and "Prompt: none (the empty prompt" in md and "realesrgan preset" in md
    assert "| flat HF |" in md and "- flat HF (super-resolution)" in md
    assert "plot_psnr.png" in {p.name for p in (tmp_path / "out").glob("plot_*.png")}
    # without entries, --bicubic alone is a valid run (given the resolution)
    alone, _ = sr_run(sr_zoo, pixel_backbone_dir, tmp_path / "alone", "--bicubic", "--resolution", 16)
    assert [(r["method"], r["psnr"]) for r in alone["rows"]] == [(ev.BICUBIC, bicubic["psnr"])]


def test_prompt_none_samples_with_the_empty_prompt(sr_zoo, pixel_backbone_dir, pixel_backbone, tmp_path, empty_hub):
    none, _ = sr_run(sr_zoo, pixel_backbone_dir, tmp_path / "none", "--adapters", "sr")
    caption, _ = sr_run(sr_zoo, pixel_backbone_dir, tmp_path / "caption", "--adapters", "sr", "--prompt", "caption")
    assert (none["prompt"], caption["prompt"]) == ("none", "caption")
    assert none["rows"][0]["psnr"] != caption["rows"][0]["psnr"]
    # the none row by hand: the empty prompt for every image
    data = ev.held_out("super-resolution", 3, 16)
    model = ConditionedDenoiser(pixel_backbone.unet, pixel_backbone.schedule,
                                load_entry(sr_zoo / "sr", pixel_backbone.unet, pixel_backbone.fingerprint).adapter)
    images, _ = ev.generate(model, pixel_backbone, data, pixel_backbone.encode_text([""] * 3), "prev", 1, 0, 2)
    assert none["rows"][0]["psnr"] == pytest.approx(float(ev.psnr(images, ev.quantise(data["target"])).mean()))
    # a results.json from before --prompt measured with captions: appending a none run to it is refused
    legacy = {k: v for k, v in caption.items() if k not in ("prompt", "dataset", "degradation")}
    (tmp_path / "caption" / "results.json").write_text(json.dumps(legacy))
    rc, _, err = run("--task", "super-resolution", "--zoo", sr_zoo, "--backbone", pixel_backbone_dir, "--num-images", 3,
                     "--steps", "1", "--adapters", "sr", "--out", tmp_path / "caption", "--append", "--attributes", "none")
    assert rc == 2 and "prompt 'caption', this run 'none'" in err


def test_held_out_photographs_skip_the_scene_classifier(sr_zoo, pixel_backbone_dir, tmp_path, empty_hub, classifier):
    results, _ = sr_run(sr_zoo, pixel_backbone_dir, tmp_path / "out", "--adapters", "sr", "--bicubic", "--probes",
                        "--dataset", "photos", "--degradation", "mild-64px", "--attributes", classifier)
    assert results["dataset"] == "photos" and results["degradation"] == "mild-64px"
    assert "photographs" in results["notes"]["attributes"]
    for r in results["rows"]:
        assert r["kid_attr"] is None and r["attr_all"] is None and math.isfinite(r["psnr"]) and math.isfinite(r["swd"])
    assert "probe: other photo patches" in {r["method"] for r in results["rows"]}
    # deterministic positions, never the training photographs
    a, b = ev.held_out_photos(2, 16, ev.EVAL_SEED), ev.held_out_photos(2, 16, ev.EVAL_SEED)
    assert all(torch.equal(x["target"], y["target"]) and torch.equal(x["condition"], y["condition"]) for x, y in zip(a, b))
    assert a[0]["text"] == "a photo"
    md = (tmp_path / "out" / "results.md").read_text()
    assert "patches of the held-out photographs" in md


def test_ilvr_sampler_row_is_the_sampler_with_the_ilvr_step(sr_zoo, pixel_backbone_dir, pixel_backbone, tmp_path,
                                                            empty_hub):
    """The row of `prev+ilvr` by hand: sample_prev on the ILVR-wrapped model (runtime/diffusion/samplers.py, where the step
    itself is checked against the block means), towards the condition in [-1, 1] at the SR factor 4."""
    from cdd.runtime.diffusion.samplers import ilvr

    sr_run(sr_zoo, pixel_backbone_dir, tmp_path / "out", "--adapters", "sr", "--samplers", "prev,prev+ilvr")
    rows = rows_by_key(tmp_path / "out")
    assert set(rows) == {("sr", "prev", 1), ("sr", "prev+ilvr", 1)}
    assert rows["sr", "prev+ilvr", 1]["psnr"] != rows["sr", "prev", 1]["psnr"]
    data = ev.held_out("super-resolution", 3, 16)
    model = ConditionedDenoiser(pixel_backbone.unet, pixel_backbone.schedule,
                                load_entry(sr_zoo / "sr", pixel_backbone.unet, pixel_backbone.fingerprint).adapter)
    bound = ilvr(model.bind(data["condition"], pixel_backbone.encode_text([""] * 3)), data["condition"] * 2 - 1, 4)
    z_0 = sample_prev(bound, initial_noise(range(3), (3, 16, 16)), [999], pixel_backbone.schedule)
    mine = ev.quantise(z_0)
    assert rows["sr", "prev+ilvr", 1]["psnr"] == pytest.approx(float(ev.psnr(mine, ev.quantise(data["target"])).mean()),
                                                               rel=1e-4)


def test_fidelity_rows_are_the_sample_through_the_entrys_module(sr_zoo, pixel_backbone_dir, pixel_backbone, tmp_path,
                                                                 empty_hub):
    """An entry with a fidelity module is measured as served (its default weight) and, with --fidelity, at each w; the
    row by hand: the decoded sample, clamped, through y + w R(y, c)."""
    from cdd.adapters.fidelity import FidelityNet
    from cdd.adapters.zoo import add_fidelity

    zoo = tmp_path / "zoo"
    net = perturbed(FidelityNet(width=8, blocks=1, head=4), 3)
    add_fidelity(sr_zoo / "sr", zoo / "sr", net, default=0.5, training={})
    served, _ = sr_run(zoo, pixel_backbone_dir, tmp_path / "served", "--adapters", "sr")
    swept, _ = sr_run(zoo, pixel_backbone_dir, tmp_path / "swept", "--adapters", "sr", "--fidelity", "0,1")
    plain, _ = sr_run(sr_zoo, pixel_backbone_dir, tmp_path / "plain", "--adapters", "sr")
    by = {r["method"]: r for r in swept["rows"]}
    assert set(by) == {"sr fidelity=0", "sr fidelity=1"} and served["rows"][0]["fidelity"] == 0.5
    assert by["sr fidelity=0"]["psnr"] == pytest.approx(plain["rows"][0]["psnr"])
    data = ev.held_out("super-resolution", 3, 16)
    model = ConditionedDenoiser(pixel_backbone.unet, pixel_backbone.schedule,
                                load_entry(sr_zoo / "sr", pixel_backbone.unet, pixel_backbone.fingerprint).adapter)
    y, _ = ev.generate(model, pixel_backbone, data, pixel_backbone.encode_text([""] * 3), "prev", 1, 0, 2)
    for w, row in ((1.0, by["sr fidelity=1"]), (0.5, served["rows"][0])):
        with torch.no_grad():  # y is 8-bit in [0, 1] here; the row refines the unrounded decode: a level of rounding
            mine = ev.quantise(net(y * 2 - 1, data["condition"] * 2 - 1, w))
        assert row["psnr"] == pytest.approx(float(ev.psnr(mine, ev.quantise(data["target"])).mean()), abs=0.05)
    assert by["sr fidelity=1"]["psnr"] != pytest.approx(by["sr fidelity=0"]["psnr"])
    rc, _, err = run("--task", "super-resolution", "--zoo", zoo, "--backbone", pixel_backbone_dir, "--adapters", "sr",
                     "--fidelity", "2", "--out", tmp_path / "bad")
    assert rc == 2 and "--fidelity: every weight must be in [0, 1]" in err


@pytest.mark.parametrize("argv,message", [
    (["--task", "depth", "--adapters", "a", "--bicubic"], "--bicubic is for super-resolution"),
    (["--task", "depth", "--adapters", "a", "--dataset", "photos"], "--dataset photos is for super-resolution"),
    (["--task", "depth", "--adapters", "a", "--samplers", "prev+ilvr"], "task 'depth' has no low-resolution input"),
    (["--task", "depth", "--adapters", "a", "--samplers", "prev+keep"], "task 'depth' edits no picture"),
    (["--task", "depth"], "--adapters is required"),
    (["--task", "super-resolution", "--bicubic"], "pass --resolution"),
])
def test_super_resolution_options_are_refused_elsewhere(argv, message, zoo, pixel_backbone_dir, tmp_path):
    rc, _, err = run(*argv, "--zoo", zoo, "--backbone", pixel_backbone_dir, "--out", tmp_path / "o")
    assert rc == 2 and message in err, err


def test_text_only_row_is_the_backbone_without_an_adapter(zoo, pixel_backbone_dir, pixel_backbone, tmp_path, empty_hub):
    """--text-only: the backbone sampled from the captions alone, the condition unused, beside the adapters' rows
    (appended to a table that has them); alone it needs --resolution, and it refuses an ILVR sampler."""
    out = tmp_path / "o"
    rc, _, err = run(*common(zoo, pixel_backbone_dir), "--adapters", "a", "--steps", "2", "--out", out,
                     "--attributes", "none")
    assert rc == 0, err
    rc, stdout, err = run(*common(zoo, pixel_backbone_dir), "--text-only", "--resolution", 16, "--samplers", "ddim",
                          "--steps", "2", "--out", out, "--append", "--attributes", "none")
    assert rc == 0, err
    rows = rows_by_key(out)
    row = rows[ev.TEXT_ONLY, "ddim", 2]
    assert ("a", "prev", 2) in rows and row["adapter"] is None and row["kind"] is None
    assert "depth_edge_match" in row and ev.TEXT_ONLY in (out / "results.md").read_text()
    samples = list(itertools.islice(iter(build_dataset("depth", "scenes", size=16, seed=ev.EVAL_SEED)), 3))
    text = pixel_backbone.encode_text([s["text"] for s in samples])
    images, _ = ev.generate(ConditionedDenoiser(pixel_backbone.unet, pixel_backbone.schedule), pixel_backbone,
                            {"condition": torch.zeros(3, 3, 16, 16)}, text, "ddim", 2, 0, 2)  # no condition read
    saved = png(out / row["image"]).astype(np.float64)
    mine = (images * 255).round().numpy().transpose(0, 2, 3, 1).reshape(48, 16, 3)
    assert np.abs(mine - saved).max() <= 1
    rc, _, err = run("--task", "depth", "--backbone", pixel_backbone_dir, "--text-only", "--out", tmp_path / "p")
    assert rc == 2 and "pass --resolution" in err
    rc, _, err = run("--task", "super-resolution", "--backbone", pixel_backbone_dir, "--text-only", "--resolution", 16,
                     "--samplers", "prev+ilvr", "--out", tmp_path / "q")
    assert rc == 2 and "no low-resolution input for NAME+ilvr" in err


def test_grid_labels_cut_short_stay_apart():
    from cdd.training.eval_report import _column_label

    rows = [{"method": m, "sampler": "prev", "steps": 4} for m in ("codi-long", "codi-long-w", "codi")]
    short = [_column_label(r, 64) for r in rows]
    assert short[0] == short[1] == "codi-l. prev 4" and short[2] == "codi prev 4"  # plain cut: they collide
    tails = [_column_label(r, 64, keep_tail=True) for r in rows[:2]]
    assert tails[0] != tails[1] and tails[0].split(" ")[0].endswith("ong") and tails[1].split(" ")[0].endswith("g-w")


def test_keep_sampler_is_the_plain_sample_with_keep_source(latent_backbone):
    """cdd-eval's `prev+keep` row: the `prev` images of the same noise, then samplers.keep_source towards the
    condition (the edit's source) and its round trip through the backbone's autoencoder."""
    from cdd.runtime.diffusion.samplers import keep_source

    bb = latent_backbone
    cond = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model, text = ConditionedDenoiser(bb.unet, bb.schedule), bb.encode_text(["make the cube red"] * 2)
    plain, _ = ev.generate(model, bb, {"condition": cond}, text, "prev", 2, 0, 2)
    kept, _ = ev.generate(model, bb, {"condition": cond}, text, "prev+keep", 2, 0, 2)
    with torch.no_grad():
        z_0 = sample_prev(model.bind(cond, text), initial_noise(range(2), (bb.model_channels, 16 // bb.vae_scale_factor, 16 // bb.vae_scale_factor)), bb.schedule.trailing_timesteps(2),
                          bb.schedule)
        x, source = bb.from_model_space(z_0), cond * 2 - 1
        want = ev.quantise(keep_source(x, source, bb.from_model_space(bb.to_model_space(source))))
    assert (kept - want).abs().max() <= 1 / 255 and (plain - ev.quantise(x)).abs().max() <= 1 / 255
    assert (kept - plain).abs().max() > 2 / 255  # the step changed something: the test is not vacuous


@pytest.mark.parametrize("task,sampler", [("edit", "prev+keep"), ("super-resolution", "prev+ilvr")])
def test_an_entry_whose_manifest_default_has_its_tasks_step_is_measured_with_it(pixel_backbone, tmp_path, task, sampler):
    """With no --samplers an entry is measured with its manifest's sampler, the task's step included (the embedded
    edit entry is served prev+keep, the super-resolution ones prev+ilvr)."""
    adapter = build_adapter("controlnet", pixel_backbone.unet, pixel_backbone.vae_scale_factor)
    save_entry(tmp_path / "e", adapter, name="e", task=task, backbone_fingerprint=pixel_backbone.fingerprint,
               condition={"channels": 3, "range": [0, 1], "resolution": 16}, sampler=sampler)
    [candidate] = ev.resolve_adapters(str(tmp_path / "e"), tmp_path, task, None)
    assert candidate.samplers == [sampler]


def test_strength_rows_start_from_the_input(sr_zoo, pixel_backbone_dir, pixel_backbone, tmp_path, empty_hub):
    """--strength S: a row per strength, labelled, its images the run from the condition noised to the span's first
    timestep (by hand: `start_from` + sample_prev); strength 1 is the row from noise; depth is refused."""
    from cdd.runtime.diffusion.samplers import start_from

    swept, _ = sr_run(sr_zoo, pixel_backbone_dir, tmp_path / "swept", "--adapters", "sr", "--strength", "1,0.25")
    plain, _ = sr_run(sr_zoo, pixel_backbone_dir, tmp_path / "plain", "--adapters", "sr")
    by = {r["method"]: r for r in swept["rows"]}
    assert set(by) == {"sr strength=1", "sr strength=0.25"} and plain["rows"][0]["strength"] == 1
    assert by["sr strength=1"]["psnr"] == pytest.approx(plain["rows"][0]["psnr"])
    data = ev.held_out("super-resolution", 3, 16)
    model = ConditionedDenoiser(pixel_backbone.unet, pixel_backbone.schedule,
                                load_entry(sr_zoo / "sr", pixel_backbone.unet, pixel_backbone.fingerprint).adapter)
    schedule, z_T = pixel_backbone.schedule, initial_noise(range(3), (3, 16, 16))
    z_start = start_from(data["condition"] * 2 - 1, z_T, [249], schedule)
    z_0 = sample_prev(model.bind(data["condition"], pixel_backbone.encode_text([""] * 3)), z_T, [249], schedule,
                      z_start=z_start)
    mine = ev.quantise(z_0)
    assert by["sr strength=0.25"]["psnr"] == pytest.approx(float(ev.psnr(mine, ev.quantise(data["target"])).mean()),
                                                           rel=1e-4)
    assert by["sr strength=0.25"]["psnr"] != pytest.approx(by["sr strength=1"]["psnr"])
    rc, _, err = run("--task", "depth", "--backbone", pixel_backbone_dir, "--adapters", "a", "--strength", "0.5",
                     "--out", tmp_path / "bad")
    assert rc == 2 and "--strength: task 'depth' cannot start from its input" in err
