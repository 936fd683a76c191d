"""Tests for jaxdec.data: readers, loaders, partitions, stacking and samplers."""

from __future__ import annotations

import gzip
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdec.data as jdd

# --------------------------------------------------------------- helpers


def idx_bytes(a: np.ndarray) -> bytes:
    codes = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C}
    codes.update({np.float32: 0x0D, np.float64: 0x0E})
    code = codes[a.dtype.type]
    head = bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    return head + a.astype(a.dtype.newbyteorder(">")).tobytes()


def write_idx_folder(folder, n_train=12, n_test=5, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    for name, a in arrays.items():
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(idx_bytes(a)))
        else:
            (folder / name).write_bytes(idx_bytes(a))
    return arrays


@pytest.fixture(scope="module")
def digits():
    return jdd.load_digits(seed=0)


# --------------------------------------------------------------- readers


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-3, 7, 1 << 20], dtype=np.int32),
        np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2),
        np.array([1.5, -2.25], dtype=np.float64),
    ],
)
def test_read_idx_round_trip(tmp_path, gz, array):
    data = idx_bytes(array)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    path.write_bytes(gzip.compress(data) if gz else data)
    out = jdd.read_idx(path)
    assert out.shape == array.shape
    assert out.dtype == array.dtype and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def _bad_idx_cases():
    good = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    huge = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 60000, 60000, 60000) + b"\0" * 8
    return {
        "truncated": (good[:-5], "truncated"),
        "trailing": (good + b"junk", "trailing"),
        "wrong_magic": (b"\x01\x02" + good[2:], "not an IDX"),
        "bad_type": (bytes([0, 0, 0x42, 3]) + good[4:], "not an IDX"),
        "oversized": (huge, "max_bytes"),
        "short_header": (good[:6], "header"),
        "empty": (b"", "too short"),
    }


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("case", sorted(_bad_idx_cases()))
def test_read_idx_rejects_bad_files(tmp_path, gz, case):
    payload, match = _bad_idx_cases()[case]
    if gz and case == "trailing":
        match = "extra bytes"
    path = tmp_path / "bad.idx"
    path.write_bytes(gzip.compress(payload) if gz else payload)
    with pytest.raises(ValueError, match=match):
        jdd.read_idx(path)


def test_read_idx_corrupt_gzip(tmp_path):
    good = gzip.compress(idx_bytes(np.arange(1000, dtype=np.uint8)))
    (tmp_path / "cut.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="gzip"):
        jdd.read_idx(tmp_path / "cut.gz")
    (tmp_path / "junk.gz").write_bytes(good + b"garbage after the stream")
    with pytest.raises(ValueError):
        jdd.read_idx(tmp_path / "junk.gz")


def test_read_cifar10_batch(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (4, 3, 32, 32), np.uint8)  # CHW
    y = np.array([0, 9, 3, 3], np.uint8)
    records = np.concatenate([y[:, None], x.reshape(4, -1)], axis=1)
    path = tmp_path / "data_batch_1.bin"
    path.write_bytes(records.tobytes())
    xo, yo = jdd.read_cifar10_batch(path)
    assert xo.shape == (4, 32, 32, 3) and xo.dtype == np.uint8
    np.testing.assert_array_equal(yo, y)
    np.testing.assert_array_equal(xo, x.transpose(0, 2, 3, 1))
    assert xo[1, 5, 7, 2] == x[1, 2, 5, 7]  # channel 2 (blue) at row 5, col 7

    path.write_bytes(records.tobytes()[:-1])
    with pytest.raises(ValueError, match="3073"):
        jdd.read_cifar10_batch(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="3073"):
        jdd.read_cifar10_batch(path)
    bad = records.copy()
    bad[2, 0] = 57
    path.write_bytes(bad.tobytes())
    with pytest.raises(ValueError, match="label"):
        jdd.read_cifar10_batch(path)


def test_read_libsvm(tmp_path):
    path = tmp_path / "a.svm"
    path.write_text("+1 1:0.5 3:-2\n\n# comment\n-1 2:1e-1  # trailing\n+1\n")
    x, y = jdd.read_libsvm(path)
    np.testing.assert_allclose(
        x, np.array([[0.5, 0, -2], [0, 0.1, 0], [0, 0, 0]], np.float32)
    )
    np.testing.assert_array_equal(y, [1, -1, 1])
    x5, _ = jdd.read_libsvm(path, n_features=5)
    assert x5.shape == (3, 5) and x5.dtype == np.float32


@pytest.mark.parametrize(
    "line",
    ["1 0:1.0", "1 2:abc", "abc 1:1", "1 3", "1 2:1 2:3", "1 1:nan", "1 9:1"],
)
def test_read_libsvm_malformed_line_number(tmp_path, line):
    path = tmp_path / "bad.svm"
    path.write_text(f"1 1:1\n0 2:1\n{line}\n1 1:2\n")
    with pytest.raises(ValueError, match=r"bad\.svm:3:"):
        jdd.read_libsvm(path, n_features=4)


# --------------------------------------------------------------- loaders


def test_load_digits(digits):
    ds = digits
    assert ds.x_train.shape[1:] == (8, 8, 1) and ds.x_test.shape[1:] == (8, 8, 1)
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert len(ds.x_test) == pytest.approx(0.25 * 1797, abs=1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.num_classes == 10 and set(np.unique(ds.y_train)) == set(range(10))
    assert abs(ds.x_train.mean()) < 1e-4 and abs(ds.x_train.std() - 1) < 1e-4
    assert abs(ds.x_test.mean()) < 0.1  # same statistics, not refit
    # stratified: class proportions agree between train and test
    p_tr = np.bincount(ds.y_train, minlength=10) / len(ds.y_train)
    p_te = np.bincount(ds.y_test, minlength=10) / len(ds.y_test)
    assert np.abs(p_tr - p_te).max() < 0.01
    again = jdd.load_digits(seed=0)
    np.testing.assert_array_equal(again.y_test, ds.y_test)
    other = jdd.load_digits(seed=1)
    assert not np.array_equal(other.y_test, ds.y_test)
    with pytest.raises(ValueError, match="test_fraction"):
        jdd.load_digits(test_fraction=1.5)


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_and_fashion_from_folder(tmp_path, gz):
    arrays = write_idx_folder(tmp_path, gz=gz)
    ds = jdd.load_mnist(tmp_path)
    raw = arrays["train-images-idx3-ubyte"].astype(np.float64)
    expect = (raw / 255 - 0.1307) / 0.3081
    assert ds.x_train.shape == (12, 28, 28, 1) and ds.x_train.dtype == np.float32
    np.testing.assert_allclose(ds.x_train[..., 0], expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert ds.y_test.dtype == np.int32 and ds.num_classes == 10
    fm = jdd.load_fashion_mnist(tmp_path)
    expect = (raw / 255 - 0.2860) / 0.3530
    np.testing.assert_allclose(fm.x_train[..., 0], expect, rtol=1e-5, atol=1e-5)


def test_load_fashion_mnist_missing_files_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion"):
        jdd.load_fashion_mnist(path=tmp_path)
    with pytest.raises(FileNotFoundError, match="path="):
        jdd.load_fashion_mnist(path=tmp_path)


def test_load_mnist_count_mismatch(tmp_path):
    write_idx_folder(tmp_path, gz=False)
    labels = np.zeros(7, np.uint8)  # 7 labels for 12 images
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(ValueError, match="equal N"):
        jdd.load_mnist(tmp_path)


def test_load_cifar10(tmp_path):
    rng = np.random.default_rng(2)
    for name, count in [(f"data_batch_{k}.bin", 3) for k in range(1, 6)] + [
        ("test_batch.bin", 2)
    ]:
        recs = rng.integers(0, 256, (count, 3073), np.uint8)
        recs[:, 0] = rng.integers(0, 10, count)
        (tmp_path / name).write_bytes(recs.tobytes())
    ds = jdd.load_cifar10(tmp_path)
    assert ds.x_train.shape == (15, 32, 32, 3) and ds.x_test.shape == (2, 32, 32, 3)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_allclose(ds.x_train.mean(axis=(0, 1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(ds.x_train.std(axis=(0, 1, 2)), 1, atol=1e-4)
    (tmp_path / "data_batch_3.bin").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        jdd.load_cifar10(tmp_path)


def test_load_libsvm(tmp_path):
    rng = np.random.default_rng(3)
    lines = [f"{rng.choice([-1, 1])} 1:{v:.3f} 4:1" for v in rng.normal(size=40)]
    (tmp_path / "train.svm").write_text("\n".join(lines) + "\n")
    ds = jdd.load_libsvm(tmp_path / "train.svm", seed=0)
    assert ds.x_train.shape[1] == 4 and len(ds.x_train) + len(ds.x_test) == 40
    assert len(ds.x_test) == 10
    assert ds.num_classes == 2 and set(np.unique(ds.y_train)) <= {0, 1}
    (tmp_path / "test.svm").write_text("1 6:2.0\n3 1:1\n")
    ds = jdd.load_libsvm(tmp_path / "train.svm", test_path=tmp_path / "test.svm")
    assert ds.x_train.shape == (40, 6) and ds.x_test.shape == (2, 6)
    np.testing.assert_array_equal(ds.y_test, [1, 2])  # {-1, 1, 3} -> {0, 1, 2}
    assert ds.num_classes == 3


# ------------------------------------------------------------ partitions


def assert_partition(parts, num, exact=True):
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx), "a sample is used twice"
    assert allidx.min() >= 0 and allidx.max() < num
    if exact:
        assert len(allidx) == num, "not every sample is used"


def test_iid_partition(digits):
    y = digits.y_train
    parts = jdd.iid(y, 7, seed=0)
    assert len(parts) == 7
    assert_partition(parts, len(y))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert jdd.heterogeneity(y, parts, 10) < 0.15
    again = jdd.iid(len(y), 7, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    with pytest.raises(ValueError, match="workers"):
        jdd.iid(3, 5, seed=0)


def test_dirichlet_partition_and_heterogeneity_ordering(digits):
    y = digits.y_train
    h = {}
    for alpha in (100.0, 1.0, 0.1):
        parts = jdd.dirichlet(y, 10, alpha, seed=0, min_size=10)
        assert len(parts) == 10
        assert_partition(parts, len(y))
        assert min(len(p) for p in parts) >= 10
        h[alpha] = jdd.heterogeneity(y, parts, 10)
    assert h[100.0] < h[1.0] < h[0.1]
    again = jdd.dirichlet(y, 10, 0.1, seed=0, min_size=10)
    other = jdd.dirichlet(y, 10, 0.1, seed=1, min_size=10)
    assert jdd.heterogeneity(y, again, 10) == h[0.1]
    assert not all(np.array_equal(a, b) for a, b in zip(again, other, strict=True))


def test_dirichlet_errors(digits):
    y = digits.y_train
    with pytest.raises(ValueError, match="min_size"):
        jdd.dirichlet(y, 100, 1.0, seed=0, min_size=100)  # n * min_size > N
    with pytest.raises(ValueError, match="alpha"):
        jdd.dirichlet(y, 4, 0.0, seed=0)
    # feasible count-wise, but one class per label and tiny alpha: never balanced
    with pytest.raises(ValueError, match="raise alpha"):
        jdd.dirichlet(y, 20, 0.001, seed=0, min_size=60, max_tries=5)


def test_shards_partition(digits):
    y = digits.y_train
    parts = jdd.shards(y, 10, shards_per_worker=2, seed=0)
    assert_partition(parts, len(y))
    for p in parts:
        assert len(np.unique(y[p])) <= 2 * 2
    dist = jdd.label_distribution(y, parts, 10)
    assert (dist > 0).sum(axis=1).mean() < 4  # far from the 10 labels of iid
    assert jdd.heterogeneity(y, parts, 10) > 0.5
    with pytest.raises(ValueError, match="shards"):
        jdd.shards(y, 1000, 2, seed=0)


def test_label_distribution_and_heterogeneity_definition():
    y = np.array([0, 0, 1, 1, 2, 2])
    parts = [np.array([0, 1]), np.array([2, 3, 4, 5])]
    dist = jdd.label_distribution(y, parts, 4)
    np.testing.assert_allclose(dist, [[1, 0, 0, 0], [0, 0.5, 0.5, 0]])
    pooled = np.array([1, 1, 1, 0]) / 3
    tv = 0.5 * np.abs(dist - pooled).sum(axis=1)
    assert jdd.heterogeneity(y, parts, 4) == pytest.approx(tv.mean())
    assert jdd.heterogeneity(y, [np.array([0, 2, 4]), np.array([1, 3, 5])], 3) == 0


def test_test_split_like_follows_train_proportions(digits):
    ds = digits
    parts = jdd.dirichlet(ds.y_train, 6, 0.3, seed=0)
    test = jdd.test_split_like(ds.y_train, parts, ds.y_test, seed=0, size=40)
    assert len(test) == 6
    p_tr = jdd.label_distribution(ds.y_train, parts, 10)
    p_te = jdd.label_distribution(ds.y_test, test, 10)
    for t in test:
        assert len(np.unique(t)) == len(t) == 40  # no duplicates within a worker
        assert t.min() >= 0 and t.max() < len(ds.y_test)
    assert np.abs(p_tr - p_te).sum(axis=1).max() < 0.1
    # a class asked for more often than the test set holds it is capped, not repeated
    big = jdd.test_split_like(ds.y_train, parts, ds.y_test, seed=0, size=400)
    for t in big:
        assert len(np.unique(t)) == len(t) <= 400
    # default size is proportional to the training share
    default = jdd.test_split_like(ds.y_train, parts, ds.y_test, seed=0)
    share = np.array([len(p) for p in parts]) / len(ds.y_train)
    np.testing.assert_allclose(
        [len(t) for t in default], share * len(ds.y_test), atol=2
    )


# -------------------------------------------------------------- stacking


def index_data(counts):
    """Dataset where sample j has label j and features encoding j; parts by counts."""
    total = int(sum(counts))
    x = np.arange(total, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    y = np.arange(total, dtype=np.int32)
    bounds = np.cumsum([0, *counts])
    parts = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return x, y, parts


def test_stack_layout_and_padding():
    counts = [3, 1, 5]
    x, y, parts = index_data(counts)
    data = jdd.stack(x, y, parts)
    assert data.x.shape == (3, 5, 3) and data.y.shape == (3, 5)
    assert data.y.dtype == jnp.int32 and data.counts.dtype == jnp.int32
    np.testing.assert_array_equal(data.counts, counts)
    assert data.num_workers == 3 == jdd.num_workers(data)
    (xf, yf), mask = jdd.full_batch(data)
    np.testing.assert_array_equal(mask.sum(axis=1), counts)
    for i, p in enumerate(parts):
        np.testing.assert_array_equal(yf[i, : counts[i]], y[p])
        assert not np.any(np.asarray(xf[i, counts[i] :]))  # zero padding
    with pytest.raises(ValueError, match="non-empty"):
        jdd.stack(x, y, [parts[0], np.array([], np.int64)])
    with pytest.raises(ValueError, match="outside"):
        jdd.stack(x, y, [np.array([0, 99])])
    with pytest.raises(ValueError, match="same N"):
        jdd.stack(x, y[:-1], parts)


def test_from_worker_arrays_matches_synthetic_classification():
    x, y = jdd.heterogeneous_classification(4, 30, 5, 3, seed=0, alpha=0.2)
    assert x.shape == (4, 30, 5) and y.shape == (4, 30) and y.dtype == np.int32
    assert y.min() >= 0 and y.max() < 3
    data = jdd.from_worker_arrays(x, y)
    np.testing.assert_array_equal(data.counts, [30] * 4)
    small = jdd.heterogeneous_classification(20, 200, 5, 5, seed=0, alpha=0.05)[1]
    big = jdd.heterogeneous_classification(20, 200, 5, 5, seed=0, alpha=100.0)[1]
    parts = [np.arange(i * 200, (i + 1) * 200) for i in range(20)]
    h_small = jdd.heterogeneity(small.reshape(-1), parts, 5)
    h_big = jdd.heterogeneity(big.reshape(-1), parts, 5)
    assert h_small > 3 * h_big


# -------------------------------------------------------------- samplers


@pytest.mark.parametrize("replace", [True, False])
def test_sampler_jit_determinism_and_no_padding(replace):
    counts = [3, 1, 7, 4]
    x, y, parts = index_data(counts)
    data = jdd.stack(x, y, parts)
    sample = jax.jit(jdd.make_sampler(data, 5, replace=replace))
    key = jax.random.key(0)
    xb, yb = sample(key, 3)
    assert xb.shape == (4, 5, 3) and yb.shape == (4, 5)
    xb2, yb2 = sample(key, 3)
    np.testing.assert_array_equal(yb, yb2)
    np.testing.assert_array_equal(xb, xb2)
    steps = [np.asarray(sample(key, t)[1]) for t in range(40)]
    assert not all(np.array_equal(steps[0], s) for s in steps[1:])
    for s in steps:
        for i, p in enumerate(parts):
            assert set(s[i].tolist()) <= set(p.tolist()), (
                "sampled padding or a stranger"
            )
    # features travel with labels
    np.testing.assert_array_equal(np.asarray(xb)[..., 0], np.asarray(yb))
    other = sample(jax.random.key(1), 3)[1]
    assert not np.array_equal(np.asarray(other), np.asarray(yb))


def test_sampler_with_replacement_is_uniform():
    counts = [4, 9]
    x, y, parts = index_data(counts)
    sample = jax.jit(jdd.make_sampler(jdd.stack(x, y, parts), 500))
    ys = np.asarray(sample(jax.random.key(3), 0)[1])
    for i, p in enumerate(parts):
        freq = np.bincount(ys[i] - p[0], minlength=counts[i]) / 500
        assert np.abs(freq - 1 / counts[i]).max() < 0.08


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_sampler_without_replacement_epochs(batch_size):
    counts = [5, 3, 7, 2]
    x, y, parts = index_data(counts)
    data = jdd.stack(x, y, parts)
    sample = jax.jit(jdd.make_sampler(data, batch_size, replace=False))
    key = jax.random.key(42)
    steps = 3 * int(np.lcm.reduce(counts)) // batch_size + 1
    stream = np.concatenate(
        [np.asarray(sample(key, t)[1]) for t in range(steps)], axis=1
    )
    for i, p in enumerate(parts):
        c = counts[i]
        epochs = stream[i, : (stream.shape[1] // c) * c].reshape(-1, c)
        assert len(epochs) >= 3
        for e in epochs:
            np.testing.assert_array_equal(np.sort(e), p)  # each sample exactly once
        if c > 2:  # orders change between epochs (probability ~1)
            assert len({tuple(e) for e in epochs}) > 1


def test_sampler_without_replacement_uniform_permutations():
    counts = [3, 5]
    x, y, parts = index_data(counts)
    sample = jax.jit(jdd.make_sampler(jdd.stack(x, y, parts), 60, replace=False))
    key = jax.random.PRNGKey(11)  # legacy raw uint32 keys work too
    ys = np.concatenate([np.asarray(sample(key, t)[1][0]) for t in range(150)])
    epochs = ys.reshape(-1, 3)
    perms, freq = np.unique(epochs, axis=0, return_counts=True)
    assert len(perms) == 6
    expected = len(epochs) / 6
    chi2 = ((freq - expected) ** 2 / expected).sum()
    assert chi2 < 30, (perms, freq)  # df = 5; p < 1e-5 under uniformity


def test_sampler_inside_scan_and_validation():
    x, y, parts = index_data([2, 6])
    data = jdd.stack(x, y, parts)
    sample = jdd.make_sampler(data, 4, replace=False)

    def body(carry, t):
        xb, yb = sample(jax.random.key(7), t)
        return carry + jnp.sum(yb), yb

    @jax.jit
    def run_and_step_two():
        total, ys = jax.lax.scan(body, 0, jnp.arange(6))
        return total, ys, sample(jax.random.key(7), 2)[1]

    total, ys, y2 = run_and_step_two()
    np.testing.assert_array_equal(ys[2], y2)
    assert int(total) == int(ys.sum())
    with pytest.raises(ValueError, match="batch_size"):
        jdd.make_sampler(data, 0)
    with pytest.raises(ValueError, match="WorkerData"):
        jdd.make_sampler((x, y), 4)


# ------------------------------------------------------------- synthetic


def test_quadratic_optimum():
    a, b = jdd.heterogeneous_quadratics(6, 4, seed=0, heterogeneity=2.0)
    assert a.shape == (6, 4, 4) and b.shape == (6, 4)
    np.testing.assert_allclose(a, np.swapaxes(a, 1, 2))
    assert np.linalg.eigvalsh(a.astype(np.float64)).min() > 0.99
    x_star = jdd.quadratic_optimum(a, b)
    expect = np.linalg.solve(a.astype(np.float64).sum(0), b.astype(np.float64).sum(0))
    np.testing.assert_allclose(x_star, expect, rtol=1e-10)
    grads = np.einsum("nij,j->ni", a.astype(np.float64), x_star) - b
    np.testing.assert_allclose(grads.sum(axis=0), 0, atol=1e-5)
    assert np.abs(grads).max() > 1e-2  # heterogeneous: local gradients do not vanish
    a0, b0 = jdd.heterogeneous_quadratics(6, 4, seed=0, heterogeneity=0.0)
    np.testing.assert_allclose(a0, np.broadcast_to(a0[:1], a0.shape))
    np.testing.assert_allclose(b0, np.broadcast_to(b0[:1], b0.shape))


def test_heterogeneous_regression():
    x, y, w = jdd.heterogeneous_regression(5, 200, 3, seed=0, noise=0.0)
    assert x.shape == (5, 200, 3) and y.shape == (5, 200) and w.shape == (5, 3)
    np.testing.assert_allclose(y, np.einsum("nmd,nd->nm", x, w), rtol=1e-4, atol=1e-4)
    _, _, w0 = jdd.heterogeneous_regression(5, 10, 3, seed=0, heterogeneity=0.0)
    np.testing.assert_allclose(w0, np.broadcast_to(w0[:1], w0.shape))
    _, _, w1 = jdd.heterogeneous_regression(5, 10, 3, seed=0, heterogeneity=1.0)
    assert np.std(w1, axis=0).mean() > 0.1


def test_dirichlet_balance_caps_full_workers(digits):
    """balance=True: a worker at >= N/n samples receives no later class share, so
    no worker exceeds N/n by more than the largest single class it was dealt."""
    y = digits.y_train
    n, cap = 16, len(y) / 16
    plain = jdd.dirichlet(y, n, 0.1, seed=3, min_size=5)
    bal = jdd.dirichlet(y, n, 0.1, seed=3, min_size=5, balance=True)
    assert_partition(bal, len(y))
    largest_class = np.bincount(y).max()
    assert max(len(p) for p in bal) <= cap + largest_class
    assert np.std([len(p) for p in bal]) < np.std([len(p) for p in plain])
    with pytest.raises(ValueError, match="balance"):
        jdd.dirichlet(y, n, 0.1, seed=3, balance="yes")
