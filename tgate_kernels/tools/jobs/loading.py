"""Loading a pipeline the way diffusers does, with one clear message when it cannot be had.

``--model`` is a local folder or a Hugging Face Hub id. A hub id is downloaded when the machine
is online, as ``from_pretrained`` does; ``--local-files-only`` or ``HF_HUB_OFFLINE=1`` forbid it,
and then only the local cache is read. A model that cannot be loaded gets one message saying
which of these happened.
"""

from __future__ import annotations

import os

import torch


class ModelUnavailable(RuntimeError):
    """A pipeline could not be loaded; the message says why."""


def offline() -> bool:
    """Whether Hugging Face downloads are switched off for this process (``HF_HUB_OFFLINE``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def _is_hub_id(model: str) -> bool:
    """``owner/name``, as Hub repository ids are written."""
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~")) and ".." not in model


def load_pipeline(model: str, *, device: str, dtype: torch.dtype, variant: str | None = None, local_files_only: bool = False,
                  revision: str | None = None, cache_dir: str | None = None):
    """``DiffusionPipeline.from_pretrained(model, ...)`` on ``device`` in ``dtype``, progress bar off."""
    from diffusers import DiffusionPipeline

    folder = os.path.expanduser(model)
    if os.path.isdir(folder):
        source, where = folder, f"the folder {folder!r}"
    elif not _is_hub_id(model):
        raise ModelUnavailable(f"--model {model!r}: no such folder (a local pipeline folder or a Hugging Face Hub id is expected)")
    else:
        source = model
        no_download = local_files_only or offline()
        why = "--local-files-only" if local_files_only else "HF_HUB_OFFLINE=1"
        where = (
            f"the local Hugging Face cache (downloading is off: {why})" if no_download else "the Hugging Face Hub (download)"
        )
    options = {"local_files_only": local_files_only} if local_files_only else {}
    if dtype != torch.float32:
        options["torch_dtype"] = dtype  # float32 is the default; asking for it only draws a warning
    for name, value in (("variant", variant), ("revision", revision), ("cache_dir", cache_dir)):
        if value is not None:
            options[name] = value
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **options)
    except Exception as error:  # diffusers and huggingface_hub raise many kinds for "not there"
        first = " ".join(str(error).split())
        cause = f"{type(error).__name__}: {first[:200]}{'...' if len(first) > 200 else ''}"
        advice = ""
        if source == model and (local_files_only or offline()):
            advice = (f"; download it once while online (`huggingface-cli download {model}`), or give --model a local "
                      f"pipeline folder")
        raise ModelUnavailable(f"could not load a diffusers pipeline {model!r} from {where} ({cause}){advice}") from error
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
