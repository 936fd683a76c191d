"""Data: load once to NumPy, partition over workers, sample per worker inside jit.

Every per-worker quantity has the worker axis first. The pipeline is

1. load a :class:`Dataset` (host NumPy): :func:`load_digits` (bundled),
   :func:`load_mnist`, :func:`load_fashion_mnist`, :func:`load_cifar10`,
   :func:`load_libsvm` (local files only, never downloaded, never unpickled);
2. partition the training indices over ``n`` workers: :func:`iid`,
   :func:`dirichlet`, :func:`shards` (measure with :func:`label_distribution`,
   :func:`heterogeneity`; matching per-worker test sets with
   :func:`test_split_like`);
3. :func:`stack` into a padded :class:`WorkerData` (``x [n, m_max, ...]``,
   ``y [n, m_max]``, ``counts [n]``) on device;
4. :func:`make_sampler` gives ``sampler(key, step) -> (x [n, b, ...], y [n, b])``,
   jittable and pure.

Example:
  >>> import jax, jaxdec as jd
  >>> ds = jd.data.load_digits()
  >>> parts = jd.data.dirichlet(ds.y_train, n=8, alpha=0.3, seed=0)
  >>> data = jd.data.stack(ds.x_train, ds.y_train, parts)
  >>> sample = jd.data.make_sampler(data, batch_size=32)
  >>> x, y = jax.jit(sample)(jax.random.key(0), 0)   # [8, 32, 8, 8, 1], [8, 32]
"""

from jaxdec.data.datasets import (
    FASHION_MNIST_DIRS,
    Dataset,
    load_cifar10,
    load_digits,
    load_fashion_mnist,
    load_libsvm,
    load_mnist,
)
from jaxdec.data.partition import (
    dirichlet,
    heterogeneity,
    iid,
    label_distribution,
    shards,
    test_split_like,
)
from jaxdec.data.readers import read_cifar10_batch, read_idx, read_libsvm
from jaxdec.data.resample import dirichlet_proportions, label_resample_sampler
from jaxdec.data.synthetic import (
    heterogeneous_classification,
    heterogeneous_quadratics,
    heterogeneous_regression,
    quadratic_optimum,
)
from jaxdec.data.worker_data import (
    WorkerData,
    from_worker_arrays,
    full_batch,
    make_sampler,
    num_workers,
    stack,
    worker_full_batches,
)

__all__ = [
    "dirichlet_proportions",
    "label_resample_sampler",
    "Dataset",
    "FASHION_MNIST_DIRS",
    "load_digits",
    "load_mnist",
    "load_fashion_mnist",
    "load_cifar10",
    "load_libsvm",
    "read_idx",
    "read_cifar10_batch",
    "read_libsvm",
    "iid",
    "dirichlet",
    "shards",
    "label_distribution",
    "heterogeneity",
    "test_split_like",
    "WorkerData",
    "stack",
    "from_worker_arrays",
    "make_sampler",
    "full_batch",
    "worker_full_batches",
    "num_workers",
    "heterogeneous_quadratics",
    "quadratic_optimum",
    "heterogeneous_regression",
    "heterogeneous_classification",
]
