"""Dataset loaders: everything loads once to host NumPy, nothing is downloaded.

* :func:`load_digits` - scikit-learn's bundled 8x8 handwritten digits (no files).
* :func:`load_mnist`, :func:`load_fashion_mnist` - IDX files from a local folder;
  Fashion-MNIST defaults to the folder of Debian's ``dataset-fashion-mnist``
  package (``/usr/share/datasets/fashion-mnist``, four ``*-ubyte.gz`` files).
* :func:`load_cifar10` - CIFAR-10 *binary* batches (never the pickled version).
* :func:`load_libsvm` - LIBSVM text files.

Images are float32 ``[N, H, W, C]``, labels int32 ``[N]``; features float32
``[N, d]``.

Example:
  >>> from jaxdec.data import load_digits, dirichlet, stack
  >>> ds = load_digits()
  >>> parts = dirichlet(ds.y_train, n=8, alpha=0.5, seed=0)
  >>> data = stack(ds.x_train, ds.y_train, parts)          # WorkerData, [8, m_max, ...]
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxdec.data.readers import read_cifar10_batch, read_idx, read_libsvm

__all__ = [
    "Dataset",
    "load_digits",
    "load_mnist",
    "load_fashion_mnist",
    "load_cifar10",
    "load_libsvm",
    "FASHION_MNIST_DIRS",
]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530

FASHION_MNIST_DIRS: tuple[str, ...] = (
    "/usr/share/datasets/fashion-mnist",  # what Debian's package actually installs
    "/usr/share/dataset-fashion-mnist",
    "/usr/share/fashion-mnist",
)
"""Folders searched (in order) by ``load_fashion_mnist(path=None)`` before asking
``dpkg -L dataset-fashion-mnist``."""

_FASHION_HINT = (
    "Install the offline copy with `apt-get update && apt-get install -y "
    "dataset-fashion-mnist` (files land in /usr/share/datasets/fashion-mnist), or pass "
    "path= to a folder holding the four IDX files (raw or .gz)."
)
_IDX_STEMS = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


class Dataset(NamedTuple):
    """A train/test dataset held in host NumPy memory.

    Attributes:
      x_train: float32 ``[N, H, W, C]`` images or ``[N, d]`` features.
      y_train: int32 ``[N]`` labels in ``0..num_classes-1``.
      x_test: float32, same trailing shape as ``x_train``.
      y_test: int32 ``[N_test]``.
      num_classes: number of classes ``K``.
      name: short identifier (e.g. ``"digits"``).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str


def _split_indices(
    y: np.ndarray, test_fraction: float, seed: int, *, stratify: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (optionally stratified) train/test index split."""
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(
            f"test_fraction must be in (0, 1), got {test_fraction}; e.g. use 0.25."
        )
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    classes, counts = np.unique(y, return_counts=True)
    strat = y if stratify and counts.min() >= 2 and len(classes) > 1 else None
    try:
        tr, te = train_test_split(
            idx, test_size=float(test_fraction), random_state=seed, stratify=strat
        )
    except ValueError:  # too few samples per class for a stratified split
        tr, te = train_test_split(
            idx, test_size=float(test_fraction), random_state=seed
        )
    return np.sort(tr), np.sort(te)


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes).

    Pixels (integers ``0..16``) are scaled to ``[0, 1]`` by ``/16``, then
    standardized with one scalar mean and std computed over all *training* pixels:
    ``x <- (x/16 - mu_train) / sigma_train`` (the test set uses the train
    statistics). The train/test split is stratified by label and seeded.

    Args:
      test_fraction: fraction of samples held out, in ``(0, 1)``.
      seed: split seed.

    Returns:
      A :class:`Dataset` with ``x`` float32 ``[N, 8, 8, 1]`` and ``y`` int32.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[..., None]
    y = np.asarray(bunch.target, dtype=np.int32)
    tr, te = _split_indices(y, test_fraction, seed, stratify=True)
    mu = float(x[tr].mean())
    sigma = float(x[tr].std())
    x = ((x - mu) / sigma).astype(np.float32)
    return Dataset(x[tr], y[tr], x[te], y[te], 10, "digits")


def _find_idx_files(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """Locate the four IDX files in ``folder``; returns (found, missing stems)."""
    found, missing = {}, []
    for key, stem in _IDX_STEMS.items():
        dotted = stem.replace("-idx", ".idx")  # "train-images.idx3-ubyte" variant
        for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
            if (folder / name).is_file():
                found[key] = folder / name
                break
        else:
            missing.append(stem)
    return found, missing


def _load_idx_folder(
    folder: Path, mean: float, std: float, name: str, hint: str
) -> Dataset:
    found, missing = _find_idx_files(folder)
    if missing:
        raise FileNotFoundError(
            f"load_{name}: {folder} lacks {', '.join(missing)} (raw or .gz). {hint}"
        )
    arrays = {k: read_idx(p) for k, p in found.items()}
    for split in ("train", "test"):
        xs, ys = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if xs.ndim != 3 or ys.ndim != 1 or len(xs) != len(ys):
            raise ValueError(
                f"load_{name}: {split} images have shape {xs.shape} and labels "
                f"{ys.shape}; expected [N, H, W] and [N] with equal N. Check that "
                f"{folder} holds the right four files."
            )
        if len(ys) and int(ys.max()) > 9:
            raise ValueError(
                f"load_{name}: {split} label {int(ys.max())} > 9; the labels file is "
                "not a 10-class IDX labels file."
            )

    def images(a: np.ndarray) -> np.ndarray:
        x = a.astype(np.float32)[..., None] / np.float32(255.0)
        return (x - np.float32(mean)) / np.float32(std)

    return Dataset(
        images(arrays["x_train"]),
        arrays["y_train"].astype(np.int32),
        images(arrays["x_test"]),
        arrays["y_test"].astype(np.int32),
        10,
        name,
    )


def load_mnist(path: str | os.PathLike) -> Dataset:
    """MNIST from a folder with the four IDX files (raw or ``.gz``).

    Expects ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally
    ``.gz``; the ``train-images.idx3-ubyte`` spelling is also accepted). Pixels are
    scaled to ``[0, 1]`` and standardized with the usual MNIST constants:
    ``x <- (p/255 - 0.1307) / 0.3081``.

    Args:
      path: folder holding the files.

    Returns:
      A :class:`Dataset`, ``x`` float32 ``[N, 28, 28, 1]``, ``y`` int32.

    Raises:
      FileNotFoundError: a file is missing (message names which).
      ValueError: a file is corrupt (see :func:`read_idx`).
    """
    return _load_idx_folder(
        Path(path),
        MNIST_MEAN,
        MNIST_STD,
        "mnist",
        "Pass path= to a folder holding the four MNIST IDX files.",
    )


def _dpkg_fashion_dirs() -> list[Path]:
    """Folders holding IDX files according to ``dpkg -L dataset-fashion-mnist``."""
    dpkg = shutil.which("dpkg")
    if dpkg is None:
        return []
    try:
        out = subprocess.run(
            [dpkg, "-L", "dataset-fashion-mnist"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    dirs = []
    for line in out.stdout.splitlines():
        p = Path(line.strip())
        if p.name.startswith("train-images") and p.parent not in dirs:
            dirs.append(p.parent)
    return dirs


def load_fashion_mnist(path: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST from local IDX files; defaults to Debian's offline package.

    With ``path=None`` the folders in :data:`FASHION_MNIST_DIRS` are tried in order
    (Debian's ``dataset-fashion-mnist`` installs
    ``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``),
    then any folder that ``dpkg -L dataset-fashion-mnist`` lists. Pixels are scaled
    to ``[0, 1]`` and standardized: ``x <- (p/255 - 0.2860) / 0.3530``.

    Args:
      path: folder with the four IDX files (raw or ``.gz``), or ``None``.

    Returns:
      A :class:`Dataset`, ``x`` float32 ``[N, 28, 28, 1]``, ``y`` int32, 10 classes.

    Raises:
      FileNotFoundError: no folder holds the four files; the message gives the
        ``apt-get`` command and the ``path=`` alternative.
      ValueError: a file is corrupt (see :func:`read_idx`).
    """
    if path is not None:
        folders = [Path(path)]
    else:
        folders = [Path(p) for p in FASHION_MNIST_DIRS]
        if not any(not _find_idx_files(f)[1] for f in folders):
            folders += [d for d in _dpkg_fashion_dirs() if d not in folders]
    for folder in folders:
        if not _find_idx_files(folder)[1]:
            return _load_idx_folder(
                folder,
                FASHION_MNIST_MEAN,
                FASHION_MNIST_STD,
                "fashion_mnist",
                _FASHION_HINT,
            )
    searched = ", ".join(str(f) for f in folders)
    raise FileNotFoundError(
        "load_fashion_mnist: the four IDX files (train-images-idx3-ubyte, "
        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, "
        f"raw or .gz) were not found in: {searched}. {_FASHION_HINT}"
    )


def load_cifar10(path: str | os.PathLike) -> Dataset:
    """CIFAR-10 from its *binary* batches (the pickled version is never read).

    ``path`` holds ``data_batch_1.bin`` ... ``data_batch_5.bin`` and
    ``test_batch.bin`` (or a ``cifar-10-batches-bin`` subfolder with them). Pixels
    are scaled to ``[0, 1]`` and standardized per channel ``c`` with training-set
    statistics: ``x[..., c] <- (p[..., c]/255 - mu_c) / sigma_c``.

    Args:
      path: folder holding the batches.

    Returns:
      A :class:`Dataset`, ``x`` float32 ``[N, 32, 32, 3]``, ``y`` int32, 10 classes.

    Raises:
      FileNotFoundError: a batch file is missing.
      ValueError: a batch is corrupt (see :func:`read_cifar10_batch`).
    """
    folder = Path(path)
    if (
        not (folder / "test_batch.bin").is_file()
        and (folder / "cifar-10-batches-bin").is_dir()
    ):
        folder = folder / "cifar-10-batches-bin"
    names = [f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"load_cifar10: {folder} lacks {', '.join(missing)}. Pass path= to the "
            "extracted 'CIFAR-10 binary version' folder (cifar-10-batches-bin)."
        )
    train = [read_cifar10_batch(folder / n) for n in names[:5]]
    x_te, y_te = read_cifar10_batch(folder / names[5])
    x_tr = np.concatenate([b[0] for b in train])
    y_tr = np.concatenate([b[1] for b in train])
    scale = np.float32(1.0 / 255.0)
    x_tr = x_tr.astype(np.float32) * scale
    x_te = x_te.astype(np.float32) * scale
    mu = x_tr.mean(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
    sigma = x_tr.std(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
    sigma = np.where(sigma > 0, sigma, np.float32(1.0))
    x_tr = (x_tr - mu) / sigma
    x_te = (x_te - mu) / sigma
    y_tr, y_te = y_tr.astype(np.int32), y_te.astype(np.int32)
    return Dataset(x_tr, y_tr, x_te, y_te, 10, "cifar10")


def _remap_labels(*label_arrays: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    classes = np.unique(np.concatenate(label_arrays))
    return [np.searchsorted(classes, y).astype(np.int32) for y in label_arrays], classes


def load_libsvm(
    path: str | os.PathLike,
    n_features: int | None = None,
    test_path: str | os.PathLike | None = None,
    *,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> Dataset:
    """A classification dataset from LIBSVM text file(s), densified.

    Labels are remapped to ``0..K-1`` by sorted order of the distinct raw labels
    found in the train (and test) files: ``class(v) = #{distinct labels < v}``, e.g.
    ``{-1, +1} -> {0, 1}`` and ``{1, 2, 3} -> {0, 1, 2}``. Features are returned
    as stored (no scaling). With no ``test_path``, a seeded stratified (where
    possible) ``test_fraction`` of the samples becomes the test set.

    Args:
      path: training file.
      n_features: number of features ``d``; default: the largest index seen in the
        train and test files.
      test_path: optional separate test file.
      test_fraction: held-out fraction when ``test_path`` is ``None``.
      seed: split seed.

    Returns:
      A :class:`Dataset` with ``x`` float32 ``[N, d]`` and ``y`` int32.

    Raises:
      ValueError: malformed file (with ``path:line``), see :func:`read_libsvm`.
    """
    x, y_raw = read_libsvm(path, n_features)
    name = Path(path).name
    if test_path is None:
        y_all, classes = _remap_labels(y_raw)
        (y,) = y_all
        tr, te = _split_indices(y, test_fraction, seed, stratify=True)
        return Dataset(x[tr], y[tr], x[te], y[te], len(classes), name)
    x_te, y_te_raw = read_libsvm(test_path, n_features)
    d = max(x.shape[1], x_te.shape[1])
    x = _pad_columns(x, d)
    x_te = _pad_columns(x_te, d)
    (y, y_te), classes = _remap_labels(y_raw, y_te_raw)
    return Dataset(x, y, x_te, y_te, len(classes), name)


def _pad_columns(x: np.ndarray, d: int) -> np.ndarray:
    if x.shape[1] == d:
        return x
    return np.pad(x, ((0, 0), (0, d - x.shape[1])))
