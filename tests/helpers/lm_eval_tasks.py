"""lm-evaluation-harness task files the hand-off tests write: a multiple-choice task over a local JSON file."""

from __future__ import annotations

from pathlib import Path

MC = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: {target}
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


def write_mc_task(folder: Path, name: str, data: Path, target: str) -> Path:
    """``folder/NAME.yaml``: task ``name`` asking each row's question of ``data`` with its ``choices``, the gold
    one named by the row's field ``target``."""
    path = folder / f"{name}.yaml"
    path.write_text(MC.format(name=name, data=data, target=target))
    return path
