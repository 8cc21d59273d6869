"""Which arguments of a denoiser call carry the guidance parts, known by name.

After the gate a batched denoiser call runs on fewer parts, so every input that holds one row
(or one block of rows) per part is cut to the parts that run. Which inputs those are is known,
not guessed from shapes: a rotary table with one row per frame (Allegro's), a position table or a
coordinate grid can have as many rows as the batch without belonging to it. Arguments are
matched by the names diffusers' denoisers give them; a tensor argument of a name in neither list
whose rows equal the call's batch is refused at the first call, before anything is cached.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.utils import BaseOutput

from .guidance import part_rows, spread_parts

CARRY_PARTS = frozenset(
    {
        # the latents and the text
        "sample", "hidden_states", "encoder_hidden_states", "encoder_hidden_states_t5",
        "encoder_hidden_states_image", "encoder_hidden_states_mask", "encoder_attention_mask", "encoder_mask",
        "encoder_hidden_states_1", "encoder_attention_mask_1", "encoder_hidden_states_llama3", "pooled_embeds",
        "attention_mask", "text_embedding_mask", "text_embedding_mask_t5", "pooled_projections",
        "global_hidden_states",
        # per-sample conditioning
        "timestep", "timesteps", "timestep_cond", "class_labels", "added_cond_kwargs", "added_time_ids", "image_meta_size",
        "style", "guidance", "fps", "ofs", "additional_t_cond", "condition_mask", "padding_mask", "video_coords",
        "image_latents", "image_embeddings",
        # control
        "controlnet_cond", "conditioning_mask", "down_block_additional_residuals", "mid_block_additional_residual",
        "down_intrablock_additional_residuals", "controlnet_block_samples", "controlnet_single_block_samples",
        "block_controlnet_hidden_states", "control_hidden_states", "control_type",
    }
)
"""Arguments holding one row, or one equal block of rows (text states repeated per frame), per
guidance part."""

SHARED = frozenset(
    {
        "image_rotary_emb", "rotary_embedding", "rotary_emb", "rope_interpolation_scale", "visual_rope_pos",
        "text_rope_pos", "img_ids", "txt_ids", "img_shapes", "num_frames", "height", "width", "scale_factor",
        "sparse_params", "skip_layers", "enable_temporal_attentions", "enable_diffusion_forcing",
        "conditioning_scale", "control_hidden_states_scale", "guess_mode", "controlnet_blocks_repeat", "control_type_idx",
        "cross_attention_kwargs", "attention_kwargs", "joint_attention_kwargs", "return_dict",
    }
)
"""Arguments shared by every part: positions, rotary tables, sizes, options."""

TEXT = frozenset(
    {
        "encoder_hidden_states", "encoder_hidden_states_t5", "encoder_hidden_states_1", "encoder_attention_mask",
        "encoder_attention_mask_1", "encoder_hidden_states_mask", "encoder_mask", "attention_mask", "text_embedding_mask",
        "text_embedding_mask_t5", "pooled_projections", "global_hidden_states", "text_rope_pos", "txt_ids",
        "prompt_embeds", "added_cond_kwargs", "encoder_hidden_states_llama3", "pooled_embeds",
    }
)
"""Arguments through which the prompt (or the negative prompt) reaches a denoiser: the only ones
in which separate calls per guidance part may differ."""

PARTS_ALONG = {"encoder_hidden_states_llama3": 1}
"""Arguments whose rows per part lie along another dimension than the first (HiDream's Llama
states, one slice per layer first)."""

CARRY_PARTS_WITHIN = {"cross_attention_kwargs": frozenset({"gligen"})}
"""Entries of shared arguments that hold one block of rows per part (GLIGEN's grounding boxes,
embeddings and masks)."""


_TIMESTEP_NAMES = ("timestep", "timesteps", "t")


class UnknownDenoiserArgument(ValueError):
    pass


class GuidedArguments:
    """The arguments of one denoiser's ``forward``, by name."""

    def __init__(self, denoiser: torch.nn.Module, interleaved: frozenset[str] = frozenset()) -> None:
        self.denoiser = type(denoiser).__name__
        self.interleaved = interleaved
        """Arguments (``added_cond_kwargs['time_ids']``) the pipeline lays out one row per part for
        each image in turn, ``[negative, prompt, negative, prompt, ...]``, rather than in blocks."""
        parameters = list(inspect.signature(type(denoiser).forward).parameters.values())[1:]
        self.positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.sample = self.positional[0] if self.positional else "hidden_states"
        self._first_call: tuple[str, dict] | None = None
        self._separate_checked = False

    def compare_separate_calls(self, part: str, args: tuple, kwargs: dict) -> None:
        """With separate calls per part, refuse a call that differs from the first part's call in
        anything but the text: that guidance would be dropped with the text's after the gate."""
        named = {k: v for k, v in self.named(args, kwargs).items() if k not in TEXT and isinstance(v, torch.Tensor)}
        if self._first_call is None:
            self._first_call = (part, named)
            return
        first_part, first = self._first_call
        if part == first_part or self._separate_checked:
            return
        self._separate_checked = True
        for name, value in named.items():
            other = first.get(name)
            if other is not None and value is not other and (value.shape != other.shape or not torch.equal(value, other)):
                if name == self.sample:
                    raise UnknownDenoiserArgument(
                        f"{self.denoiser}: two calls of one step ran on different latents (`{name}` differs): separate "
                        f"calls are read as the guidance parts of one step, which all see the same latents, so these are "
                        f"other calls (as attend-and-excite's gradient steps make), which T-GATE cannot place. The call "
                        f"was stopped."
                    )
                raise UnknownDenoiserArgument(
                    f"{self.denoiser}: the {part} call differs from the {first_part} call in `{name}`, not only in the "
                    f"text: the pipeline guides by something else too (as a blanked face or a dropped image does), which "
                    f"T-GATE would drop with the text's guidance after the gate. The call was stopped."
                )

    def reset(self) -> None:
        self._first_call = None
        self._separate_checked = False

    def named(self, args: tuple, kwargs: dict) -> dict:
        named = dict(zip(self.positional, args))
        named.update(kwargs)
        return named

    def timestep(self, args: tuple, kwargs: dict):
        """The call's timestep argument (``None`` when it has none T-GATE knows)."""
        named = self.named(args, kwargs)
        for name in _TIMESTEP_NAMES:
            if name in named:
                return named[name]
        return None

    def rows(self, args: tuple, kwargs: dict) -> int | None:
        """Rows of the call's latents (its batch), ``None`` for a call without them."""
        sample = args[0] if args else kwargs.get(self.sample)
        return sample.shape[0] if isinstance(sample, torch.Tensor) and sample.ndim > 0 else None

    def check(self, args: tuple, kwargs: dict, rows: int) -> None:
        """Refuse a call with a tensor argument T-GATE does not know that has the batch's rows."""
        for name, value in self.named(args, kwargs).items():
            if name in CARRY_PARTS or name in SHARED:
                continue
            if _has_rows(value, rows):
                raise UnknownDenoiserArgument(
                    f"{self.denoiser}.forward got `{name}` with {rows} rows, the rows of the guided batch, and T-GATE "
                    f"does not know whether it holds one row per guidance part (to be cut after the gate) or is "
                    f"shared by all parts: it is in neither tgate_kernels.engine.guided_arguments.CARRY_PARTS nor SHARED."
                )

    def select(self, args: tuple, kwargs: dict, parts: tuple, runs: tuple, kept: str) -> tuple[tuple, dict]:
        """The call's arguments cut to the rows of the parts in ``runs``."""

        def cut(name, value):
            if name in CARRY_PARTS:
                return _cut(name, value, parts, runs, kept, self.interleaved)
            within = CARRY_PARTS_WITHIN.get(name)
            if within and isinstance(value, dict) and within & set(value):
                return {key: _cut(f"{name}[{key!r}]", v, parts, runs, kept, self.interleaved) if key in within else v
                        for key, v in value.items()}
            return value

        new_args = tuple(cut(name, value) for name, value in zip(self.positional, args))
        new_args += args[len(new_args):]
        return new_args, {name: cut(name, value) for name, value in kwargs.items()}


def _has_rows(value, rows: int) -> bool:
    if isinstance(value, torch.Tensor):
        return value.ndim > 0 and value.shape[0] == rows
    if isinstance(value, (list, tuple)):
        return any(_has_rows(v, rows) for v in value)
    if isinstance(value, dict):
        return any(_has_rows(v, rows) for v in value.values())
    return False


def _cut(name: str, value, parts: tuple, runs: tuple, kept: str, interleaved: frozenset[str]):
    along = PARTS_ALONG.get(name)
    if along is not None and isinstance(value, torch.Tensor):
        return _cut(f"{name}[dim {along}]", value.movedim(along, 0), parts, runs, kept, interleaved).movedim(0, along)
    if isinstance(value, torch.Tensor):
        if value.ndim == 0 or value.shape[0] == 1:
            return value  # broadcast over the batch
        if value.shape[0] % len(parts):
            raise ValueError(
                f"`{name}` has {value.shape[0]} rows, not a whole number of rows for each of the {len(parts)} "
                f"guidance parts ({', '.join(parts)})."
            )
        return part_rows(value, parts, runs, kept, interleaved=name in interleaved)
    if isinstance(value, (list, tuple)) and not isinstance(value, BaseOutput):
        converted = [_cut(name, v, parts, runs, kept, interleaved) for v in value]
        return converted if isinstance(value, list) else tuple(converted)
    if isinstance(value, dict):
        return {key: _cut(f"{name}[{key!r}]", v, parts, runs, kept, interleaved) for key, v in value.items()}
    return value


def spread_output(value, rows_run: int, runs: tuple, parts: tuple):
    """A denoiser's result for the parts that ran, laid out again for every part of the call."""
    if isinstance(value, torch.Tensor):
        return spread_parts(value, runs, parts) if value.ndim > 0 and value.shape[0] == rows_run else value
    if isinstance(value, BaseOutput):
        return type(value)(**{key: spread_output(v, rows_run, runs, parts) for key, v in value.items()})
    if isinstance(value, (list, tuple)):
        converted = [spread_output(v, rows_run, runs, parts) for v in value]
        return converted if isinstance(value, list) else tuple(converted)
    if isinstance(value, dict):
        return {key: spread_output(v, rows_run, runs, parts) for key, v in value.items()}
    return value
