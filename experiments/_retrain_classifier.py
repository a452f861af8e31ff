"""The command line both shipped-classifier scripts share (``train_digits_classifier.py``,
``train_mnist1d_classifier.py``): retrain deterministically, measure held-out accuracy, then either compare the
weights' sha256 with the shipped file (``--check``) or write the file atomically and print the constants to record.
Not a script itself."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from diffsteps.reference.digits_classifier import accuracy, serialize_state_dict


def retrain_main(argv, doc: str, *, train: Callable, held_out: Callable, train_config: dict, default_path: Path,
                 required_accuracy: float, weights_sha256: str, held_out_correct: tuple[int, int],
                 constants_module: str) -> int:
    """``train(seed=, epochs=, log=)`` → model; ``held_out()`` → a data module whose val split is measured;
    ``constants_module`` (dotted) holds ``WEIGHTS_SHA256``/``HELD_OUT_CORRECT``. Returns the exit status."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="output file (default: the package's shipped weights)")
    p.add_argument("--check", action="store_true", help="compare with the existing file instead of writing")
    p.add_argument("--seed", type=int, default=train_config["seed"])
    p.add_argument("--epochs", type=int, default=train_config["epochs"])
    args = p.parse_args(argv)
    out = args.out or default_path

    t0 = time.perf_counter()
    model = train(seed=args.seed, epochs=args.epochs, log=print)
    elapsed = time.perf_counter() - t0
    data = held_out()
    correct, total = accuracy(model, data.real_samples(split="val"), data.labels("val"))
    blob = serialize_state_dict(model)
    digest = hashlib.sha256(blob).hexdigest()
    print(f"trained in {elapsed:.1f} s; held-out accuracy {correct}/{total} = {100 * correct / total:.2f} %; "
          f"{len(blob)} bytes; sha256 {digest}")
    if correct / total < required_accuracy:
        print(f"ERROR: held-out accuracy below the required {100 * required_accuracy:.0f} %; not writing",
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
    # Write to a temporary file and rename, so a crash never leaves a truncated weights file behind.
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}-", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    os.chmod(tmp, 0o644)  # mkstemp creates the file private (0600); the shipped file must be world-readable
    os.replace(tmp, out)
    print(f"wrote {out}")
    if digest != weights_sha256 or (correct, total) != tuple(held_out_correct):
        print(f"NOTE: these differ from the recorded constants; set in src/{constants_module.replace('.', '/')}.py:\n"
              f'    WEIGHTS_SHA256 = "{digest}"\n'
              f"    HELD_OUT_CORRECT = ({correct}, {total})\n"
              "and update the accuracy quoted in its module docstring.")
    else:
        print("matches the recorded WEIGHTS_SHA256 and HELD_OUT_CORRECT")
    return 0
