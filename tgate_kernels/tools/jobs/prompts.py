"""Prompt files: what a generation job makes, image by image.

A prompts file is plain text (one prompt a line; empty lines skipped) or JSON Lines (``.jsonl``:
one object a line with ``prompt`` and optionally ``negative_prompt``, ``seed`` and any argument
of the pipeline's call). Each prompt gets ``images_per_prompt`` images; image ``k`` of a prompt
whose seed is ``s`` is generated from ``torch.Generator().manual_seed(s + k)``, and a prompt
without a seed gets ``base_seed + index * images_per_prompt``. So every image's seed depends on
its place in the file alone: a run is reproducible whatever the batch size or the number of
processes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

RESERVED = ("prompt", "negative_prompt", "seed")
JOB_ARGUMENTS = ("generator", "num_images_per_prompt", "output_type", "return_dict", "latents")
"""Pipeline arguments the job sets itself; a row may not."""


@dataclass(frozen=True)
class PromptRow:
    index: int
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    arguments: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ImageTask:
    """One image of a job."""

    index: int
    image: int
    seed: int
    prompt: str
    negative_prompt: str | None
    arguments: dict
    extension: str = "png"

    @property
    def file(self) -> str:
        return f"{self.index:06d}_{self.image:02d}.{self.extension}"

    @property
    def call_group(self) -> str:
        """Images of one group can share a pipeline call."""
        return json.dumps([self.negative_prompt is None, self.arguments], sort_keys=True, default=str)


class PromptFileError(ValueError):
    pass


def read_prompts(path: str) -> list[PromptRow]:
    """The rows of a prompts file; errors name the file and the line."""
    if not os.path.isfile(path):
        raise PromptFileError(f"--prompts {path!r}: no such file")
    json_lines = path.endswith((".jsonl", ".ndjson"))
    rows: list[PromptRow] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            text = line.strip()
            if not text:
                continue
            rows.append(_json_row(path, number, text, len(rows)) if json_lines else PromptRow(len(rows), text))
    if not rows:
        raise PromptFileError(f"--prompts {path!r}: the file holds no prompt")
    return rows


def _json_row(path: str, number: int, text: str, index: int) -> PromptRow:
    where = f"--prompts {path!r}, line {number}"
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        raise PromptFileError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        raise PromptFileError(f"{where}: expected an object with a non-empty string \"prompt\", got {text[:80]!r}")
    negative = row.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise PromptFileError(f"{where}: \"negative_prompt\" must be a string, got {negative!r}")
    seed = row.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise PromptFileError(f"{where}: \"seed\" must be an int >= 0, got {seed!r}")
    arguments = {key: value for key, value in row.items() if key not in RESERVED}
    taken = sorted(set(arguments) & set(JOB_ARGUMENTS))
    if taken:
        raise PromptFileError(f"{where}: {taken} are set by the job itself and may not be given per prompt")
    steps = arguments.get("num_inference_steps")
    if "num_inference_steps" in arguments and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise PromptFileError(f"{where}: \"num_inference_steps\" must be an int >= 1 (as --steps), got {steps!r}")
    return PromptRow(index, row["prompt"], negative, seed, arguments)


def check_arguments(rows: list[PromptRow], accepted: set[str], pipeline: str) -> None:
    """Refuse a row argument the pipeline's call does not take."""
    for row in rows:
        unknown = sorted(set(row.arguments) - accepted)
        if unknown:
            raise PromptFileError(
                f"prompt {row.index} ({row.prompt[:40]!r}): {pipeline} does not take {unknown}; "
                f"it takes {', '.join(sorted(accepted))}"
            )


def plan_images(rows: list[PromptRow], images_per_prompt: int, base_seed: int, negative_prompt: str | None,
                extension: str = "png") -> list[ImageTask]:
    tasks = []
    for row in rows:
        first = row.seed if row.seed is not None else base_seed + row.index * images_per_prompt
        negative = row.negative_prompt if row.negative_prompt is not None else negative_prompt
        for image in range(images_per_prompt):
            tasks.append(ImageTask(row.index, image, first + image, row.prompt, negative, row.arguments, extension))
    return tasks


def batches(tasks: list[ImageTask], batch_size: int) -> list[list[ImageTask]]:
    """Consecutive images, at most ``batch_size`` a call, a call's images sharing their arguments.
    Batches depend on the file alone, so every process of a job forms the same ones."""
    formed: list[list[ImageTask]] = []
    for task in tasks:
        last = formed[-1] if formed else None
        if last is not None and len(last) < batch_size and last[0].call_group == task.call_group:
            last.append(task)
        else:
            formed.append([task])
    return formed
