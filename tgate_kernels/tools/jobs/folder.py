"""The output folder of a generation job: images, ``metadata.jsonl`` and ``run.json``.

``run.json`` identifies the job: everything that decides its images (the prompts file's
content, model, dtype, steps, batch size, T-GATE's config, ...). A rerun into the same folder
must ask for the same job, or it is refused before anything is generated, so one folder never
mixes two jobs. ``metadata.jsonl`` has one row per image, appended after the image is in place;
an image counts as done when its row and its file are both there. Images are written to a
temporary name and renamed, so a file cut short by a crash is never taken for a finished one.

A resume first puts the folder in order (:meth:`OutputFolder.prepare_resume`): a row cut short
by a crash, a row whose image the user deleted (to have it made again) and a stray partial file
go, so every image the job makes again gets exactly one row.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable

RUN_FILE = "run.json"
_FORMATS = {".jpg": "JPEG", ".webp": "WEBP"}
METADATA_FILE = "metadata.jsonl"


class FolderError(ValueError):
    pass


class OutputFolder:
    def __init__(self, path: str, image_quality: int = 95) -> None:
        self.path = path
        self.image_quality = image_quality
        """JPEG/WebP quality of the images saved (PNG is lossless)."""

    def check_run(self, settings: dict, as_of_now: Callable[[dict], dict] | None = None) -> None:
        """Refuse a folder that holds another run's images; remember this run's settings.
        ``as_of_now`` reads a ``run.json`` written by an earlier version as this one would write it
        (settings added since, at the defaults that behave as before)."""
        run_file = os.path.join(self.path, RUN_FILE)
        if os.path.exists(run_file):
            with open(run_file, encoding="utf-8") as handle:
                previous = json.load(handle)
            if as_of_now is not None:
                previous = as_of_now(previous)
            differ = sorted(key for key in set(previous) | set(settings) if previous.get(key) != settings.get(key))
            if differ:
                shown = "; ".join(f"{key}: {previous.get(key)!r} there, {settings.get(key)!r} now" for key in differ[:4])
                raise FolderError(
                    f"--out {self.path!r} holds another job's images ({shown}); use another folder, or the same prompts "
                    f"and settings to resume that job"
                )
        elif os.path.exists(os.path.join(self.path, METADATA_FILE)):
            raise FolderError(f"--out {self.path!r} holds a {METADATA_FILE} but no {RUN_FILE}: not a folder of this tool")

    def write_run(self, settings: dict) -> None:
        os.makedirs(self.path, exist_ok=True)
        run_file = os.path.join(self.path, RUN_FILE)
        if not os.path.exists(run_file):
            self._write_atomically(run_file, (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode("utf-8"))

    def _rows(self) -> tuple[list[dict], bool]:
        """The readable rows of images still there, one per image (the last), and whether the
        file holds anything else (a row cut short, a row of a deleted image, a repeated one)."""
        metadata = os.path.join(self.path, METADATA_FILE)
        if not os.path.exists(metadata):
            return [], False
        kept: dict[tuple, dict] = {}
        lines = 0
        with open(metadata, encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue
                lines += 1
                try:
                    row = json.loads(line)
                    key = (row["index"], row["image"], row["seed"])
                except (json.JSONDecodeError, TypeError, KeyError):
                    continue  # a row cut short by a crash: its image is made again
                if line.endswith("\n") and os.path.exists(os.path.join(self.path, str(row.get("file", "")))):
                    kept.pop(key, None)
                    kept[key] = row
        return list(kept.values()), lines != len(kept)

    def done(self) -> set[tuple[int, int, int]]:
        """(index, image, seed) of every image whose metadata row and file are both there."""
        return {(row["index"], row["image"], row["seed"]) for row in self._rows()[0]}

    def prepare_resume(self) -> set[tuple[int, int, int]]:
        """Put the folder in order for a resume (see the module) and return what is done. Run by
        one process while the others wait."""
        rows, untidy = self._rows()
        if untidy:
            data = "".join(json.dumps(row, sort_keys=True, default=str) + "\n" for row in rows).encode("utf-8")
            self._write_atomically(os.path.join(self.path, METADATA_FILE), data)
        if os.path.isdir(self.path):
            for name in os.listdir(self.path):
                if name.endswith(".partial"):
                    os.remove(os.path.join(self.path, name))
        return {(row["index"], row["image"], row["seed"]) for row in rows}

    def save(self, image, file: str, row: dict) -> None:
        """Write ``image`` as ``file`` (atomically; its format from its extension, a PNG carrying
        the prompt and seed as text), then its metadata row."""
        final = os.path.join(self.path, file)
        partial = final + ".partial"
        extension = os.path.splitext(file)[1].lower()
        if extension == ".png":
            from PIL.PngImagePlugin import PngInfo

            info = PngInfo()
            for key in ("prompt", "negative_prompt", "seed"):
                if row.get(key) is not None:
                    info.add_text(key, str(row[key]))
            image.save(partial, format="PNG", pnginfo=info)
        else:
            image.save(partial, format=_FORMATS[extension], quality=self.image_quality)
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
