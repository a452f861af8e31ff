"""Reporting on finished results: figures, and summaries of multiruns and sweeps. Cheap to import (Hydra builds
the multirun callback in every process)."""
