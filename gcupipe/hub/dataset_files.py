"""Rows of text out of a dataset's data files: JSON lines, JSON, plain text, parquet.

Every problem names the file and the line (or row) so a bad dataset is found, not guessed at.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gcupipe.errors import StageError

TEXT_SUFFIXES = (".jsonl", ".json", ".txt")


def read_texts(path: Path, label: str, text_field: str) -> list[str]:
    """The texts of one data file; `label` names it in errors (e.g. 'dataset hf:o/n x.jsonl').

    A `.txt` file is one text (like calibration.text_file); JSON files give one text per row
    from `text_field`; a `.json` file may hold JSON lines, a list of rows, or an object with
    one list of rows (the shapes the Hugging Face json loader accepts)."""
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8", errors="replace")]
    if path.suffix == ".parquet":
        return _parquet(path, label, text_field)
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError:
            return json_lines_texts(text, label, text_field)  # JSON lines named .json
        rows = _rows_of(document, label)
        return [
            _field(row, f"{label}: row {index}", text_field) for index, row in enumerate(rows, 1)
        ]
    return json_lines_texts(text, label, text_field)


def json_lines_texts(text: str, label: str, text_field: str) -> list[str]:
    """One text per non-blank JSON line; errors name `label`:line."""
    texts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StageError(f"{label}:{number}: not valid JSON ({exc.msg})") from exc
        texts.append(_field(row, f"{label}:{number}", text_field))
    return texts


def _rows_of(document: Any, label: str) -> list[Any]:
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        lists = [value for value in document.values() if isinstance(value, list)]
        if len(lists) == 1:
            return lists[0]
    raise StageError(f"{label}: expected a list of rows (or an object holding one list of rows)")


def _field(row: Any, where: str, text_field: str) -> str:
    if not isinstance(row, dict):
        raise StageError(f"{where}: a row is not a JSON object")
    if text_field not in row:
        fields = ", ".join(sorted(map(str, row))) or "none"
        raise StageError(
            f"{where}: no '{text_field}' field (fields: {fields}): set calibration.text_field"
        )
    value = row[text_field]
    if not isinstance(value, str):
        raise StageError(f"{where}: '{text_field}' is {type(value).__name__}, not a string")
    return value


def _parquet(path: Path, label: str, text_field: str) -> list[str]:
    # only called when pyarrow is installed (readable_suffixes)
    import pyarrow.parquet as pq

    columns = pq.read_schema(path).names
    if text_field not in columns:
        raise StageError(
            f"{label}: no '{text_field}' column (columns: {', '.join(columns) or 'none'}): "
            "set calibration.text_field"
        )
    values = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    for index, value in enumerate(values, 1):
        if not isinstance(value, str):
            raise StageError(f"{label}: row {index}: '{text_field}' is not a string")
    return [str(value) for value in values]
