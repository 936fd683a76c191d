"""The README's main job: decentralized SGD on real handwritten digits.

16 workers (Dirichlet alpha = 0.5 label skew over scikit-learn's bundled digits), an
MLP per worker, D-SGD on a ring, an exponential graph and the complete graph, plus
gradient tracking on the ring. Prints the final metrics (accuracy of the averaged
model, mean local test accuracy, consensus distance) and writes
``experiments/results/quickstart/{metrics.jsonl,summary.json,plot.png}``.

    python experiments/quickstart.py [--steps 1500] [--workers 16] [--alpha 0.5]
"""

import sys

from jaxdec.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["quickstart", *sys.argv[1:]]))
