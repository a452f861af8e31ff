"""Train the MNIST-1D classifier behind the ``mnist1d`` sample-quality features and write its weights.

    python experiments/train_mnist1d_classifier.py          # writes diffsteps/reference/assets/mnist1d_classifier.pt
    python experiments/train_mnist1d_classifier.py --check  # retrains, compares with the shipped file, writes nothing

Training is deterministic (see ``diffsteps.reference.mnist1d_classifier``): on the same platform and torch version the
output is bit-identical to the shipped file. If the hash differs (another CPU or torch version), the script prints the
constants to record in ``src/diffsteps/reference/mnist1d_classifier.py``. About 1.5–2 min on one CPU core.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffsteps.data import MNIST1DData
from diffsteps.reference.digits_classifier import accuracy, serialize_state_dict
from diffsteps.reference.mnist1d_classifier import (
    HELD_OUT_CORRECT,
    TRAIN_CONFIG,
    WEIGHTS_SHA256,
    default_weights_path,
)
from diffsteps.training.mnist1d_classifier import train_mnist1d_classifier

REQUIRED_ACCURACY = 0.90


def main(argv=None) -> int:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="output file (default: the package's shipped weights)")
    p.add_argument("--check", action="store_true", help="compare with the existing file instead of writing")
    p.add_argument("--seed", type=int, default=TRAIN_CONFIG["seed"])
    p.add_argument("--epochs", type=int, default=TRAIN_CONFIG["epochs"])
    args = p.parse_args(argv)
    out = args.out or default_weights_path()

    t0 = time.perf_counter()
    model = train_mnist1d_classifier(seed=args.seed, epochs=args.epochs, log=print)
    elapsed = time.perf_counter() - t0
    data = MNIST1DData()  # the published test split: seed 42, generated independently of the training set
    correct, total = accuracy(model, data.real_samples(split="val"), data.labels("val"))
    blob = serialize_state_dict(model)
    digest = hashlib.sha256(blob).hexdigest()
    print(f"trained in {elapsed:.1f} s; held-out accuracy {correct}/{total} = {100 * correct / total:.2f} %; "
          f"{len(blob)} bytes; sha256 {digest}")
    if correct / total < REQUIRED_ACCURACY:
        print(f"ERROR: held-out accuracy below the required {100 * REQUIRED_ACCURACY:.0f} %; not writing",
              file=sys.stderr)
        return 1

    if args.check:
        try:
            existing = hashlib.sha256(out.read_bytes()).hexdigest()
        except OSError as e:
            print(f"cannot read {out}: {e}", file=sys.stderr)
            return 1
        same = existing == digest
        print(f"{out}: sha256 {existing} -> {'identical to the retrained weights' if same else 'DIFFERS'}")
        return 0 if same else 1

    out.parent.mkdir(parents=True, exist_ok=True)
    # temporary file and rename: a crash never leaves a truncated weights file behind
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".mnist1d_classifier-", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    print(f"wrote {out}")
    if digest != WEIGHTS_SHA256 or (correct, total) != tuple(HELD_OUT_CORRECT):
        print("NOTE: these differ from the recorded constants; set in src/diffsteps/reference/mnist1d_classifier.py:\n"
              f'    WEIGHTS_SHA256 = "{digest}"\n'
              f"    HELD_OUT_CORRECT = ({correct}, {total})")
    else:
        print("matches the recorded WEIGHTS_SHA256 and HELD_OUT_CORRECT")
    return 0


if __name__ == "__main__":
    sys.exit(main())
