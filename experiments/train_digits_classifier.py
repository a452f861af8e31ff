"""Train the digits classifier behind the ``digits`` sample-quality features and write its weights.

    python experiments/train_digits_classifier.py          # writes src/diffsteps/reference/assets/digits_classifier.pt
    python experiments/train_digits_classifier.py --check  # retrains, compares with the shipped file, writes nothing

Training is deterministic (see ``diffsteps.reference.digits_classifier``): on the same platform and torch version the output
is bit-identical to the shipped file, so its sha256 equals ``WEIGHTS_SHA256``. If it differs (another CPU or torch
version), the script says so and prints the two constants to record in ``src/diffsteps/reference/digits_classifier.py``;
until they are updated, loading the new file fails the checksum, by design.
About 15–30 s on one CPU core.
"""

from __future__ import annotations

import sys
from pathlib import Path

from diffsteps.data import DigitsData
from diffsteps.reference import digits_classifier as ref
from diffsteps.training.classifier import train_digits_classifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _retrain_classifier import retrain_main


def main(argv=None) -> int:
    return retrain_main(argv, __doc__, train=train_digits_classifier,
                        held_out=lambda: DigitsData(val_fraction=ref.TRAIN_CONFIG["val_fraction"],
                                                    seed=ref.TRAIN_CONFIG["data_seed"]),
                        train_config=ref.TRAIN_CONFIG, default_path=ref.default_weights_path(), required_accuracy=0.97,
                        weights_sha256=ref.WEIGHTS_SHA256, held_out_correct=ref.HELD_OUT_CORRECT,
                        constants_module=ref.__name__)


if __name__ == "__main__":
    sys.exit(main())
