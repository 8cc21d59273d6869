"""Running a generation job on one process or many.

Under ``accelerate launch --multi_gpu --num_processes N`` (GPUs, or CPU processes over gloo on a
machine without CUDA) every process builds the same batches from the prompts file and takes
its share of the batches still to do through accelerate's ``split_between_processes``: contiguous
runs of whole batches, so each image is computed in the very batch a single process would have
computed it in, and the union of the outputs is the single-process run's, image for image. After
each round of batches the processes gather how many images they wrote, so the main process shows
one progress bar for the whole job, and at the end the summary.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .folder import OutputFolder
from .prompts import ImageTask, batches


@dataclass(frozen=True)
class JobSummary:
    images: int
    already_done: int
    seconds: float
    pipeline_seconds: float
    processes: int
    missing: int = 0
    """Images of the job not in the folder when it ended (0 for a complete job)."""

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def seconds_per_image(self) -> float:
        """Pipeline time per image, summed over the processes."""
        return self.pipeline_seconds / self.images if self.images else 0.0

    @property
    def machinery_share(self) -> float:
        """Time outside the pipeline calls (seeding, saving, metadata, bookkeeping), as a share of the
        time in them."""
        busy = self.seconds * self.processes
        return (busy - self.pipeline_seconds) / self.pipeline_seconds if self.pipeline_seconds else 0.0

    def render(self) -> str:
        text = (
            f"{self.images} images written ({self.already_done} already there) by {self.processes} process(es) in "
            f"{self.seconds:.1f} s: {self.images_per_second:.2f} images/s, {self.seconds_per_image:.2f} s of pipeline "
            f"per image, job machinery {self.machinery_share:.1%} of the pipeline time"
        )
        if self.missing:
            text += f"\n{self.missing} images of the job are missing: run the same command again to make them"
        return text


def _key(task: ImageTask) -> tuple[int, int, int]:
    return task.index, task.image, task.seed


def run_job(
    pipe,
    tasks: list[ImageTask],
    folder: OutputFolder,
    *,
    batch_size: int,
    call_arguments: dict,
    row_fields: dict,
    progress=None,
    batch_fields=None,
) -> JobSummary:
    """Generate every image of ``tasks`` not yet in ``folder``. ``call_arguments`` go to every
    pipeline call, ``row_fields`` into every metadata row, and ``batch_fields()``, asked after each
    call, into the rows of its images (the gate ``gate_step="auto"`` chose); ``progress`` is told,
    on the main process, how many images were already there (``progress(n, already=True)``), then
    how many the whole job wrote since the last call (``progress(n)``)."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, gather_object

    state = PartialState()  # the one the command made
    started = time.perf_counter()
    # one process reads (and tidies) the folder; every process works from what it found
    done = folder.prepare_resume() if state.is_main_process else None
    if state.num_processes > 1:
        done = broadcast_object_list([done])[0]
    all_batches = batches(tasks, batch_size)
    # a batch with any image missing runs whole again: the batch decides an image's last bits
    pending = [batch for batch in all_batches if any(_key(task) not in done for task in batch)]
    already = sum(1 for task in tasks if _key(task) in done)
    if progress is not None and state.is_main_process and already:
        progress(already, already=True)
    rounds = math.ceil(len(pending) / state.num_processes)
    with state.split_between_processes(pending) as mine:
        mine = list(mine)
    written, pipeline_seconds = 0, 0.0
    for round_index in range(rounds):
        count = 0
        if round_index < len(mine):
            batch = mine[round_index]
            seconds, images = generate_batch(pipe, batch, call_arguments)
            pipeline_seconds += seconds
            extra = batch_fields() if batch_fields is not None else {}
            for task, image in zip(batch, images):
                if _key(task) in done:
                    continue
                row = dict(row_fields, **extra, file=task.file, index=task.index, image=task.image, seed=task.seed,
                           prompt=task.prompt, negative_prompt=task.negative_prompt, arguments=task.arguments,
                           seconds=seconds / len(batch), process=state.process_index)
                folder.save(image, task.file, row)
                count += 1
        written += count
        counts = gather_object([count]) if state.num_processes > 1 else [count]
        if progress is not None and state.is_main_process:
            progress(sum(counts))
    totals = gather_object([(written, pipeline_seconds)]) if state.num_processes > 1 else [(written, pipeline_seconds)]
    # every process's images are in place once all have gathered: what is missing now is missing
    finished = folder.done()
    missing = [sum(1 for task in tasks if _key(task) not in finished)]
    if state.num_processes > 1:
        missing = broadcast_object_list(missing)
    return JobSummary(
        images=sum(t[0] for t in totals),
        already_done=already,
        seconds=time.perf_counter() - started,
        pipeline_seconds=sum(t[1] for t in totals),
        processes=state.num_processes,
        missing=missing[0],
    )


def generate_batch(pipe, batch: list[ImageTask], call_arguments: dict):
    """One pipeline call for ``batch``: (seconds, PIL images)."""
    arguments = dict(call_arguments, **batch[0].arguments)
    arguments["prompt"] = [task.prompt for task in batch]
    if batch[0].negative_prompt is not None:
        arguments["negative_prompt"] = [task.negative_prompt for task in batch]
    # one CPU generator per image: the same latents whatever the device and the batch
    arguments["generator"] = [torch.Generator("cpu").manual_seed(task.seed) for task in batch]
    start = time.perf_counter()
    with torch.no_grad():
        result = pipe(**arguments, output_type="pil")
    seconds = time.perf_counter() - start
    images = getattr(result, "images", None)
    if images is None or len(images) != len(batch):
        raise RuntimeError(f"{type(pipe).__name__} returned no list of {len(batch)} images; `generate` writes images")
    return seconds, images
