"""Task datasets: super-resolution, depth-to-image and instructed editing, on the scenes
world or on real data, as endless streams of

    {"condition": float32 [3, H, W] in [0, 1],   # diffusers ControlNet convention
     "target":    float32 [3, H, W] in [-1, 1],
     "text":      str}

Every stream is deterministic from its seed. Sample k of the global sequence is drawn
from (seed, k) alone; a DataLoader worker w of W on process r of R yields the samples
k = (r * W + w) + j * R * W, j = 0, 1, ..., so workers and processes never repeat each
other and a DataLoader's round-robin over its workers replays the single-process order.
Real datasets are read in a fresh permutation each pass (from (seed, pass)).

`build_dataset` is the one entry point the training code calls.
"""

from __future__ import annotations

import io
import itertools
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from cdd.training.data import scenes
from cdd.training.data.degradations import DegradationConfig, make_sr_pair

PHOTO_STREAM = 2  # the third word of a sample's photo draw: (seed, k, PHOTO_STREAM), apart from the scene's (seed, k)

TASKS = ("super-resolution", "depth", "edit")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class DataError(ValueError):
    """A dataset that cannot be used as given (bad layout, values or options)."""


class ColumnNotFoundError(DataError):
    """A configured column is missing from a dataset."""


class ImageReadError(DataError):
    """An image file or cell that cannot be decoded (or cannot be used)."""


# ---------------------------------------------------------------------------------------
# Shared helpers


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}, expected one of {TASKS}")


def _stream(rank: int, world_size: int) -> tuple[int, int]:
    """(this stream's index, number of streams) over processes x DataLoader workers."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world_size * workers


def _sample_rng(seed: int, k: int) -> np.random.Generator:
    return np.random.default_rng([seed, k])


def _torch_generator(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """float [H, W, 3] in [0, 1] -> [3, H, W]."""
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1).contiguous()


def _pil_to_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32) / 255.0


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """diffusers train_controlnet.py: Resize(size, bilinear) on the short side, CenterCrop."""
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _open_image(source, what: str) -> Image.Image:
    """Decode a path, bytes, PIL image or array into RGB, naming `what` on failure."""
    try:
        if isinstance(source, Image.Image):
            img = source
        elif isinstance(source, (bytes, bytearray)):
            img = Image.open(io.BytesIO(source))
        elif isinstance(source, (str, os.PathLike)):
            img = Image.open(source)
        else:
            img = Image.fromarray(np.asarray(source))
        img.load()
        return img.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
        raise ImageReadError(f"cannot read image {what}: {type(e).__name__}: {e}") from e


def _pick_text(value, where: str, rng: np.random.Generator) -> str:
    # As train_controlnet.py: a list of captions means one at random.
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return value[int(rng.integers(len(value)))]
    if not isinstance(value, str):
        raise DataError(f"caption {where} must be a string or a list of strings, got {value!r}")
    return value


def _sr_from_hr(hr: np.ndarray, rng: np.random.Generator, degradation: DegradationConfig) -> dict:
    """A super-resolution sample from a clean high-resolution image [H, W, 3] in [0, 1]."""
    target = _to_tensor(hr)
    pair = make_sr_pair(target[None], _torch_generator(rng), degradation)
    return {"condition": pair.condition[0], "target": target * 2 - 1}


# ---------------------------------------------------------------------------------------
# The scenes world


class ScenesDataset(IterableDataset):
    """Endless task samples rendered from the procedural scenes world.

    super-resolution: condition = Real-ESRGAN-degraded render, x4 down then bicubic back;
                      text = the caption ("" with sr_caption=False). With photo_fraction > 0,
                      that share of the samples is a photo patch instead (`photos`, default
                      the bundled training photographs, never the held-out ones), text
                      "a photo" (or "").
    depth:            condition = normalised inverse depth (near = bright) on 3 channels;
                      text = the caption.
    edit:             condition = the source render; target = the edited render;
                      text = the instruction.
    """

    def __init__(self, task: str, size: int = 64, seed: int = 0, rank: int = 0, world_size: int = 1,
                 supersample: int = 2, sr_caption: bool = True,
                 degradation: DegradationConfig | None = None, photo_fraction: float = 0.0,
                 photos=None):
        _check_task(task)
        self.task, self.size, self.seed = task, size, seed
        self.rank, self.world_size = rank, world_size
        self.supersample, self.sr_caption = supersample, sr_caption
        self.degradation = degradation or DegradationConfig()
        if task == "super-resolution" and size % self.degradation.scale:
            raise DataError(f"size {size} is not divisible by the super-resolution scale "
                            f"{self.degradation.scale}")
        if not 0 <= photo_fraction <= 1:
            raise DataError(f"photo_fraction must be in [0, 1], got {photo_fraction}")
        if photo_fraction and task != "super-resolution":
            # A photo has no depth map and no edit: only super-resolution can make a pair of it.
            raise DataError(f"photo_fraction is for super-resolution, not {task!r} "
                            "(photographs have no depth map or edited version)")
        self.photo_fraction = photo_fraction
        self.photos = None
        if photo_fraction:
            from cdd.training.data.photos import PhotoPatches

            self.photos = photos if photos is not None else PhotoPatches.bundled("train", size=size)

    def _photo(self, k: int) -> dict | None:
        """Sample k as a photo patch, or None when it is a scene. Drawn from its own generator
        (seed, k, PHOTO_STREAM), so the scenes keep their places in the stream whatever the fraction."""
        if not self.photo_fraction:
            return None
        rng = np.random.default_rng([self.seed, k, PHOTO_STREAM])
        if rng.random() >= self.photo_fraction:
            return None
        out = _sr_from_hr(self.photos.patch(rng), rng, self.degradation)
        out["text"] = self.photos.caption if self.sr_caption else ""
        return out

    def sample(self, k: int) -> dict:
        """Sample k of the global sequence (what some stream yields as its k-th overall)."""
        photo = self._photo(k)
        if photo is not None:
            return photo
        rng = _sample_rng(self.seed, k)
        spec = scenes.sample_scene(rng)
        source = scenes.render(spec, self.size, self.supersample)
        if self.task == "edit":
            edit = scenes.sample_edit(spec, rng)
            edited = scenes.render(edit.spec, self.size, self.supersample)
            return {"condition": _to_tensor(source.image),
                    "target": _to_tensor(edited.image) * 2 - 1,
                    "text": edit.instruction,
                    "caption": scenes.caption(edit.spec)}  # the edited scene's (cdd-eval's caption agreement)
        text = scenes.caption(spec)
        if self.task == "depth":
            cond = np.repeat(scenes.depth_to_condition(source.depth)[..., None], 3, axis=-1)
            return {"condition": _to_tensor(cond), "target": _to_tensor(source.image) * 2 - 1,
                    "text": text}
        out = _sr_from_hr(source.image, rng, self.degradation)
        out["text"] = text if self.sr_caption else ""
        return out

    def __iter__(self):
        s, n = _stream(self.rank, self.world_size)
        for j in itertools.count():
            yield self.sample(s + j * n)


# ---------------------------------------------------------------------------------------
# Real data: records read in per-pass permutations


class _RecordsDataset(IterableDataset):
    """Base for finite datasets streamed endlessly: subclasses give `__len__` and
    `load(i, rng) -> sample dict`."""

    def __init__(self, task: str, size: int, seed: int, rank: int, world_size: int):
        _check_task(task)
        self.task, self.size, self.seed = task, size, seed
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, i: int, rng: np.random.Generator) -> dict:
        raise NotImplementedError

    def sample(self, k: int) -> dict:
        n = len(self)
        epoch, pos = divmod(k, n)
        cached = getattr(self, "_order", None)
        if cached is None or cached[0] != epoch:  # one permutation per pass, not per sample
            cached = self._order = (epoch, np.random.default_rng([self.seed, epoch, 1]).permutation(n))
        return self.load(int(cached[1][pos]), _sample_rng(self.seed, k))

    def __iter__(self):
        s, n = _stream(self.rank, self.world_size)
        for j in itertools.count():
            yield self.sample(s + j * n)


class _PairedRecords(_RecordsDataset):
    """Records with a target image, an optional conditioning image and an optional text.

    Without a conditioning column (`conditioning_image_column=None`) only super-resolution
    works: the condition is made from the target with the degradation pipeline.
    """

    def __init__(self, task, size, seed, rank, world_size, image_column, conditioning_image_column,
                 caption_column, degradation: DegradationConfig | None):
        super().__init__(task, size, seed, rank, world_size)
        self.image_column = image_column
        self.conditioning_image_column = conditioning_image_column
        self.caption_column = caption_column
        self.degradation = degradation or DegradationConfig()
        if conditioning_image_column is None and task != "super-resolution":
            raise DataError(f"task {task!r} needs a conditioning image column "
                            "(only super-resolution can make its condition from the image)")
        if conditioning_image_column is None and size % self.degradation.scale:
            raise DataError(f"size {size} is not divisible by the super-resolution scale "
                            f"{self.degradation.scale}")

    def row(self, i: int) -> tuple[Image.Image, Image.Image | None, object, str]:
        """(image, conditioning image or None, caption value or None, where-description)."""
        raise NotImplementedError

    def load(self, i, rng):
        image, cond, caption, where = self.row(i)
        text = "" if caption is None else _pick_text(caption, where, rng)
        if cond is None:
            hr = _random_crop(image, self.size, rng, where)
            out = _sr_from_hr(_pil_to_array(hr), rng, self.degradation)
        else:
            out = {"condition": _to_tensor(_pil_to_array(_resize_center_crop(cond, self.size))),
                   "target": _to_tensor(_pil_to_array(_resize_center_crop(image, self.size))) * 2 - 1}
        out["text"] = text
        return out


def _random_crop(img: Image.Image, size: int, rng: np.random.Generator, where: str) -> Image.Image:
    w, h = img.size
    if w < size or h < size:
        raise ImageReadError(f"image {where} is {w}x{h}, smaller than the {size}x{size} crop")
    left, top = int(rng.integers(w - size + 1)), int(rng.integers(h - size + 1))
    return img.crop((left, top, left + size, top + size))


def _metadata_key(row: dict, column: str) -> str | None:
    """The key holding `column` in a metadata row, with the imagefolder conventions:
    `file_name` is the `image` column and `<name>_file_name` is the `<name>` column."""
    for key in (column, f"{column}_file_name") + (("file_name",) if column == "image" else ()):
        if key in row:
            return key
    return None


class ImageFolderDataset(_PairedRecords):
    """A Hugging Face imagefolder: `metadata.jsonl` beside the images, one JSON object a
    line, image paths relative to the folder."""

    def __init__(self, root, task: str, size: int = 64, seed: int = 0, rank: int = 0, world_size: int = 1,
                 image_column: str = "image", conditioning_image_column: str | None = "conditioning_image",
                 caption_column: str | None = "text", degradation: DegradationConfig | None = None):
        super().__init__(task, size, seed, rank, world_size, image_column, conditioning_image_column,
                         caption_column, degradation)
        self.root = Path(root)
        meta = self.root / "metadata.jsonl"
        self.rows: list[tuple[Path, Path | None, object, str]] = []
        with open(meta, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{meta}:{line_no}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON: {e}") from e
                self.rows.append(self._parse(row, where))
        if not self.rows:
            raise DataError(f"{meta} lists no images")

    def _parse(self, row: dict, where: str):
        def column(name):
            key = _metadata_key(row, name)
            if key is None:
                raise ColumnNotFoundError(f"column {name!r} not found in {where} "
                                          f"(columns: {sorted(row)})")
            return row[key]

        def path(name):
            p = self.root / column(name)
            if not p.is_file():
                raise ImageReadError(f"image {p} (column {name!r}, {where}) does not exist")
            return p

        image = path(self.image_column)
        cond = path(self.conditioning_image_column) if self.conditioning_image_column else None
        caption = column(self.caption_column) if self.caption_column else None
        return image, cond, caption, where

    def __len__(self):
        return len(self.rows)

    def row(self, i):
        image, cond, caption, where = self.rows[i]
        return (_open_image(image, f"{image} (column {self.image_column!r}, {where})"),
                None if cond is None else
                _open_image(cond, f"{cond} (column {self.conditioning_image_column!r}, {where})"),
                caption, where)


class DiskDataset(_PairedRecords):
    """A dataset written with `datasets.Dataset.save_to_disk` (a DatasetDict: `split`)."""

    def __init__(self, path, task: str, size: int = 64, seed: int = 0, rank: int = 0, world_size: int = 1,
                 image_column: str = "image", conditioning_image_column: str | None = "conditioning_image",
                 caption_column: str | None = "text", split: str = "train",
                 degradation: DegradationConfig | None = None):
        super().__init__(task, size, seed, rank, world_size, image_column, conditioning_image_column,
                         caption_column, degradation)
        import datasets  # optional dependency (the `test` extra), imported only for this loader

        self.path = Path(path)
        ds = datasets.load_from_disk(str(self.path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"split {split!r} not in {self.path} (splits: {sorted(ds)})")
            ds = ds[split]
        for name in (image_column, conditioning_image_column, caption_column):
            if name is not None and name not in ds.column_names:
                raise ColumnNotFoundError(f"column {name!r} not found in {self.path} "
                                          f"(columns: {ds.column_names})")
        # Decode images here rather than in `datasets`, so a bad cell names its row.
        for name in (image_column, conditioning_image_column):
            if name is not None and isinstance(ds.features[name], datasets.Image):
                ds = ds.cast_column(name, datasets.Image(decode=False))
        if len(ds) == 0:
            raise DataError(f"{self.path} holds no rows")
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def _image(self, value, column: str, i: int) -> Image.Image:
        what = f"in column {column!r}, row {i} of {self.path}"
        if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes", "path"}
            if value.get("bytes") is not None:
                return _open_image(value["bytes"], f"{what} ({value.get('path') or 'bytes'})")
            value = value.get("path")
        if isinstance(value, str):
            p = Path(value) if os.path.isabs(value) else self.path / value
            return _open_image(p, f"{p} ({what})")
        if value is None:
            raise ImageReadError(f"no image {what}")
        return _open_image(value, what)

    def row(self, i):
        r = self.ds[i]
        where = f"row {i} of {self.path}"
        cond = (None if self.conditioning_image_column is None else
                self._image(r[self.conditioning_image_column], self.conditioning_image_column, i))
        caption = None if self.caption_column is None else r[self.caption_column]
        return self._image(r[self.image_column], self.image_column, i), cond, caption, where


class HRFolderDataset(_RecordsDataset):
    """Super-resolution from a plain folder of high-resolution images (searched
    recursively): random size x size crops, degraded with the Real-ESRGAN pipeline."""

    def __init__(self, root, task: str = "super-resolution", size: int = 64, seed: int = 0,
                 rank: int = 0, world_size: int = 1, degradation: DegradationConfig | None = None):
        if task != "super-resolution":
            raise DataError(f"a plain image folder serves only super-resolution, not {task!r}; "
                            "other tasks need metadata.jsonl with a conditioning image column")
        super().__init__(task, size, seed, rank, world_size)
        self.root = Path(root)
        self.degradation = degradation or DegradationConfig()
        if size % self.degradation.scale:
            raise DataError(f"size {size} is not divisible by the super-resolution scale "
                            f"{self.degradation.scale}")
        self.files = sorted(p for p in self.root.rglob("*")
                            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")

    def __len__(self):
        return len(self.files)

    def load(self, i, rng):
        path = self.files[i]
        hr = _random_crop(_open_image(path, str(path)), self.size, rng, str(path))
        out = _sr_from_hr(_pil_to_array(hr), rng, self.degradation)
        out["text"] = ""
        return out


# ---------------------------------------------------------------------------------------
# The factory


def build_dataset(task: str, data: str | os.PathLike = "scenes", size: int = 64, seed: int = 0,
                  rank: int = 0, world_size: int = 1, **opts) -> IterableDataset:
    """The dataset for `task` ("super-resolution", "depth" or "edit").

    data: "scenes" (the procedural world; opts: supersample, sr_caption, degradation,
    photo_fraction and photos for super-resolution), or a
    path to one of
      - an imagefolder with metadata.jsonl (opts: image_column, conditioning_image_column,
        caption_column, degradation),
      - a `save_to_disk` dataset (the same opts, and split),
      - for super-resolution, a plain folder of high-resolution images (opts: degradation).
    rank / world_size: this process among the distributed processes (accelerate's
    process_index / num_processes); DataLoader workers are split automatically.
    """
    _check_task(task)
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
    if size < 8:
        raise DataError(f"size must be at least 8, got {size}")
    common = dict(task=task, size=size, seed=seed, rank=rank, world_size=world_size)
    if isinstance(data, str) and data == "scenes":
        return ScenesDataset(**common, **opts)
    path = Path(data)
    if not path.exists():
        raise DataError(f"dataset {str(data)!r} is neither 'scenes' nor an existing path")
    if (path / "metadata.jsonl").is_file():
        return ImageFolderDataset(path, **common, **opts)
    if any((path / f).is_file() for f in ("state.json", "dataset_dict.json", "dataset_info.json")):
        return DiskDataset(path, **common, **opts)
    if path.is_dir() and task == "super-resolution":
        return HRFolderDataset(path, **common, **opts)
    raise DataError(f"{path} is not a dataset for {task!r}: expected metadata.jsonl (imagefolder), "
                    "a datasets.save_to_disk folder, or (super-resolution only) a folder of images")
