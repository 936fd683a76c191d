"""Safe low-level readers for local data files (IDX, CIFAR-10 binary, LIBSVM).

Every reader validates the file against the size its own header (or format) claims
*before* allocating memory, refuses absurd sizes, and raises :class:`ValueError`
naming the file, the cause and the fix. Nothing is downloaded and nothing is
unpickled.

Example:
  >>> from jaxdec.data import read_idx
  >>> images = read_idx("train-images-idx3-ubyte.gz")   # uint8 [60000, 28, 28]
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

__all__ = ["MAX_BYTES", "read_idx", "read_cifar10_batch", "read_libsvm"]

MAX_BYTES = 2**31
"""Largest payload (bytes) a reader will allocate unless told otherwise."""

# IDX type codes (third magic byte) -> big-endian NumPy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_CIFAR_RECORD = 1 + 3 * 32 * 32


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def _parse_idx_header(head: bytes, path: Path) -> tuple[np.dtype, int]:
    """Decode the 4-byte IDX magic into ``(big-endian dtype, number of dims)``."""
    if len(head) < 4:
        raise ValueError(
            f"read_idx: {path} is {len(head)} bytes, too short for an IDX header "
            "(4-byte magic). The file is truncated or not an IDX file; re-copy it."
        )
    if head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES or head[3] == 0:
        raise ValueError(
            f"read_idx: {path} has magic {head[:4].hex()}, not an IDX file (expected "
            "00 00 <type in 08,09,0b,0c,0d,0e> <ndim >= 1>). Pass an MNIST-style "
            "IDX file, raw or .gz."
        )
    return _IDX_DTYPES[head[2]], head[3]


def _claimed_size(dims: tuple[int, ...], dtype: np.dtype, path: Path, cap: int) -> int:
    nbytes = math.prod(dims) * dtype.itemsize
    if nbytes > cap:
        raise ValueError(
            f"read_idx: {path} header claims shape {dims} of {dtype.str[1:]} = "
            f"{nbytes} bytes, above the cap max_bytes={cap}. The header is corrupt; "
            "if the file is genuinely that large, pass a larger max_bytes."
        )
    return nbytes


def _read_idx_header(f, path: Path, max_bytes: int):
    """Magic word and dimension sizes: ``(dtype, ndim, dims, data bytes claimed)``."""
    dtype, ndim = _parse_idx_header(f.read(4), path)
    raw_dims = f.read(4 * ndim)
    if len(raw_dims) != 4 * ndim:
        raise ValueError(
            f"read_idx: {path} is truncated inside its header ({ndim} "
            "dimension sizes expected). Re-copy the file."
        )
    dims = tuple(int(v) for v in np.frombuffer(raw_dims, ">u4"))
    return dtype, ndim, dims, _claimed_size(dims, dtype, path, max_bytes)


def read_idx(path: str | os.PathLike, *, max_bytes: int = MAX_BYTES) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST format), raw or gzip-compressed.

    Layout: magic ``00 00 T D`` (``T`` the type code: ``0x08`` uint8, ``0x09`` int8,
    ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64; ``D`` the
    number of dimensions), then ``D`` big-endian uint32 sizes, then
    ``prod(sizes) * itemsize`` big-endian data bytes and nothing else.

    The payload size the header claims is checked against ``max_bytes`` and against
    the actual file length *before* any payload is allocated. For gzip files (detected
    by their magic bytes, whatever the name) at most ``claimed + 1`` decompressed
    bytes are read, so a decompression bomb cannot exhaust memory and trailing junk
    is detected.

    Args:
      path: file to read.
      max_bytes: largest payload accepted (default ``2**31``).

    Returns:
      Array of shape ``sizes`` in native byte order (e.g. ``uint8 [60000, 28, 28]``).

    Raises:
      ValueError: wrong magic, truncated file, trailing bytes, header claiming more
        than ``max_bytes``, or a corrupt gzip stream.
      FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_idx: no such file {path}.")
    if _is_gzip(path):
        try:
            with gzip.open(path, "rb") as f:
                dtype, ndim, dims, nbytes = _read_idx_header(f, path, max_bytes)
                payload = f.read(nbytes + 1)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(
                f"read_idx: {path} is not a valid gzip stream ({err}). The download "
                "is corrupt or truncated; re-copy it or pass the decompressed file."
            ) from err
        if len(payload) != nbytes:
            what = "truncated" if len(payload) < nbytes else "followed by extra bytes"
            raise ValueError(
                f"read_idx: {path} header claims shape {dims} ({nbytes} data bytes) "
                f"but the decompressed data is {what}. The file is corrupt; re-copy it."
            )
    else:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            dtype, ndim, dims, nbytes = _read_idx_header(f, path, max_bytes)
            expected = 4 + 4 * ndim + nbytes
            if file_size != expected:
                what = "truncated" if file_size < expected else "has trailing bytes"
                raise ValueError(
                    f"read_idx: {path} is {file_size} bytes but its header claims "
                    f"shape {dims}, i.e. {expected} bytes: the file {what}. "
                    "Re-copy it."
                )
            payload = f.read(nbytes)
    data = np.frombuffer(payload, dtype=dtype).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def read_cifar10_batch(
    path: str | os.PathLike, *, max_bytes: int = MAX_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 *binary* batch (``data_batch_k.bin`` / ``test_batch.bin``).

    Each record is 3073 bytes: one label byte in ``0..9`` then ``3 * 32 * 32`` pixel
    bytes in channel-major (CHW) order, red plane first. Records are transposed to
    HWC.

    Args:
      path: the ``.bin`` file (not the pickled Python version, which is never read).
      max_bytes: largest file accepted (default ``2**31``).

    Returns:
      ``(x, y)`` with ``x`` uint8 ``[N, 32, 32, 3]`` and ``y`` uint8 ``[N]``.

    Raises:
      ValueError: empty file, size not a multiple of 3073, too large, or a label
        byte outside ``0..9`` (e.g. a CIFAR-100 file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_cifar10_batch: no such file {path}.")
    size = path.stat().st_size
    if size == 0 or size % _CIFAR_RECORD:
        raise ValueError(
            f"read_cifar10_batch: {path} is {size} bytes, not a positive multiple of "
            f"the {_CIFAR_RECORD}-byte record; it is truncated or not the CIFAR-10 "
            "binary version (use the 'binary version' data_batch_k.bin files)."
        )
    if size > max_bytes:
        raise ValueError(
            f"read_cifar10_batch: {path} is {size} bytes, above max_bytes={max_bytes}; "
            "pass a larger max_bytes if this is intended."
        )
    records = np.fromfile(path, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    y = records[:, 0].copy()
    if y.max() > 9:
        raise ValueError(
            f"read_cifar10_batch: {path} has label byte {int(y.max())} > 9; this is "
            "not a CIFAR-10 batch (CIFAR-100 records have two label bytes)."
        )
    x = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x), y


def _libsvm_error(path: Path, lineno: int, msg: str) -> ValueError:
    return ValueError(
        f"read_libsvm: {path}:{lineno}: {msg}. Expected 'label idx:value ...' with "
        "1-based integer indices; fix or remove that line."
    )


def read_libsvm(
    path: str | os.PathLike,
    n_features: int | None = None,
    *,
    max_bytes: int = MAX_BYTES,
) -> tuple[np.ndarray, np.ndarray]:
    """Read a LIBSVM / SVMlight text file into a dense matrix.

    Each non-blank line is ``label idx:value idx:value ...`` with 1-based feature
    indices; ``# ...`` comments and ``qid:...`` tokens are ignored. Feature ``idx``
    goes to column ``idx - 1``; absent features are 0.

    Args:
      path: text file.
      n_features: number of columns ``d``; default: the largest index in the file.
      max_bytes: largest dense float32 matrix (``4 N d`` bytes) accepted.

    Returns:
      ``(x, y)``: ``x`` float32 ``[N, d]``, ``y`` float64 ``[N]`` (raw labels).

    Raises:
      ValueError: naming ``path:line`` for a malformed label, token, index
        (``< 1``, repeated, or ``> n_features``) or non-finite value; or for an
        empty file or a dense matrix above ``max_bytes``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_libsvm: no such file {path}.")
    if n_features is not None and int(n_features) < 1:
        raise ValueError(f"read_libsvm: n_features must be >= 1, got {n_features}.")
    labels: list[float] = []
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    max_index = 0
    with open(path, encoding="utf-8", errors="strict") as f:
        for lineno, line in enumerate(f, start=1):
            body = line.split("#", 1)[0].split()
            if not body:
                continue
            try:
                label = float(body[0])
            except ValueError:
                raise _libsvm_error(path, lineno, f"bad label {body[0]!r}") from None
            if not math.isfinite(label):
                raise _libsvm_error(path, lineno, f"non-finite label {body[0]!r}")
            idx, val = [], []
            for tok in body[1:]:
                key, sep, value = tok.partition(":")
                if key == "qid":
                    continue
                try:
                    if not sep:
                        raise ValueError
                    i, v = int(key), float(value)
                except ValueError:
                    raise _libsvm_error(
                        path, lineno, f"bad token {tok!r} (want idx:value)"
                    ) from None
                if i < 1:
                    raise _libsvm_error(path, lineno, f"index {i} < 1 (1-based)")
                if i > max_bytes // 4:
                    raise _libsvm_error(
                        path,
                        lineno,
                        f"index {i} needs a dense row of {4 * i} bytes > "
                        f"max_bytes={max_bytes} (raise max_bytes if intended)",
                    )
                if n_features is not None and i > n_features:
                    raise _libsvm_error(
                        path, lineno, f"index {i} > n_features={n_features}"
                    )
                if not math.isfinite(v):
                    raise _libsvm_error(path, lineno, f"non-finite value in {tok!r}")
                idx.append(i - 1)
                val.append(v)
            idx_arr = np.asarray(idx, dtype=np.int64)
            if len(np.unique(idx_arr)) != len(idx_arr):
                raise _libsvm_error(path, lineno, "a feature index is repeated")
            if len(idx_arr):
                max_index = max(max_index, int(idx_arr.max()) + 1)
            labels.append(label)
            rows.append((idx_arr, np.asarray(val, dtype=np.float32)))
    if not rows:
        raise ValueError(f"read_libsvm: {path} has no data lines; pass a LIBSVM file.")
    d = int(n_features) if n_features is not None else max(max_index, 1)
    if 4 * len(rows) * d > max_bytes:
        raise ValueError(
            f"read_libsvm: {path} densifies to [{len(rows)}, {d}] float32 = "
            f"{4 * len(rows) * d} bytes > max_bytes={max_bytes}; this reader is for "
            "datasets that fit densely in memory (raise max_bytes if intended)."
        )
    x = np.zeros((len(rows), d), dtype=np.float32)
    for r, (idx_arr, val_arr) in enumerate(rows):
        x[r, idx_arr] = val_arr
    return x, np.asarray(labels, dtype=np.float64)
