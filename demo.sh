#!/usr/bin/env bash
# The demo: a seeded random Llama-shaped checkpoint made locally (no hub), compiled to BF16
# artifacts, then xrun streams text from it. Random weights make random text: the point is the
# pipeline, not the prose.
set -euo pipefail
work=${1:-demo-work}
mkdir -p "$work"
python -m xcompile.toy llama "$work/checkpoint" > /dev/null
xcompile quantize "$work/checkpoint" -o "$work/artifacts" --bf16
xcompile inspect "$work/artifacts"
xrun "$work/artifacts" --prompt "Once upon a time" --max-new-tokens 24
xrun "$work/artifacts" --prompt "Once upon a time" --max-new-tokens 24 --json
