"""Patches of real photographs: random position, scale and flip, captioned "a photo".

The embedded backbone learns the scenes world and, beside it, what photographs look like, from
the colour photographs bundled with scikit-image and scikit-learn (nothing is downloaded). Some
of them are held out for evaluation (`HELD_OUT`): skimage's astronaut and chelsea (the cat),
which people try as inputs, and sklearn's flower. A user can point `PhotoPatches.from_folder` at
their own photographs instead.

`PhotoPatches` is a plain map-style torch `Dataset`: item i is a patch drawn with a generator
seeded by (seed, i), so a stream of items is a pure function of the seed and the index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .datasets import IMAGE_EXTENSIONS, DataError, _open_image

# "library:name"; stereo_motorcycle is a stereo pair, both views are used.
TRAIN = (
    "skimage:coffee",
    "skimage:rocket",
    "skimage:immunohistochemistry",
    "skimage:retina",
    "skimage:hubble_deep_field",
    "skimage:stereo_motorcycle_left",
    "skimage:stereo_motorcycle_right",
    "sklearn:china",
)
HELD_OUT = ("skimage:astronaut", "skimage:chelsea", "sklearn:flower")
PHOTO_CAPTION = "a photo"


def bundled_photo(name: str) -> np.ndarray:
    """One bundled colour photograph by its "library:name", uint8 HxWx3."""
    library, _, photo = name.partition(":")
    if library == "skimage":
        import skimage.data

        if photo.startswith("stereo_motorcycle_"):
            left, right, _ = skimage.data.stereo_motorcycle()
            image = left if photo.endswith("left") else right
        elif photo in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina", "hubble_deep_field"):
            image = getattr(skimage.data, photo)()
        else:
            raise DataError(f"unknown scikit-image photograph {name!r}")
    elif library == "sklearn":
        from sklearn.datasets import load_sample_image

        image = load_sample_image(f"{photo}.jpg")
    else:
        raise DataError(f"photograph {name!r} is not 'skimage:NAME' or 'sklearn:NAME'")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"photograph {name!r} is {image.shape} {image.dtype}, not uint8 HxWx3")
    return image


class PhotoPatches(Dataset):
    """Square patches of photographs resized to `size`: item i picks a photograph, a side length
    log-uniform between `size` pixels (native resolution) and the photograph's shorter side
    (the whole picture), a random position and a horizontal flip with p = 1/2.

    Items are {"image": float tensor 3 x size x size in [-1, 1], "text": caption}."""

    def __init__(self, photos: Sequence[np.ndarray], size: int = 64, seed: int = 0, caption: str = PHOTO_CAPTION,
                 length: int = 10**9, names: Sequence[str] | None = None):
        if not photos:
            raise DataError("PhotoPatches needs at least one photograph")
        for k, p in enumerate(photos):
            if min(p.shape[:2]) < size:
                where = names[k] if names else f"photograph {k}"
                raise DataError(f"{where} is {p.shape[1]}x{p.shape[0]}, smaller than the {size}x{size} patch")
        self.photos = [Image.fromarray(p) for p in photos]
        self.names = list(names) if names else [f"photo {k}" for k in range(len(photos))]
        self.size, self.seed, self.caption, self.length = size, seed, caption, length

    @classmethod
    def bundled(cls, split: str = "train", **kwargs) -> PhotoPatches:
        """The bundled photographs: split "train" (TRAIN) or "held-out" (HELD_OUT)."""
        names = {"train": TRAIN, "held-out": HELD_OUT}.get(split)
        if names is None:
            raise DataError(f"split must be 'train' or 'held-out', got {split!r}")
        return cls([bundled_photo(n) for n in names], names=names, **kwargs)

    @classmethod
    def from_folder(cls, root: str | Path, **kwargs) -> PhotoPatches:
        """Every image under `root` (recursively), e.g. your own photographs."""
        files = sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        return cls([np.asarray(_open_image(p, str(p))) for p in files], names=[str(p) for p in files], **kwargs)

    def __len__(self) -> int:
        return self.length

    def patch(self, rng: np.random.Generator) -> np.ndarray:
        """One random patch, float32 size x size x 3 in [0, 1]."""
        photo = self.photos[int(rng.integers(len(self.photos)))]
        w, h = photo.size
        side = int(round(math.exp(rng.uniform(math.log(self.size), math.log(min(w, h))))))
        left, top = int(rng.integers(w - side + 1)), int(rng.integers(h - side + 1))
        crop = photo.crop((left, top, left + side, top + side)).resize((self.size, self.size), Image.BICUBIC)
        image = np.asarray(crop, dtype=np.float32) / 255.0
        return image[:, ::-1] if rng.random() < 0.5 else image

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(i)
        image = self.patch(np.random.default_rng([self.seed, i]))
        return {"image": torch.from_numpy(image.copy()).permute(2, 0, 1) * 2 - 1, "text": self.caption}
