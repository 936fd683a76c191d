"""The dataset switch the method reproductions share (not part of the library).

``digits`` is scikit-learn's bundled set (the ``--quick`` smoke runs); the
reproductions use Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package. A
missing package ends the script with the install command instead of a traceback.
"""

from __future__ import annotations

import sys

import jaxdec as jd

INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"


def load(dataset: str, **digits_kw) -> jd.data.Dataset:
    """``jd.data.load_digits(**digits_kw)`` for ``"digits"``, else Fashion-MNIST.

    Args:
      dataset: ``"digits"`` or ``"fashion_mnist"``.
      **digits_kw: forwarded to :func:`jaxdec.data.load_digits` (e.g. ``seed``).

    Returns:
      The :class:`jaxdec.data.Dataset`.
    """
    if dataset == "digits":
        return jd.data.load_digits(**digits_kw)
    if dataset != "fashion_mnist":
        raise ValueError(
            f"dataset must be 'digits' or 'fashion_mnist', got {dataset!r}."
        )
    try:
        return jd.data.load_fashion_mnist()
    except FileNotFoundError as err:
        sys.exit(f"{err}\n\nFashion-MNIST is missing: run `{INSTALL}` (or --quick).")
