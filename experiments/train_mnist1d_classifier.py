"""Train the MNIST-1D classifier behind the ``mnist1d`` sample-quality features and write its weights.

    python experiments/train_mnist1d_classifier.py          # writes diffsteps/reference/assets/mnist1d_classifier.pt
    python experiments/train_mnist1d_classifier.py --check  # retrains, compares with the shipped file, writes nothing

Training is deterministic (see ``diffsteps.reference.mnist1d_classifier``): on the same platform and torch version the
output is bit-identical to the shipped file. If the hash differs (another CPU or torch version), the script prints the
constants to record in ``src/diffsteps/reference/mnist1d_classifier.py``. About 1.5–2 min on one CPU core.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from diffsteps.data import MNIST1DData
from diffsteps.reference import mnist1d_classifier as ref
from diffsteps.training.mnist1d_classifier import train_mnist1d_classifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _retrain_classifier import retrain_main


def main(argv=None) -> int:
    torch.set_num_threads(1)
    # held out: the published test split (seed 42), generated independently of the training set
    return retrain_main(argv, __doc__, train=train_mnist1d_classifier, held_out=MNIST1DData,
                        train_config=ref.TRAIN_CONFIG, default_path=ref.default_weights_path(), required_accuracy=0.90,
                        weights_sha256=ref.WEIGHTS_SHA256, held_out_correct=ref.HELD_OUT_CORRECT,
                        constants_module=ref.__name__)


if __name__ == "__main__":
    sys.exit(main())
