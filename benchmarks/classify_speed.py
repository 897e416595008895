"""Per-row early-exit classification speed vs the plain HF forward (JSON; ratios from one run).

    python benchmarks/classify_speed.py --json out.json            # MiniLM-L6 (offline)
    python benchmarks/classify_speed.py --mpnet --json out.json    # all-mpnet-base-v2, 12 layers
"""

from offramp.cli.bench import bench_main as main

if __name__ == "__main__":
    main()
