"""Training data: captioned images from a folder (kohya's layout) or from memory, bucketed by aspect ratio.

Folder layout (kohya sd-scripts' DreamBooth convention)::

    data/                   images directly here: repeats 1 (or N when the folder itself is named N_name)
      10_sks dog/           N_name: every image in it counts N times per epoch
        a.png  a.txt        same-name caption file (first non-empty line); no .txt → reported
      notes/                other sub-folders are reported and ignored

Problems (an unreadable image, a missing caption) never stop a run midway: every file is looked at before the
first step (`scan_folder` lists them, `load_pixels` decodes them while latents are cached), each problem goes into a
`DataReport`, and the file is left out (``on_bad_data="skip"``) or the run refuses to start (``"error"``).

Batches come from one bucket at a time (same latent shape); the order of epoch ``e`` depends only on (seed, e), so a
resumed run sees exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageOps

from ..errors import LoraValueError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")

ImageLoader = Callable[[], Image.Image]


@dataclass(frozen=True)
class DataItem:
    """One training image before decoding: where it comes from, its caption and how often an epoch shows it."""

    source: str  # file path, or "images[i]" for in-memory data
    caption: str  # as written by the user, trigger word not yet added
    repeats: int
    folder: str  # dataset folder name (kohya's ss_tag_frequency / ss_dataset_dirs key)
    load: ImageLoader = field(repr=False, compare=False)
    encoded: Encoded | None = field(default=None, repr=False, compare=False)  # precomputed: no image to decode


@dataclass(frozen=True)
class Encoded:
    """A sample whose encoders already ran (ComfyUI's LATENT / CONDITIONING): nothing left to decode or encode.

    ``latents``: (C, h, w), already scaled as the denoiser sees them (the host's ``process_latents``).
    ``cond``: the conditioning tensors without batch dim (whatever the host's ``predict`` reads), or None when the
    caption is to be encoded by the host as usual.
    """

    latents: torch.Tensor
    cond: dict[str, torch.Tensor] | None = None


@dataclass
class DataReport:
    """What went in and what was left out, with the reason for each file."""

    used: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    ignored_folders: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{len(self.used)} images used"
        if self.skipped:
            shown = "; ".join(f"{path}: {why}" for path, why in self.skipped[:10])
            more = f" … (+{len(self.skipped) - 10} more)" if len(self.skipped) > 10 else ""
            text += f", {len(self.skipped)} left out ({shown}{more})"
        if self.ignored_folders:
            text += f", ignored folders without an N_ repeat prefix: {', '.join(self.ignored_folders)}"
        return text


@dataclass
class Dataset:
    """The items to train on plus the report of what was left out while listing them."""

    items: list[DataItem]
    report: DataReport = field(default_factory=DataReport)

    @classmethod
    def from_folder(cls, path: str | Path, *, caption_extension: str = ".txt") -> Dataset:
        return scan_folder(path, caption_extension=caption_extension)

    @classmethod
    def from_images(
        cls,
        images: Sequence[Image.Image] | torch.Tensor,
        captions: Sequence[str] | str,
        *,
        name: str = "images",
        repeats: int = 1,
    ) -> Dataset:
        """In-memory data (the ComfyUI path): PIL images, or an IMAGE tensor (B, H, W, 3) in [0, 1].

        ``captions``: one per image, or one string for all.
        """
        pil = _to_pil_list(images)
        caps = [captions] * len(pil) if isinstance(captions, str) else list(captions)
        if len(caps) != len(pil):
            raise LoraValueError(f"{len(pil)} images but {len(caps)} captions", hint="give one caption per image")
        items = [
            DataItem(f"{name}[{i}]", cap.strip(), repeats, f"{repeats}_{name}", _constant(img))
            for i, (img, cap) in enumerate(zip(pil, caps))
        ]
        return cls(items)

    @classmethod
    def from_latents(
        cls,
        latents: torch.Tensor,
        captions: Sequence[str] | str = "",
        *,
        conds: Sequence[dict[str, torch.Tensor]] | None = None,
        name: str = "latents",
        repeats: int = 1,
    ) -> Dataset:
        """Pre-encoded data: scaled ``latents`` (N, C, h, w), and per sample a conditioning dict (``conds``, one
        for all or one each) or a caption for the host to encode. Captions still feed the metadata."""
        if latents.ndim != 4 or len(latents) == 0:
            raise LoraValueError(f"latents must be a non-empty (N, C, h, w) batch, got {tuple(latents.shape)}")
        n = len(latents)
        caps = [captions] * n if isinstance(captions, str) else list(captions)
        if len(caps) == 1 and n > 1:
            caps = caps * n
        if len(caps) != n:
            raise LoraValueError(f"{n} latents but {len(caps)} captions", hint="give one caption, or one per latent")
        per = list(conds) if conds is not None else [None] * n
        if len(per) == 1 and n > 1:
            per = per * n
        if len(per) != n:
            raise LoraValueError(f"{n} latents but {len(per)} conditionings", hint="give one, or one per latent")
        items = [
            DataItem(f"{name}[{i}]", cap.strip(), repeats, f"{repeats}_{name}", _no_image,
                     Encoded(latents[i], dict(cond) if cond is not None else None))
            for i, (cap, cond) in enumerate(zip(caps, per))
        ]
        return cls(items)


def _no_image() -> Image.Image:
    raise LoraValueError("this sample is pre-encoded: it has no image")


def _constant(image: Image.Image) -> ImageLoader:
    return lambda: image


def _to_pil_list(images: Sequence[Image.Image] | torch.Tensor) -> list[Image.Image]:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[-1] not in (3, 4):
            raise LoraValueError(f"IMAGE tensor must be (B, H, W, 3), got {tuple(images.shape)}")
        arr = (images[..., :3].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return [Image.fromarray(a, "RGB") for a in arr]
    return list(images)


# ------------------------------------------------------------------------------------------------ folders


def _read_caption(path: Path) -> str:
    text = path.read_text(encoding="utf-8-sig")
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _file_loader(path: Path) -> ImageLoader:
    def load() -> Image.Image:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img)

    return load


def _scan_images(folder: Path, repeats: int, caption_extension: str, out: Dataset) -> None:
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
        caption_file = path.with_suffix(caption_extension)
        if not caption_file.is_file():
            out.report.skipped.append((str(path), f"no caption file {caption_file.name}"))
            continue
        try:
            caption = _read_caption(caption_file)
        except (OSError, UnicodeDecodeError) as err:
            out.report.skipped.append((str(path), f"unreadable caption {caption_file.name} ({err})"))
            continue
        out.items.append(DataItem(str(path), caption, repeats, folder.name, _file_loader(path)))


def scan_folder(path: str | Path, *, caption_extension: str = ".txt") -> Dataset:
    """List the captioned images under ``path`` (kohya layout); images are decoded later, by `load_pixels`."""
    root = Path(path)
    if not root.is_dir():
        raise LoraValueError("training data folder not found", hint=str(root))
    out = Dataset([])
    own = REPEAT_FOLDER.match(root.name)
    _scan_images(root, int(own.group(1)) if own else 1, caption_extension, out)
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = REPEAT_FOLDER.match(sub.name)
        if match is None:
            out.report.ignored_folders.append(sub.name)
            continue
        if int(match.group(1)) < 1:
            out.report.ignored_folders.append(sub.name)
            continue
        _scan_images(sub, int(match.group(1)), caption_extension, out)
    return out


def with_trigger(caption: str, trigger: str) -> str:
    """``trigger, caption`` (just the trigger for an empty caption; unchanged if it already starts with it)."""
    trigger = trigger.strip()
    if not trigger or caption.startswith(trigger):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def tag_frequency(items: Sequence[DataItem], captions: Sequence[str]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: folder → {comma-separated tag: number of captions with it}."""
    freq: dict[str, Counter] = {}
    for item, caption in zip(items, captions):
        tags = {t.strip() for t in caption.split(",") if t.strip()}
        freq.setdefault(item.folder, Counter()).update(tags)
    return {folder: dict(sorted(c.items())) for folder, c in sorted(freq.items())}


# ------------------------------------------------------------------------------------------------ buckets

Size = tuple[int, int]  # (width, height)


def make_buckets(resolution: int, step: int, min_size: int, max_size: int) -> list[Size]:
    """Bucket sizes (w, h), multiples of ``step``, each with at most resolution² pixels (kohya's rule)."""
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    for w in range(min_size, max_size + 1, step):
        h = min(max_size, (area // w) // step * step)
        if h >= min_size:
            buckets.add((w, h))
            buckets.add((h, w))
    return sorted(buckets)


def pick_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is closest (in log space) to the image's; ties go to the larger bucket."""
    w, h = size
    ratio = math.log(w / h)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def fit_to_bucket(image: Image.Image, bucket: Size) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize to cover ``bucket`` and centre-crop: pixels (3, H, W) in [-1, 1] and the crop's (top, left)."""
    image = image.convert("RGB")
    w, h = image.size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (rw, rh) != (w, h):
        image = image.resize((rw, rh), Image.Resampling.BICUBIC)
    left, top = (rw - bw) // 2, (rh - bh) // 2
    image = image.crop((left, top, left + bw, top + bh))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(bh, bw, 3)  # (H, W, 3)
    pixels = pixels.permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W)
    return pixels, (top, left)


@dataclass(frozen=True)
class LoadedImage:
    """A decoded, bucketed training image: pixels plus SDXL's micro-conditioning numbers."""

    item: DataItem
    pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    original_size: Size  # (w, h) before resizing
    crop_top_left: tuple[int, int]


def load_pixels(
    items: Sequence[DataItem], buckets: Sequence[Size], report: DataReport
) -> list[LoadedImage]:
    """Decode and bucket every image; an unreadable one goes into ``report.skipped`` instead of raising."""
    out = []
    for item in items:
        try:
            image = item.load()
            size = image.size
            if min(size) < 1:
                raise ValueError("empty image")
            pixels, crop = fit_to_bucket(image, pick_bucket(size, buckets))
        except Exception as err:  # PIL raises many kinds (UnidentifiedImageError, OSError, DecompressionBomb…)
            report.skipped.append((item.source, f"unreadable image ({type(err).__name__}: {err})"))
            continue
        report.used.append(item.source)
        out.append(LoadedImage(item, pixels, size, crop))
    return out


# ------------------------------------------------------------------------------------------------ batches


def epoch_batches(buckets: Sequence[int], repeats: Sequence[int], batch_size: int, seed: int, epoch: int
                  ) -> list[list[int]]:
    """The global batches of one epoch: lists of sample indices, each from one bucket, each exactly ``batch_size``.

    ``buckets[i]`` is sample i's bucket id; sample i appears ``repeats[i]`` times. A bucket's last short batch is
    filled up from the start of the same bucket's shuffled list, so every batch has the same size (which keeps
    data-parallel shards equal). The order depends only on (seed, epoch).
    """
    gen = torch.Generator().manual_seed(mix_seed(seed, epoch, 0x5EED))
    by_bucket: dict[int, list[int]] = {}
    for i, (b, n) in enumerate(zip(buckets, repeats)):
        by_bucket.setdefault(b, []).extend([i] * n)
    batches: list[list[int]] = []
    for b in sorted(by_bucket):
        pool = by_bucket[b]
        order = [pool[j] for j in torch.randperm(len(pool), generator=gen).tolist()]
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            while len(batch) < batch_size:  # wrap around within the bucket
                batch.extend(order[: batch_size - len(batch)])
            batches.append(batch)
    return [batches[j] for j in torch.randperm(len(batches), generator=gen).tolist()]


def mix_seed(*numbers: int) -> int:
    """A 63-bit seed from several integers (stable across runs and platforms)."""
    h = 1469598103934665603
    for n in numbers:
        h = ((h ^ (n & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF
