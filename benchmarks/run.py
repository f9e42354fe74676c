"""puregpt's benchmarks: one command each, a Markdown table on stdout, JSON in benchmarks/results/.

    python benchmarks/run.py all               # everything (about 10-20 minutes)
    python benchmarks/run.py train-tiny        # microgpt: puregpt vs scalar autograd vs PyTorch
    python benchmarks/run.py race              # the 1000-step microgpt run, fresh processes
    python benchmarks/run.py train-large       # ~200K parameters: MAC/s vs the dot ceiling, workers
    python benchmarks/run.py sample            # KV-cached generation vs full re-forward
    python benchmarks/run.py gpt2              # GPT-2 124M shape: import, load, decode, memory
    python benchmarks/run.py memory            # peak RSS of training, fresh processes
    python benchmarks/run.py notebook          # notebooks/walkthrough.ipynb, Run All (< 3 min)
    python benchmarks/run.py explain           # seconds per x-ray page (puregpt explain), < 1 s
    python benchmarks/run.py compare           # a 4-run grid: --jobs 2 vs one after another
    python benchmarks/run.py all --quick       # tiny sizes, for CI (asserts the checks, not speed)

Every benchmark compares within ONE run (ratios), alternating the contenders and keeping each
one's best repeat, because the machine is shared and noisy. See benchmarks/README.md for what each
measures and how. Every speed comparison is paired with an equality check (losses, gradients or
tokens) that raises when it fails: a faster wrong answer is not a result.

This file only dispatches: each benchmark is benchmarks/bench_NAME.py, and what they share
(timing, alternation, sizes and --quick, tables, JSON) is benchmarks/harness.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:  # when loaded by path rather than run as a script
    sys.path.insert(0, str(BENCH_DIR))

import bench_explain  # noqa: E402
import bench_compare  # noqa: E402
import bench_gpt2  # noqa: E402
import bench_memory  # noqa: E402
import bench_notebook  # noqa: E402
import bench_race  # noqa: E402
import bench_sample  # noqa: E402
import bench_train_large  # noqa: E402
import bench_train_tiny  # noqa: E402
import harness  # noqa: E402

# The command line's names, in the order `all` runs them and the summary lists them.
BENCHMARKS = {
    "train-tiny": bench_train_tiny,
    "race": bench_race,
    "train-large": bench_train_large,
    "sample": bench_sample,
    "memory": bench_memory,
    "notebook": bench_notebook,
    "explain": bench_explain,
    "compare": bench_compare,
    "gpt2": bench_gpt2,
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("_") and argv[0].endswith("-child"):  # harness.child_command
        BENCHMARKS[argv[0][1:-len("-child")]].child(argv[1:])
        return 0
    args = harness.parse_args(
        BENCHMARKS, argv,
        epilog="all runs train-tiny (with the race), train-large, sample and memory.")
    names = list(BENCHMARKS) if "all" in args.benchmarks else list(dict.fromkeys(args.benchmarks))
    if "train-tiny" in names and "race" in names and not args.no_race:
        names.remove("race")  # train-tiny runs it
    return harness.run(BENCHMARKS, names, args)


if __name__ == "__main__":
    raise SystemExit(main())
