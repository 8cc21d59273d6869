"""The output folder of a generation job: images, ``metadata.jsonl`` and ``run.json``.

``run.json`` holds what decides the images (model, dtype, steps, T-GATE settings, ...): a rerun
into the same folder must ask for the same, or it is refused before anything is generated, so
one folder never mixes two runs. ``metadata.jsonl`` has one row per image, appended after the
image is in place; an image counts as done when its row and its file are both there. Images are
written to a temporary name and renamed, so a file cut short by a crash is never taken for a
finished one.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

RUN_FILE = "run.json"
METADATA_FILE = "metadata.jsonl"


class FolderError(ValueError):
    pass


class OutputFolder:
    def __init__(self, path: str) -> None:
        self.path = path

    def check_run(self, settings: dict) -> None:
        """Refuse a folder that holds another run's images; remember this run's settings."""
        run_file = os.path.join(self.path, RUN_FILE)
        if os.path.exists(run_file):
            with open(run_file, encoding="utf-8") as handle:
                previous = json.load(handle)
            differ = sorted(key for key in set(previous) | set(settings) if previous.get(key) != settings.get(key))
            if differ:
                shown = "; ".join(f"{key}: {previous.get(key)!r} there, {settings.get(key)!r} now" for key in differ[:4])
                raise FolderError(
                    f"--out {self.path!r} holds another run's images ({shown}); use another folder, or the same settings "
                    f"to resume that run"
                )
        elif os.path.exists(os.path.join(self.path, METADATA_FILE)):
            raise FolderError(f"--out {self.path!r} holds a {METADATA_FILE} but no {RUN_FILE}: not a folder of this tool")

    def write_run(self, settings: dict) -> None:
        os.makedirs(self.path, exist_ok=True)
        run_file = os.path.join(self.path, RUN_FILE)
        if not os.path.exists(run_file):
            self._write_atomically(run_file, (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode("utf-8"))

    def done(self) -> set[tuple[int, int, int]]:
        """(index, image, seed) of every image whose metadata row and file are both there."""
        metadata = os.path.join(self.path, METADATA_FILE)
        if not os.path.exists(metadata):
            return set()
        found = set()
        with open(metadata, encoding="utf-8") as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a row cut short by a crash: its image is made again
                if os.path.exists(os.path.join(self.path, row.get("file", ""))):
                    found.add((row["index"], row["image"], row["seed"]))
        return found

    def save(self, image, file: str, row: dict) -> None:
        """Write ``image`` as ``file`` (atomically), then its metadata row."""
        final = os.path.join(self.path, file)
        partial = final + ".partial"
        image.save(partial, format="PNG")
        os.replace(partial, final)
        self.append_rows([row])

    def append_rows(self, rows: Iterable[dict]) -> None:
        # one write per row in append mode: rows of concurrent processes do not interleave
        with open(os.path.join(self.path, METADATA_FILE), "a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, sort_keys=True, default=str) + "\n")
                handle.flush()

    @staticmethod
    def _write_atomically(path: str, data: bytes) -> None:
        partial = path + ".partial"
        with open(partial, "wb") as handle:
            handle.write(data)
        os.replace(partial, path)
