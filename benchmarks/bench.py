"""Speed benchmark: the same as `hybridlib bench` (see hybridlib/bench.py for what it measures).

    python benchmarks/bench.py params/imdb.yaml -p data_dir ../shared/data/imdb \
        -p tokenizer ../shared/tokenizers/bert-base-uncased [--json]
"""

import sys

from hybridlib.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
