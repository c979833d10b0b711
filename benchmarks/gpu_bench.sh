#!/usr/bin/env bash
# GPU benchmark: bge-index end to end vs FlagEmbedding's encode on one GPU, with a full-size
# BGE-M3-shaped random checkpoint and 2,000+ documents of mixed length (Cranfield abstracts and XQuAD
# paragraphs in five languages: 4,280 documents, 8 to 1,000 tokens). Prints encode_bench.py's table:
# documents/s, tokens/s, the ratio, MFU against the measured fp16/bf16 matmul peak, peak RSS, and
# how closely the vectors agree. Sized to finish within 8 minutes on one H100/H200.
#
#   bash benchmarks/gpu_bench.sh
#
# Settings (environment):
#   BENCH_SHARED      the shared/ folder (checkpoint tool, XLM-R tokenizer, eval corpora); default ../shared or ./shared
#   BENCH_MODEL       an existing checkpoint; default: build the full-size one (24 layers, 1024 wide) in BENCH_WORK
#   BENCH_CORPUS      input paths (space-separated); default: the eval corpora above
#   BENCH_DOCUMENTS   use only the first N documents
#   BENCH_DEVICE      default cuda (cpu works, for checking the script)
#   BENCH_DTYPES      bge-index runs; default auto (fp16 on CUDA) and bf16 on CUDA, auto and fp32 elsewhere
#   FLAG_PYTHON       a Python that imports FlagEmbedding (transformers<5); default: python3 if it does
#   FLAG_PYTHONPATH   PYTHONPATH for it, e.g. wheels unpacked with pip install --target (GPU machines
#                     cannot download: carry flagembedding and "transformers<5" wheels there)
#   BENCH_NO_REFERENCE=1  skip the reference
#   BENCH_WORK        scratch folder (default: a temporary one); PYTHON: the Python with bge-index
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
python="${PYTHON:-python3}"
device="${BENCH_DEVICE:-cuda}"

shared="${BENCH_SHARED:-}"
if [[ -z "$shared" ]]; then
  for candidate in "$repo/../shared" "$repo/shared"; do
    [[ -d "$candidate" ]] && shared="$(cd "$candidate" && pwd)" && break
  done
fi

work="${BENCH_WORK:-}"
if [[ -z "$work" ]]; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
fi

model="${BENCH_MODEL:-}"
if [[ -z "$model" ]]; then
  [[ -n "$shared" ]] || { echo "gpu_bench: set BENCH_MODEL or BENCH_SHARED (no shared/ folder found)" >&2; exit 2; }
  model="$work/m3-full"
  if [[ ! -f "$model/config.json" ]]; then
    echo "building the full-size BGE-M3-shaped checkpoint in $model ..." >&2
    "$python" "$shared/tools/make_m3_checkpoint.py" "$model" --tokenizer "$shared/xlmr-tokenizer" >/dev/null
  fi
fi

if [[ -n "${BENCH_CORPUS:-}" ]]; then
  read -r -a corpus <<<"$BENCH_CORPUS"
else
  [[ -n "$shared" ]] || { echo "gpu_bench: set BENCH_CORPUS or BENCH_SHARED" >&2; exit 2; }
  corpus=("$shared/eval/cranfield-beir/corpus.jsonl")
  for language in en de zh ar hi ru ro th tr vi el es; do
    corpus+=("$shared/eval/xquad-beir/$language/corpus.jsonl")
  done
fi

if [[ "$device" == cuda* ]]; then dtypes="${BENCH_DTYPES:-auto,bf16}"; else dtypes="${BENCH_DTYPES:-auto,fp32}"; fi

args=(--model "$model" --corpus "${corpus[@]}" --device "$device" --dtypes "$dtypes" --work "$work")
[[ -n "${BENCH_DOCUMENTS:-}" ]] && args+=(--limit "$BENCH_DOCUMENTS")

if [[ "${BENCH_NO_REFERENCE:-0}" != "1" ]]; then
  flag_python="${FLAG_PYTHON:-$python}"
  if PYTHONPATH="${FLAG_PYTHONPATH:-}" "$flag_python" -c "import FlagEmbedding" 2>/dev/null; then
    args+=(--reference-python "$flag_python")
    [[ -n "${FLAG_PYTHONPATH:-}" ]] && args+=(--reference-pythonpath "$FLAG_PYTHONPATH")
  else
    echo "gpu_bench: FlagEmbedding does not import with $flag_python; reference skipped (set FLAG_PYTHON/FLAG_PYTHONPATH)" >&2
  fi
fi

[[ "$device" == cuda* ]] && command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
cd "$repo"
"$python" "$here/encode_bench.py" "${args[@]}"
