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

# Teacher presets: name -> hub id, teacher enc-dec layers -> student enc-dec layers, and the
# dataset presets the checkpoint was already trained on. Students keep the encoder and halve the
# decoder (the same rule as distill/train.py's defaults): the encoder runs once per input but the
# decoder once per generated token, so decoder depth is what greedy latency pays for.
# A student learns only what its teacher knows: a teacher not trained on the dataset (bart-base
# on samsum) is first fine-tuned on it by the same engine (labels only), then distilled.
TEACHERS=(bart-base bart-large bart-large-cnn bart-large-xsum bart-large-cnn-samsum t5-small
          t5-base t5-large flan-t5-small flan-t5-base flan-t5-large flan-t5-base-samsum)
declare -A T_HUB=(
  [bart-base]=facebook/bart-base [bart-large]=facebook/bart-large
  [bart-large-cnn]=facebook/bart-large-cnn [bart-large-xsum]=facebook/bart-large-xsum
  [bart-large-cnn-samsum]=philschmid/bart-large-cnn-samsum
  [t5-small]=google-t5/t5-small [t5-base]=google-t5/t5-base [t5-large]=google-t5/t5-large
  [flan-t5-small]=google/flan-t5-small [flan-t5-base]=google/flan-t5-base
  [flan-t5-large]=google/flan-t5-large [flan-t5-base-samsum]=philschmid/flan-t5-base-samsum)
declare -A T_LAYERS=(  # teacher enc-dec -> student enc-dec
  [bart-base]="6-6 6-3" [bart-large]="12-12 12-6" [bart-large-cnn]="12-12 12-6"
  [bart-large-xsum]="12-12 12-6" [bart-large-cnn-samsum]="12-12 12-6" [t5-small]="6-6 6-3"
  [t5-base]="12-12 12-6" [t5-large]="24-24 24-12" [flan-t5-small]="8-8 8-4"
  [flan-t5-base]="12-12 12-6" [flan-t5-large]="24-24 24-12" [flan-t5-base-samsum]="12-12 12-6")
# Original T5 checkpoints were pre-trained on a mixture that includes CNN/DailyMail and WMT16
# En-Ro; FLAN-T5's instruction mixture includes all four dataset presets.
declare -A T_TRAINED_ON=(
  [bart-base]="" [bart-large]="" [bart-large-cnn]="cnn_dailymail" [bart-large-xsum]="xsum"
  [bart-large-cnn-samsum]="samsum" [t5-small]="cnn_dailymail wmt16-ro-en"
  [t5-base]="cnn_dailymail wmt16-ro-en" [t5-large]="cnn_dailymail wmt16-ro-en"
  [flan-t5-small]="samsum cnn_dailymail xsum wmt16-ro-en"
  [flan-t5-base]="samsum cnn_dailymail xsum wmt16-ro-en"
  [flan-t5-large]="samsum cnn_dailymail xsum wmt16-ro-en" [flan-t5-base-samsum]="samsum")
# Fine-tuning stage: peak learning rate per family (AdamW; BART's paper fine-tuned CNN/DM at
# 3e-5; T5 with AdamW rather than its original Adafactor is usually run at 1e-4 to 3e-4).
declare -A FT_LR=([bart]=3e-5 [mbart]=3e-5 [t5]=3e-4 [mt5]=3e-4)

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
       bash launch.sh TEACHER DATASET [--dry-run] [--finetune-teacher | --no-finetune-teacher] [FLAGS...]

With no arguments (or only flags) runs the offline demo: python -m distill.demo [FLAGS...]
(--smoke, --cache-dir DIR, --output-dir DIR, --teacher-local-path DIR, --seed N,
--force-retrain-teacher, --ce-init teacher|scratch, --labeled-rows N|all, --compare;
see python -m distill.demo --help).

TEACHER is a preset or a local model folder (save_pretrained; passed as --teacher-local-path):
$(for t in "${TEACHERS[@]}"; do read -r tl sl <<<"${T_LAYERS[$t]}"
  printf '  %-22s %-34s layers %-6s -> student %-6s trained on: %s\n' "$t" "${T_HUB[$t]}" "$tl" "$sl" "${T_TRAINED_ON[$t]:-(pre-trained only)}"; done)
  BART presets have a 50265-token vocabulary (bart-large-cnn/-xsum: 50264), T5 ones 32128;
  the student always takes its teacher's own.

A student learns only what its teacher knows: the teacher must already be good at the task.
A preset teacher not trained on the DATASET (e.g. bart-base on samsum, or any preset on a local
dataset) is first fine-tuned on it (labels only, all layers, learning rate 3e-5 for BART and
3e-4 for T5) into OUTPUT-teacher, then distilled from there; a completed OUTPUT-teacher is
reused. A local teacher folder is taken as already fine-tuned.
  --finetune-teacher      fine-tune the teacher first even when it is a folder or a trained preset
  --no-finetune-teacher   never fine-tune (you know the teacher is good at the task)

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
Several machines: HOSTFILE=hosts (DeepSpeed's hostfile, 'host slots=N' per machine) ->
  deepspeed --hostfile hosts distill/train.py ... (ssh to each host; same paths on every host,
  --output-dir on a filesystem all of them see).
Environment: NUM_GPUS (override the GPU count), CPU_RANKS, HOSTFILE, PYTHON, DEEPSPEED.
The options are checked once (python -m distill.preflight) before any rank starts.

Options:
  --dry-run    print the exact command of each stage (shell-quoted), one per line, and exit
  -h, --help   this help
FLAGS after the presets go to distill/train.py last, so they win over preset values
(e.g. --num-decoder-layers 2 --output-dir runs/mine); they apply to the fine-tuning stage too,
except the student's shape, alpha, learning rate and output folder. Default output:
./runs/TEACHER-DATASET.
EOF
}

die() { echo "launch.sh: $1" >&2; exit 2; }

DRY_RUN=0
FINETUNE=auto
ARGS=()
for a in "$@"; do
  case "$a" in
    --dry-run) DRY_RUN=1 ;;
    --finetune-teacher) FINETUNE=always ;;
    --no-finetune-teacher) FINETUNE=never ;;
    -h|--help) usage; exit 0 ;;
    *) ARGS+=("$a") ;;
  esac
done

show() {  # one shell-quoted line per command
  local first=1 a
  for a in "$@"; do
    if (( first )); then first=0; else printf ' '; fi
    printf '%q' "$a"
  done
  printf '\n'
}

run() {  # the last stage: becomes the process
  if (( DRY_RUN )); then show "$@"; exit 0; fi
  exec "$@"
}

stage() {  # an earlier stage: runs to its end; a failure ends the launch with its exit code
  if (( DRY_RUN )); then show "$@"; return 0; fi
  local rc=0
  "$@" || rc=$?
  (( rc == 0 )) || exit "$rc"
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
STUDENT_ARGS=()
MODEL_TYPE=""
TEACHER_LAYERS=""
if [[ -n "${T_HUB[$TEACHER]+x}" ]]; then
  MODEL_TYPE="bart"; [[ "$TEACHER" == *t5* ]] && MODEL_TYPE="t5"
  read -r TEACHER_LAYERS student <<<"${T_LAYERS[$TEACHER]}"
  CMD_ARGS+=(--model-type "$MODEL_TYPE" --teacher "${T_HUB[$TEACHER]}")
  STUDENT_ARGS=(--num-encoder-layers "${student%-*}" --num-decoder-layers "${student#*-}")
  TEACHER_NAME="$TEACHER"
  TRAINED_ON=" ${T_TRAINED_ON[$TEACHER]} "
elif [[ -d "$TEACHER" ]]; then
  # The folder's own config says the family and depth; distill/train.py checks it again. The
  # student shape is left to train.py's defaults (keep the encoder, halve the decoder).
  read -r MODEL_TYPE enc dec <<<"$("$PYTHON" -c 'import json, sys
try:
    c = json.load(open(sys.argv[1]))
    enc = c.get("encoder_layers") or c.get("num_layers") or "-"
    dec = c.get("decoder_layers") or c.get("num_decoder_layers") or enc
    print(c.get("model_type") or "-", enc, dec)
except Exception:
    print("- - -")' "$TEACHER/config.json")"
  case "$MODEL_TYPE" in bart|mbart|t5|mt5) CMD_ARGS+=(--model-type "$MODEL_TYPE") ;; *) MODEL_TYPE="" ;; esac
  [[ "$enc" =~ ^[0-9]+$ && "$dec" =~ ^[0-9]+$ ]] && TEACHER_LAYERS="$enc-$dec"
  CMD_ARGS+=(--teacher-local-path "$TEACHER")
  TEACHER_NAME="$(basename "$TEACHER")"
  TRAINED_ON="*"  # the user's own teacher: taken as fine-tuned for their data
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
OUT="./runs/$TEACHER_NAME-$DATASET_NAME"
for (( i = 0; i < ${#EXTRA[@]}; i++ )); do  # the user's --output-dir (the last one wins)
  case "${EXTRA[$i]}" in
    --output-dir) if (( i + 1 < ${#EXTRA[@]} )); then OUT="${EXTRA[$((i + 1))]}"; fi ;;
    --output-dir=*) OUT="${EXTRA[$i]#--output-dir=}" ;;
  esac
done

# Fine-tune the teacher first when it was not trained on this dataset.
case "$FINETUNE" in
  always) DO_FINETUNE=1 ;;
  never) DO_FINETUNE=0 ;;
  *) if [[ "$TRAINED_ON" == "*" || "$TRAINED_ON" == *" $DATASET "* ]]; then DO_FINETUNE=0; else DO_FINETUNE=1; fi ;;
esac
if (( DO_FINETUNE )) && [[ -z "$TEACHER_LAYERS" ]]; then
  die "cannot fine-tune '$TEACHER': its config.json gives no layer counts; fine-tune it yourself or pass --no-finetune-teacher"
fi
TEACHER_OUT="$OUT-teacher"

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
RANKS="${CPU_RANKS:-1}"
[[ "$RANKS" =~ ^[1-9][0-9]*$ ]] || die "CPU_RANKS='$RANKS' must be a positive number of ranks, e.g. CPU_RANKS=2"
LAUNCHER=("$PYTHON")  # one rank needs no launcher; train.py sets up a world of one
WORLD=1
if (( GPUS > 0 )); then
  WORLD="$GPUS"
  if [[ -z "${NUM_GPUS:-}" && -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    # deepspeed turns CUDA_VISIBLE_DEVICES into --include itself, but only without --num_gpus
    # (with it, it would take devices 0..N-1 whatever was made visible).
    LAUNCHER=("$DEEPSPEED")
    WORLD="$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)"
  else
    LAUNCHER=("$DEEPSPEED" --num_gpus "$GPUS")
  fi
elif (( RANKS > 1 )); then
  LAUNCHER=("$DEEPSPEED" --num_gpus "$RANKS")
  WORLD="$RANKS"
fi
if [[ -n "${HOSTFILE:-}" ]]; then
  # Several machines: DeepSpeed's multi-node launcher (ssh to each host of the hostfile; every
  # host needs the same paths, --output-dir on a shared filesystem). World = the slots listed.
  [[ -f "$HOSTFILE" ]] || die "HOSTFILE='$HOSTFILE' is not a file; pass DeepSpeed's hostfile (one 'host slots=N' line per machine)"
  WORLD=0
  while read -r host slots _; do
    [[ -z "$host" || "$host" == \#* ]] && continue
    [[ "$slots" =~ ^slots=([1-9][0-9]*)$ ]] || die "HOSTFILE '$HOSTFILE': line '$host $slots' has no slots=N; write one 'host slots=N' line per machine"
    WORLD=$(( WORLD + BASH_REMATCH[1] ))
  done < "$HOSTFILE"
  (( WORLD > 0 )) || die "HOSTFILE '$HOSTFILE' lists no host; write one 'host slots=N' line per machine"
  LAUNCHER=("$DEEPSPEED" --hostfile "$HOSTFILE")
fi
TRAIN=("$HERE/distill/train.py" --deepspeed "$HERE/ds_configs/zero2.json")
DISTILL_ARGS=("${CMD_ARGS[@]}" ${STUDENT_ARGS[@]+"${STUDENT_ARGS[@]}"} --output-dir "$OUT" ${EXTRA[@]+"${EXTRA[@]}"})
FT_ARGS=()
if (( DO_FINETUNE )); then
  # After the user's flags, so the teacher keeps all its layers, learns from labels only and
  # goes to its own folder; --resume continues an interrupted fine-tune.
  FT_ARGS=("${CMD_ARGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"} --num-encoder-layers "${TEACHER_LAYERS%-*}"
           --num-decoder-layers "${TEACHER_LAYERS#*-}" --alpha 1 --student-init teacher
           --learning-rate "${FT_LR[${MODEL_TYPE:-bart}]}" --output-dir "$TEACHER_OUT" --skip-report --resume)
fi

# Check the options once, in one quick process, before any rank starts: a bad flag would
# otherwise be found by every rank after its start-up. While the fine-tuning stage has still
# to make the teacher folder, the distill stage is checked with the preset's hub name instead.
FT_DONE=0
[[ -f "$TEACHER_OUT/model.safetensors" && -f "$TEACHER_OUT/distill_config.json" ]] && FT_DONE=1
if (( ! DRY_RUN )); then
  if (( DO_FINETUNE && ! FT_DONE )); then
    WORLD_SIZE="$WORLD" "$PYTHON" -m distill.preflight "${TRAIN[@]:1}" "${FT_ARGS[@]}" || exit $?
  fi
  WORLD_SIZE="$WORLD" "$PYTHON" -m distill.preflight "${TRAIN[@]:1}" "${DISTILL_ARGS[@]}" || exit $?
fi

if (( DO_FINETUNE )); then
  if (( FT_DONE )); then
    echo "launch.sh: the teacher fine-tuned on $DATASET_NAME is in $TEACHER_OUT; reusing it (delete it to fine-tune again)" >&2
  else
    (( DRY_RUN )) || echo "launch.sh: stage 1/2: fine-tuning the teacher on $DATASET_NAME into $TEACHER_OUT, as it was not trained on this dataset (--no-finetune-teacher skips this)" >&2
    stage "${LAUNCHER[@]}" "${TRAIN[@]}" "${FT_ARGS[@]}"
    (( DRY_RUN )) || echo "launch.sh: stage 2/2: distilling from the fine-tuned teacher" >&2
  fi
  DISTILL_ARGS+=(--teacher-local-path "$TEACHER_OUT")
fi
run "${LAUNCHER[@]}" "${TRAIN[@]}" "${DISTILL_ARGS[@]}"
