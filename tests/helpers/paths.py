"""Where the repository's files are, for tests that read them (README, benchmarks, sources)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HELPERS = Path(__file__).resolve().parent
