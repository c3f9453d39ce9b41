#!/usr/bin/env bash
# Reproduce the README's accuracy table for one params file: a full `hybridlib run` per branch set
# and seed, then `hybridlib compare` (mean ± std over seeds). Extra arguments go to every run.
#   benchmarks/ablation.sh params/imdb.yaml -p data_dir ../shared/data/imdb -p tokenizer ../shared/tokenizers/bert-base-uncased
#   SEEDS="42" BRANCHES="[cnn,lstm]" benchmarks/ablation.sh params/ag_news.yaml ...
set -euo pipefail
params=${1:?usage: benchmarks/ablation.sh PARAMS.yaml [-p KEY VALUE ...]}
shift
hybridlib=${HYBRIDLIB:-hybridlib}
seeds=${SEEDS:-"42 43 44"}
branch_sets=${BRANCHES:-"[cnn] [lstm] [cnn,lstm]"}
tag=${TAG:-$(basename "$params" .yaml)}
outputs=${HYBRIDLIB_OUTPUTS:-outputs}
for branches in $branch_sets; do
    for seed in $seeds; do
        name="ablation/${tag}-$(echo "$branches" | tr -d '[]' | tr , +)-seed${seed}"
        if [ -f "$outputs/$name/metrics.json" ]; then
            echo "skip $name (done)"
            continue
        fi
        /usr/bin/time -f "$name: %e s wall, %M KB peak RSS" \
            "$hybridlib" run "$params" --run-name "$name" -p branches "$branches" -p seed "$seed" "$@"
    done
done
"$hybridlib" compare "$outputs/ablation/${tag}-"* --out "$outputs/ablation/${tag}-comparison"
