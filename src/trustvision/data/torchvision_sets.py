"""Datasets stored on disk in torchvision's layouts: MNIST, Fashion-MNIST, CIFAR, SVHN, folders.

The files are read directly (IDX, CIFAR pickle batches, SVHN ``.mat``, image folders), so files
placed by hand work as well as files fetched by torchvision. Nothing is downloaded unless
``download=True``; then torchvision's own downloader fetches and checks them.

* Root: the ``root`` argument, else ``$TRUSTVISION_DATA``, else ``~/.cache/trustvision/data``.
  Layout (as torchvision writes it): ``<root>/MNIST/raw/train-images-idx3-ubyte[.gz]`` ...,
  ``<root>/FashionMNIST/raw/...``, ``<root>/cifar-10-batches-py/data_batch_1..5, test_batch,
  batches.meta``, ``<root>/cifar-100-python/train, test, meta``,
  ``<root>/train_32x32.mat, test_32x32.mat`` (SVHN).
* Splits: ``test`` is the official test split; the official training split is cut into
  ``train`` and ``val`` (10% of each class, fixed seed, same every call).
* ``imagefolder:PATH``: ``PATH/<class>/<image>`` or ``PATH/{train,val,test}/<class>/<image>``.
  With split folders, a missing ``val`` is cut from ``train`` (10%); without them all images are
  split 60/15/25 per class. Every split is resized (bilinear) to one size and converted to one
  channel count: those of the first training image, or ``image_size=(H, W)`` / ``channels=1|3``.
  Files without an image extension and hidden files are ignored; a corrupt image anywhere in the
  folder, an empty class folder or fewer than 2 classes is a one-line error (see
  :func:`load_imagefolder`).

Images are uint8 in memory and become float32 (C, H, W) in [0, 1] when indexed.
"""

from __future__ import annotations

import copy
import functools
import gzip
import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from trustvision.data import register_dataset
from trustvision.data._base import SPLITS, ImageDataset, _as_indices
from trustvision.data.embedded import SPLIT_FRACTIONS, stratified_split
from trustvision.errors import TrustVisionError

__all__ = [
    "ArrayImageDataset",
    "ImageFolderDataset",
    "VAL_FRACTION",
    "default_root",
    "read_idx",
]

#: Fraction of each class of the official training split kept apart as ``val``.
VAL_FRACTION = 0.1
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def default_root(root: str | os.PathLike | None = None) -> Path:
    """``root`` if given, else ``$TRUSTVISION_DATA``, else ``~/.cache/trustvision/data``."""
    if root is None:
        root = os.environ.get("TRUSTVISION_DATA") or Path.home() / ".cache" / "trustvision" / "data"
    return Path(root).expanduser()


def _not_found(name: str, root: Path) -> TrustVisionError:
    return TrustVisionError(
        f"{name} not found under {root}; fetch it once with `trustvision train --data {name} --download` "
        "(download=True in Python), or point --data-dir (root= in Python) at a folder that holds it"
    )


def _corrupt(path: Path, what: str, detail: str = "") -> TrustVisionError:
    detail = f" ({detail})" if detail else ""
    return TrustVisionError(
        f"{path} is not a valid {what} file{detail}; delete it and fetch it again (`trustvision train "
        "--download`, download=True in Python) or replace it"
    )


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size


class ArrayImageDataset(ImageDataset):
    """uint8 images (N, C, H, W) held in memory, a subset ``indices`` of them exposed as a split.

    ``labels`` (len(self),) int64 are the labels of the exposed items.
    """

    def __init__(self, data, labels, indices, classes: Sequence[str], name: str, split: str):
        self.data = torch.as_tensor(data)
        self.indices = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        self.labels = torch.as_tensor(np.asarray(labels))[self.indices].long()
        self.classes = list(classes)
        self.name = name
        self.split = split
        self.num_channels = int(self.data.shape[1])
        self.image_size = (int(self.data.shape[2]), int(self.data.shape[3]))

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, idx: int):
        image = self.data[self.indices[idx]].to(torch.float32).div_(255.0)
        return image, int(self.labels[idx])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All exposed images as float32 (N, C, H, W) in [0, 1] and their labels (N,)."""
        return self.data[self.indices].to(torch.float32).div_(255.0), self.labels.clone()

    def subset(self, indices) -> "ArrayImageDataset":
        """The items at ``indices``, sharing the uint8 array (no pixels are copied)."""
        idx = _as_indices(indices, len(self))
        out = copy.copy(self)
        out.indices, out.labels, out.classes = self.indices[idx], self.labels[idx], list(self.classes)
        return out


def _split_official(
    name: str, split: str, train, test, classes, val_fraction: float
) -> ArrayImageDataset:
    """train/val from the official training arrays (stratified cut), test from the test arrays."""
    if split == "test":
        data, labels = test
        return ArrayImageDataset(data, labels, np.arange(len(labels)), classes, name, split)
    data, labels = train
    parts = stratified_split(labels, (1.0 - val_fraction, val_fraction))
    return ArrayImageDataset(data, labels, parts[0 if split == "train" else 1], classes, name, split)


def _check_val_fraction(val_fraction: float) -> float:
    if not 0.0 < float(val_fraction) < 1.0:
        raise TrustVisionError(f"val_fraction must be between 0 and 1, got {val_fraction}; e.g. 0.1")
    return float(val_fraction)


def _download(name: str, root: Path, fetch) -> None:
    try:
        fetch()
    except TrustVisionError:
        raise
    except Exception as err:  # network, checksum or disk errors from torchvision
        msg = " ".join(str(err).split())[:200]
        raise TrustVisionError(
            f"could not download {name} to {root} ({msg}); check the network or place the files "
            "there by hand and point --data-dir (root= in Python) at them"
        ) from None


# ---------------------------------------------------------------------------- MNIST family
def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes; the MNIST storage format."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise _corrupt(path, "IDX", str(err)) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise _corrupt(path, "IDX", "bad magic number")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _corrupt(path, "IDX", "truncated header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) - header != int(np.prod(dims)):
        raise _corrupt(path, "IDX", f"expected {int(np.prod(dims))} bytes of data for shape {dims}")
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=header).reshape(dims)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(key: tuple[str, int, int]) -> np.ndarray:
    return read_idx(Path(key[0]))


def _find_idx(raw: Path, stem: str) -> Path | None:
    for candidate in (raw / stem, raw / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _mnist_part(raw: Path, prefix: str) -> tuple[np.ndarray, np.ndarray] | None:
    img_path = _find_idx(raw, f"{prefix}-images-idx3-ubyte")
    lab_path = _find_idx(raw, f"{prefix}-labels-idx1-ubyte")
    if img_path is None or lab_path is None:
        return None
    images = _read_idx_cached(_file_key(img_path))
    labels = _read_idx_cached(_file_key(lab_path))
    if images.ndim != 3:
        raise _corrupt(img_path, "IDX image", f"expected 3 dimensions, got {images.ndim}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise _corrupt(lab_path, "IDX label", f"{len(labels)} labels for {len(images)} images")
    if labels.size and labels.max() > 9:
        raise _corrupt(lab_path, "IDX label", f"label {int(labels.max())} out of range 0..9")
    return images[:, None], labels.astype(np.int64)


def _load_mnist_like(
    name: str, folder: str, tv_cls: str, classes, split, root, download, val_fraction
) -> ArrayImageDataset:
    val_fraction = _check_val_fraction(val_fraction)
    root = default_root(root)
    raw = root / folder / "raw"
    if download and not all(_mnist_part(raw, p) is not None for p in ("train", "t10k")):
        import torchvision.datasets as tvd

        _download(name, root, lambda: getattr(tvd, tv_cls)(str(root), train=True, download=True))
    parts = [_mnist_part(raw, p) for p in ("train", "t10k")]
    if any(p is None for p in parts):
        raise _not_found(name, root)
    return _split_official(name, split, parts[0], parts[1], classes, val_fraction)


@register_dataset("mnist")
def load_mnist(split="train", root=None, download=False, *, val_fraction=VAL_FRACTION):
    """MNIST, 1x28x28, classes "0".."9"; val = 10% of the official training set."""
    classes = [str(i) for i in range(10)]
    return _load_mnist_like("mnist", "MNIST", "MNIST", classes, split, root, download, val_fraction)


@register_dataset("fashion-mnist")
def load_fashion_mnist(split="train", root=None, download=False, *, val_fraction=VAL_FRACTION):
    """Fashion-MNIST, 1x28x28, 10 clothing classes; val = 10% of the official training set."""
    return _load_mnist_like(
        "fashion-mnist", "FashionMNIST", "FashionMNIST", FASHION_CLASSES,
        split, root, download, val_fraction,
    )  # fmt: skip


# ----------------------------------------------------------------------------------- CIFAR
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays (CIFAR batches), never arbitrary code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


@functools.lru_cache(maxsize=8)
def _read_cifar_pickle(key: tuple[str, int, int]) -> dict:
    path = Path(key[0])
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as err:
        raise _corrupt(path, "CIFAR pickle", " ".join(str(err).split())[:120]) from None
    if not isinstance(obj, dict):
        raise _corrupt(path, "CIFAR pickle", "expected a dict")
    return obj


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    obj = _read_cifar_pickle(_file_key(path))
    if "data" not in obj or label_key not in obj:
        raise _corrupt(path, "CIFAR batch", f"missing 'data' or '{label_key}'")
    data = np.asarray(obj["data"])
    labels = np.asarray(obj[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise _corrupt(path, "CIFAR batch", f"data has shape {data.shape}, expected (N, 3072)")
    if len(labels) != len(data):
        raise _corrupt(path, "CIFAR batch", f"{len(labels)} labels for {len(data)} images")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(name, folder, train_files, test_files, meta_file, label_key, names_key,
                tv_cls, split, root, download, val_fraction) -> ArrayImageDataset:  # fmt: skip
    val_fraction = _check_val_fraction(val_fraction)
    root = default_root(root)
    base = root / folder
    files = [base / f for f in (*train_files, *test_files, meta_file)]
    if download and not all(f.is_file() for f in files):
        import torchvision.datasets as tvd

        _download(name, root, lambda: getattr(tvd, tv_cls)(str(root), train=True, download=True))
    if not all(f.is_file() for f in files):
        raise _not_found(name, root)
    meta = _read_cifar_pickle(_file_key(base / meta_file))
    if names_key not in meta:
        raise _corrupt(base / meta_file, "CIFAR meta", f"missing '{names_key}'")
    classes = [str(c) for c in meta[names_key]]

    def read(names):
        batches = [_cifar_batch(base / f, label_key) for f in names]
        data = np.concatenate([b[0] for b in batches])
        labels = np.concatenate([b[1] for b in batches])
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise _corrupt(base / names[0], "CIFAR batch", "labels out of range of the meta classes")
        return data, labels

    train = read(train_files) if split != "test" else None
    test = read(test_files) if split == "test" else None
    return _split_official(name, split, train, test, classes, val_fraction)


@register_dataset("cifar10")
def load_cifar10(split="train", root=None, download=False, *, val_fraction=VAL_FRACTION):
    """CIFAR-10, 3x32x32, 10 classes; val = 10% of the official training set."""
    return _load_cifar(
        "cifar10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
        "batches.meta", "labels", "label_names", "CIFAR10", split, root, download, val_fraction,
    )  # fmt: skip


@register_dataset("cifar100")
def load_cifar100(split="train", root=None, download=False, *, val_fraction=VAL_FRACTION):
    """CIFAR-100 (fine labels), 3x32x32, 100 classes; val = 10% of the official training set."""
    return _load_cifar(
        "cifar100", "cifar-100-python", ["train"], ["test"], "meta", "fine_labels",
        "fine_label_names", "CIFAR100", split, root, download, val_fraction,
    )  # fmt: skip


# ------------------------------------------------------------------------------------ SVHN
@functools.lru_cache(maxsize=4)
def _read_svhn(key: tuple[str, int, int]) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    path = Path(key[0])
    try:
        mat = scipy.io.loadmat(str(path))
        x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    except Exception as err:
        raise _corrupt(path, "SVHN .mat", " ".join(str(err).split())[:120]) from None
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise _corrupt(path, "SVHN .mat", f"X has shape {x.shape}, expected (32, 32, 3, N)")
    if y.size and (y.min() < 0 or y.max() > 10):
        raise _corrupt(path, "SVHN .mat", "labels out of range 0..10")
    y[y == 10] = 0  # SVHN stores digit 0 as label 10
    data = np.ascontiguousarray(x.transpose(3, 2, 0, 1).astype(np.uint8))
    return data, y


@register_dataset("svhn")
def load_svhn(split="train", root=None, download=False, *, val_fraction=VAL_FRACTION):
    """SVHN cropped digits, 3x32x32, classes "0".."9"; val = 10% of the official train split."""
    val_fraction = _check_val_fraction(val_fraction)
    root = default_root(root)
    official = "test" if split == "test" else "train"
    path = root / f"{official}_32x32.mat"
    if download and not path.is_file():
        import torchvision.datasets as tvd

        _download("svhn", root, lambda: tvd.SVHN(str(root), split=official, download=True))
    if not path.is_file():
        raise _not_found("svhn", root)
    arrays = _read_svhn(_file_key(path))
    classes = [str(i) for i in range(10)]
    if split == "test":
        return _split_official("svhn", split, None, arrays, classes, val_fraction)
    return _split_official("svhn", split, arrays, None, classes, val_fraction)


# ----------------------------------------------------------------------------- imagefolder
def _is_image_file(f: Path, top: Path) -> bool:
    """An image file under ``top``: an image extension, a regular file, no hidden part."""
    return (f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
            and not any(part.startswith(".") for part in f.relative_to(top).parts))


def _class_dirs(folder: Path) -> dict[str, list[Path]]:
    """``class name -> sorted image files`` of the class sub-folders of ``folder``. A class folder
    without images is an error, unless none has any (then the result is empty: the caller says
    that the folder has no class folders with images)."""
    out, empty = {}, []
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in d.rglob("*") if _is_image_file(f, d))
        if files:
            out[d.name] = files
        else:
            empty.append(d)
    if out and empty:
        raise TrustVisionError(
            f"class folder {empty[0]} has no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...); add "
            "images to it or remove it"
        )
    return out


class ImageFolderDataset(ImageDataset):
    """Images read from files on access, resized to ``image_size`` and converted to ``num_channels``.

    ``files`` lists the image paths; ``labels`` (N,) int64 their class indices.
    """

    def __init__(self, files, labels, classes, name, split, image_size, num_channels, crop=None):
        self.crop = None if crop is None else float(crop)
        self.files = list(files)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.classes = list(classes)
        self.name = name
        self.split = split
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.num_channels = int(num_channels)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, idx: int):
        return _read_image(self.files[idx], self.image_size, self.num_channels, self.crop), int(self.labels[idx])


def _unreadable(path: Path, err: BaseException) -> TrustVisionError:
    return TrustVisionError(
        f"cannot read image {path} ({' '.join(str(err).split())[:120] or type(err).__name__}); "
        "fix or remove it"
    )


def _read_image(path: Path, size: tuple[int, int], channels: int, crop: float | None = None) -> torch.Tensor:
    """The image file as (C, H, W) floats in [0, 1] of ``size``: resized (bilinear) to it, or with
    ``crop`` (timm's crop_pct) resized so that its shorter side is ``max(size) / crop`` (aspect kept)
    and centre-cropped to ``size``, as torchvision's ``Resize(int(224 / 0.875))`` +
    ``CenterCrop(224)``."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if crop is not None:
                short = max(1, int(max(size) / crop))
                w, h = img.size
                # torchvision's rounding: the long side truncated, the crop offset rounded
                nw, nh = (short, max(1, int(short * h / w))) if w <= h else (max(1, int(short * w / h)), short)
                nw, nh = max(nw, size[1]), max(nh, size[0])
                if (nw, nh) != (w, h):
                    img = img.resize((nw, nh), Image.BILINEAR)
                left, top = int(round((nw - size[1]) / 2.0)), int(round((nh - size[0]) / 2.0))
                img = img.crop((left, top, left + size[1], top + size[0]))
            elif img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except Exception as err:
        raise _unreadable(path, err) from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()).float().div_(255.0)


@functools.lru_cache(maxsize=2**20)
def _probe_cached(key: tuple[str, int, int]) -> tuple[tuple[int, int], int]:
    """``((height, width), channels)`` of the image file ``key[0]``, after PIL's ``verify()``
    (header and, e.g. for PNG, every chunk's checksum; no pixels decoded). Cached per file
    version (path, mtime, size), so loading the three splits checks each file once."""
    from PIL import Image

    path = Path(key[0])
    try:
        with Image.open(path) as img:
            size, mode = (img.height, img.width), img.mode
            img.verify()
    except Exception as err:
        raise _unreadable(path, err) from None
    return size, (1 if mode in ("1", "L", "I", "I;16", "F") else 3)


def _probe(path: Path) -> tuple[tuple[int, int], int]:
    try:
        st = path.stat()
    except OSError as err:
        raise _unreadable(path, err) from None
    return _probe_cached((str(path), st.st_mtime_ns, st.st_size))


def _check_size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    ok = (isinstance(size, (list, tuple)) and len(size) == 2
          and all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 8192 for s in size))
    if not ok:
        raise TrustVisionError(f"image_size must be a whole number or (height, width) from 1 to "
                               f"8192, got {image_size!r}; e.g. image_size=32")
    return (int(size[0]), int(size[1]))


@register_dataset("imagefolder", prefix=True)
def load_imagefolder(
    path: str,
    split: str = "train",
    root=None,
    download: bool = False,
    *,
    image_size: tuple[int, int] | int | None = None,
    channels: int | None = None,
    val_fraction: float = VAL_FRACTION,
    crop: float | None = None,
) -> ImageFolderDataset:
    """Images in class folders: ``PATH/<class>/*`` or ``PATH/<split>/<class>/*``.

    * Layout: with a ``PATH/train`` folder the split folders are used (a missing ``val`` is cut
      from ``train``, ``val_fraction`` of each class); otherwise every class folder is split
      60/15/25 (stratified, deterministic). Images in sub-folders of a class folder count for it.
    * Files: only files with an image extension (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.gif``,
      ``.tif(f)``, ``.webp``, ``.ppm``, ``.pgm``) are read; other files and hidden files or
      folders (names starting with ``.``) are ignored.
    * One size for every split: each image is resized (bilinear) to ``image_size`` (an int or
      ``(H, W)``), by default the size of the first training image (in sorted class/file order),
      and converted to ``channels`` (1 or 3), by default that image's channel count. With
      ``crop`` (0 < crop <= 1, timm's ``crop_pct``, e.g. 0.875) each image is instead resized so
      that its shorter side is ``max(image_size) / crop`` (aspect ratio kept) and centre-cropped to
      ``image_size``: the evaluation transform of torchvision and timm (256 -> 224 at 0.875).
      Images are decoded when an item is read, so a split is never held in memory.
    * Refused, in one line naming the file or folder: an image that cannot be read anywhere in
      the folder (every image file of every split is opened and verified when any split is
      loaded, so a corrupt validation image stops loading the test split too: nothing is skipped
      silently), a class folder without images, fewer than 2 classes, an empty split.
    """
    val_fraction = _check_val_fraction(val_fraction)
    size = _check_size(image_size)
    if crop is not None and (isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0 < crop <= 1):
        raise TrustVisionError(f"crop must be a fraction in (0, 1] such as 0.875, got {crop!r}")
    if channels is not None and channels not in (1, 3):
        raise TrustVisionError(f"channels must be 1 or 3, got {channels!r}")
    folder = Path(path).expanduser()
    if not folder.is_absolute() and not folder.exists() and root is not None:
        folder = Path(root).expanduser() / folder
    if not folder.is_dir():
        raise TrustVisionError(
            f"image folder {folder} does not exist; pass imagefolder:PATH with PATH/<class>/<images>"
        )
    name = f"imagefolder:{path}"
    if (folder / "train").is_dir():
        by_split = {s: _class_dirs(folder / s) for s in SPLITS if (folder / s).is_dir()}
        pool = folder / "train"
        if not by_split["train"]:
            raise TrustVisionError(
                f"no class folders with images in {folder / 'train'}; "
                "expected PATH/train/<class>/<images>"
            )
        classes = sorted(by_split["train"])
        for s, dirs in by_split.items():
            extra = sorted(set(dirs) - set(classes))
            if extra:
                raise TrustVisionError(
                    f"{folder / s} has classes not in {folder / 'train'}: {', '.join(extra[:5])}; "
                    "every class needs training images"
                )
        everything = [f for dirs in by_split.values() for f in _flatten(dirs, classes)[0]]
        first = _flatten(by_split["train"], classes)[0][0]
        if split in by_split:
            files, labels = _flatten(by_split[split], classes)
            if split == "train" and "val" not in by_split:
                files, labels = _cut(files, labels, (1 - val_fraction, val_fraction), 0)
        elif split == "val":
            files, labels = _flatten(by_split["train"], classes)
            files, labels = _cut(files, labels, (1 - val_fraction, val_fraction), 1)
        else:
            raise TrustVisionError(f"{folder} has no {split}/ folder; add {folder / split}/<class>/")
    else:
        dirs = _class_dirs(folder)
        pool = folder
        if not dirs:
            raise TrustVisionError(
                f"no class folders with images in {folder}; expected PATH/<class>/<images> "
                f"({', '.join(IMAGE_EXTENSIONS[:4])}, ...)"
            )
        classes = sorted(dirs)
        everything, _ = _flatten(dirs, classes)
        first = everything[0]
        files, labels = _flatten(dirs, classes)
        files, labels = _cut(files, labels, SPLIT_FRACTIONS, SPLITS.index(split))
    for f in everything:  # every split, so that no split skips a file another one refuses
        _probe(f)
    if len(classes) < 2:
        raise TrustVisionError(
            f"{pool} has only one class folder ({classes[0]}); a classifier needs at least 2 "
            "classes: add one sub-folder of images per class"
        )
    if not files:
        raise TrustVisionError(f"the {split} split of {folder} is empty; add more images per class")
    probe_size, probe_channels = _probe(first)
    num_channels = channels if channels is not None else probe_channels
    return ImageFolderDataset(files, labels, classes, name, split, size or probe_size, num_channels, crop)


def _flatten(dirs: dict[str, list[Path]], classes: list[str]) -> tuple[list[Path], np.ndarray]:
    files, labels = [], []
    for cls in sorted(dirs):
        files += dirs[cls]
        labels += [classes.index(cls)] * len(dirs[cls])
    return files, np.asarray(labels, dtype=np.int64)


def _cut(files, labels, fractions, part):
    idx = stratified_split(labels, fractions)[part]
    return [files[i] for i in idx], labels[idx]
