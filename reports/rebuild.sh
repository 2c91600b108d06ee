#!/usr/bin/env bash
# Maintainers: rebuild the checked-in example reports under reports/ (commands run without --out write under the
# git-ignored runs/ instead, so a user's run never touches these files).
#
#   reports/rebuild.sh [FLAG...] [main] [memory] [identity]      (no group: all three, in this order)
#
# FLAGs (e.g. --overwrite, --recompute) go to every command; a finished run with the same settings is otherwise
# kept as it is. Times on 2 CPU cores: main 5-15 min per model, memory 1-2 h per model, identity ~1 h (six from-scratch
# grids of ~15 min and the LoRA fine-tuning). Run from the repository root in the installed virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."

flags=() groups=()
for arg in "$@"; do
  case "$arg" in
    -*) flags+=("$arg") ;;
    main|memory|identity) groups+=("$arg") ;;
    *) echo "rebuild.sh: unknown group '$arg' (main, memory, identity)" >&2; exit 2 ;;
  esac
done
[ ${#groups[@]} -gt 0 ] || groups=(main memory identity)

run() { echo "+ bridgeprobe $*" >&2; bridgeprobe "$@" ${flags[@]+"${flags[@]}"}; }

for group in "${groups[@]}"; do
  case "$group" in
    main)  # before memory: --overwrite empties reports/MODEL, which holds memory/
      run run --out reports/smollm2-135m
      run run --model gemma3-270m --out reports/gemma3-270m ;;
    memory)
      run memory --model smollm2-135m --prompts curated --map-items 120 --stride 4 --out reports/smollm2-135m/memory
      run memory --model gemma3-270m --prompts curated --map-items 120 --stride 3 --out reports/gemma3-270m/memory ;;
    identity)
      run reproduce --out reports/identity/reproduce
      run reproduce --init-scales 0.3 --out reports/identity/knobs/init-scale-0.3
      run reproduce --weight-decays 1.0 --out reports/identity/knobs/weight-decay-1
      run reproduce --identity-repeats 1 --out reports/identity/knobs/identity-repeat-1
      run reproduce --model emb_mlp --untied --out reports/identity/knobs/emb-mlp-untied
      run reproduce --no-two-hop-training --out reports/identity/knobs/no-two-hop-training
      run finetune --model smollm2-135m --out reports/identity/finetune ;;
  esac
done
