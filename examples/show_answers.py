"""Print a short table of `guardrail batch` output: what the gate decided and what came back."""

from __future__ import annotations

import json
import sys

path = sys.argv[1] if len(sys.argv) > 1 else "answers.jsonl"
with open(path, encoding="utf-8") as handle:
    records = [json.loads(line) for line in handle]
print(f"{'id':<6} {'gate':>7} {'fired':<6} {'path':<9} {'cost':>5} response")
for record in records:
    guard = record["guard"]
    score = guard["gate_score"]
    shown = f"{score - guard['threshold']:+7.2f}" if score is not None else "      -"
    cost = f"{guard['cost']:5.2f}" if guard.get("cost") is not None else "    -"
    text = " ".join(record["response"].split())
    row = f"{record['id']!s:<6} {shown} {guard['fired']!s:<6} {guard['path']:<9} {cost}"
    print(f"{row} {text[:84]}")
print("gate: score minus threshold; it fires above 0. cost: under the cost model (budget 5).")
