#!/usr/bin/env bash
# launch.sh: presets (teacher, dataset) -> deepspeed or python; no arguments -> the offline demo.
#
# Every argument is kept as one array element from start to end (never re-split or eval'ed), so
# paths with spaces, quotes, `$(...)` or `;` reach the program literally and run nothing.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
DEEPSPEED="${DEEPSPEED:-deepspeed}"
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"  # `python -m distill.demo` from any folder

# Teacher presets: name -> hub id, model type, student encoder-decoder layers. Students keep the
# encoder and halve the decoder (DistilBART's 12-6): the encoder runs once per input but the
# decoder once per generated token, so decoder depth is what greedy latency pays for.
TEACHERS=(bart-base bart-large bart-large-cnn bart-large-xsum t5-small t5-base t5-large
          flan-t5-small flan-t5-base flan-t5-large)
declare -A T_HUB=(
  [bart-base]=facebook/bart-base [bart-large]=facebook/bart-large
  [bart-large-cnn]=facebook/bart-large-cnn [bart-large-xsum]=facebook/bart-large-xsum
  [t5-small]=google-t5/t5-small [t5-base]=google-t5/t5-base [t5-large]=google-t5/t5-large
  [flan-t5-small]=google/flan-t5-small [flan-t5-base]=google/flan-t5-base
  [flan-t5-large]=google/flan-t5-large)
declare -A T_LAYERS=(  # teacher enc-dec -> student enc-dec
  [bart-base]="6-6 6-3" [bart-large]="12-12 12-6" [bart-large-cnn]="12-12 12-6"
  [bart-large-xsum]="12-12 12-6" [t5-small]="6-6 6-3" [t5-base]="12-12 12-6"
  [t5-large]="24-24 24-12" [flan-t5-small]="8-8 8-4" [flan-t5-base]="12-12 12-6"
  [flan-t5-large]="24-24 24-12")

# Dataset presets: name -> hub name[:config], input column, target column, T5 prefix,
# max source / target tokens. Hub names are ones that load without a dataset script.
DATASETS=(samsum cnn_dailymail xsum wmt16-ro-en)
declare -A D_HUB=([samsum]=knkarthick/samsum [cnn_dailymail]=cnn_dailymail:3.0.0
  [xsum]=EdinburghNLP/xsum [wmt16-ro-en]=wmt16:ro-en)
declare -A D_IN=([samsum]=dialogue [cnn_dailymail]=article [xsum]=document
  [wmt16-ro-en]=translation.en)
declare -A D_OUT=([samsum]=summary [cnn_dailymail]=highlights [xsum]=summary
  [wmt16-ro-en]=translation.ro)
declare -A D_PREFIX=([samsum]="summarize: " [cnn_dailymail]="summarize: " [xsum]="summarize: "
  [wmt16-ro-en]="translate English to Romanian: ")
declare -A D_LEN=([samsum]="512 128" [cnn_dailymail]="1024 142" [xsum]="1024 64"
  [wmt16-ro-en]="128 128")

usage() {
  cat <<EOF
usage: bash launch.sh [--dry-run] [DEMO FLAGS...]
       bash launch.sh TEACHER DATASET [--dry-run] [FLAGS...]

With no arguments (or only flags) runs the offline demo: python -m distill.demo [FLAGS...]
(--smoke, --cache-dir DIR, --output-dir DIR, --teacher-local-path DIR, --seed N,
--force-retrain-teacher, --ce-init scratch|teacher; see python -m distill.demo --help).

TEACHER is a preset or a local model folder (save_pretrained; passed as --teacher-local-path):
$(for t in "${TEACHERS[@]}"; do read -r tl sl <<<"${T_LAYERS[$t]}"
  printf '  %-16s %-24s layers %-6s -> student %s\n' "$t" "${T_HUB[$t]}" "$tl" "$sl"; done)
  BART presets have a 50265-token vocabulary (bart-large-cnn/-xsum: 50264), T5 ones 32128;
  the student always takes its teacher's own.

DATASET is a preset or a local dataset (a folder or a json/jsonl/csv/tsv/parquet file; columns
come from --dataset-input-column / --dataset-target-column, default source / target):
$(for d in "${DATASETS[@]}"; do read -r sl tl <<<"${D_LEN[$d]}"
  printf '  %-14s %-20s %s -> %s (max %s/%s tokens)\n' "$d" "${D_HUB[$d]}" "${D_IN[$d]}" "${D_OUT[$d]}" "$sl" "$tl"; done)
  wmt16-ro-en stores pairs as translation.{en,ro}; distill/data.py flattens the nested field.
  T5 teachers get the dataset's prefix ("summarize: ", "translate English to Romanian: ").

Launcher: N GPUs (nvidia-smi -L, limited by CUDA_VISIBLE_DEVICES) ->
  deepspeed --num_gpus N distill/train.py --deepspeed ds_configs/zero2.json ...
No GPU -> python distill/train.py ... (one CPU rank), or with CPU_RANKS=K > 1
  deepspeed --num_gpus K ... (DeepSpeed's CPU accelerator, gloo backend).
Environment: NUM_GPUS (override the GPU count), CPU_RANKS, PYTHON, DEEPSPEED.

Options:
  --dry-run    print the exact command (shell-quoted) and exit
  -h, --help   this help
FLAGS after the presets go to distill/train.py last, so they win over preset values
(e.g. --num-decoder-layers 2 --output-dir runs/mine). Default output: ./runs/TEACHER-DATASET.
EOF
}

die() { echo "launch.sh: $1" >&2; exit 2; }

DRY_RUN=0
ARGS=()
for a in "$@"; do
  case "$a" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) ARGS+=("$a") ;;
  esac
done

run() {
  if (( DRY_RUN )); then
    local first=1 a
    for a in "$@"; do
      if (( first )); then first=0; else printf ' '; fi
      printf '%q' "$a"
    done
    printf '\n'
    exit 0
  fi
  exec "$@"
}

# No preset given: the demo, with any flags passed through.
if (( ${#ARGS[@]} == 0 )) || [[ "${ARGS[0]}" == -* ]]; then
  run "$PYTHON" -m distill.demo ${ARGS[@]+"${ARGS[@]}"}
fi

(( ${#ARGS[@]} >= 2 )) || die "expected TEACHER DATASET, found only '${ARGS[0]}'; see bash launch.sh --help"
TEACHER="${ARGS[0]}"
DATASET="${ARGS[1]}"
EXTRA=("${ARGS[@]:2}")

CMD_ARGS=()
MODEL_TYPE=""
if [[ -n "${T_HUB[$TEACHER]+x}" ]]; then
  MODEL_TYPE="bart"; [[ "$TEACHER" == *t5* ]] && MODEL_TYPE="t5"
  read -r _ student <<<"${T_LAYERS[$TEACHER]}"
  CMD_ARGS+=(--model-type "$MODEL_TYPE" --teacher "${T_HUB[$TEACHER]}"
             --num-encoder-layers "${student%-*}" --num-decoder-layers "${student#*-}")
  TEACHER_NAME="$TEACHER"
elif [[ -d "$TEACHER" ]]; then
  # The folder's own config says the family; distill/train.py checks it again when loading.
  MODEL_TYPE="$("$PYTHON" -c 'import json, sys
try:
    print(json.load(open(sys.argv[1])).get("model_type", ""))
except Exception:
    print("")' "$TEACHER/config.json")"
  case "$MODEL_TYPE" in bart|mbart|t5|mt5) CMD_ARGS+=(--model-type "$MODEL_TYPE") ;; *) MODEL_TYPE="" ;; esac
  CMD_ARGS+=(--teacher-local-path "$TEACHER")
  TEACHER_NAME="$(basename "$TEACHER")"
else
  die "unknown teacher '$TEACHER': not a preset and not a folder; known teachers: ${TEACHERS[*]}"
fi

if [[ -n "${D_HUB[$DATASET]+x}" ]]; then
  read -r max_src max_tgt <<<"${D_LEN[$DATASET]}"
  if [[ "$MODEL_TYPE" == *t5 ]] && (( max_src > 512 )); then
    max_src=512  # T5's relative positions allow more, but it was pre-trained on 512 tokens
  fi
  CMD_ARGS+=(--dataset "${D_HUB[$DATASET]}" --dataset-input-column "${D_IN[$DATASET]}"
             --dataset-target-column "${D_OUT[$DATASET]}"
             --max-source-length "$max_src" --max-target-length "$max_tgt")
  if [[ "$MODEL_TYPE" == *t5 ]]; then
    CMD_ARGS+=(--source-prefix "${D_PREFIX[$DATASET]}")  # T5 was pre-trained with task prefixes
  fi
  DATASET_NAME="$DATASET"
elif [[ -e "$DATASET" ]]; then
  CMD_ARGS+=(--dataset-local-path "$DATASET")
  DATASET_NAME="$(basename "$DATASET")"
  [[ -f "$DATASET" ]] && DATASET_NAME="${DATASET_NAME%.*}"  # data.jsonl -> data
else
  die "unknown dataset '$DATASET': not a preset and not a file or folder; known datasets: ${DATASETS[*]}"
fi
CMD_ARGS+=(--output-dir "./runs/$TEACHER_NAME-$DATASET_NAME")

# How many GPUs, and which launcher.
count_gpus() {
  if [[ -n "${NUM_GPUS:-}" ]]; then
    [[ "$NUM_GPUS" =~ ^[0-9]+$ ]] || die "NUM_GPUS='$NUM_GPUS' is not a number; use e.g. NUM_GPUS=2 or unset it"
    echo "$NUM_GPUS"; return
  fi
  if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]] && [[ -z "$CUDA_VISIBLE_DEVICES" || "$CUDA_VISIBLE_DEVICES" == -1* ]]; then
    echo 0; return  # GPUs hidden on purpose
  fi
  command -v nvidia-smi >/dev/null 2>&1 || { echo 0; return; }
  nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
}
GPUS="$(count_gpus)"
TRAIN=("$HERE/distill/train.py" --deepspeed "$HERE/ds_configs/zero2.json")
ALL=("${TRAIN[@]}" "${CMD_ARGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"})
if (( GPUS > 0 )); then
  if [[ -z "${NUM_GPUS:-}" && -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    # deepspeed turns CUDA_VISIBLE_DEVICES into --include itself, but only without --num_gpus
    # (with it, it would take devices 0..N-1 whatever was made visible).
    run "$DEEPSPEED" "${ALL[@]}"
  fi
  run "$DEEPSPEED" --num_gpus "$GPUS" "${ALL[@]}"
fi
RANKS="${CPU_RANKS:-1}"
[[ "$RANKS" =~ ^[1-9][0-9]*$ ]] || die "CPU_RANKS='$RANKS' must be a positive number of ranks, e.g. CPU_RANKS=2"
if (( RANKS == 1 )); then
  run "$PYTHON" "${ALL[@]}"  # one rank needs no launcher; train.py sets up a world of one
fi
run "$DEEPSPEED" --num_gpus "$RANKS" "${ALL[@]}"
