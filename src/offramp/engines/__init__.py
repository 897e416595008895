"""Inference engines that really skip compute: classify (row compaction), generate, reason."""
