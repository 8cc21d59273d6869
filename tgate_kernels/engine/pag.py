"""Perturbed-attention guidance (PAG) after the gate.

PAG pipelines give the self-attentions of the layers they perturb a processor that splits the
batch into the parts it expects: three (negative, prompt, perturbed) with classifier-free
guidance, two (prompt, perturbed) without. After the gate T-GATE runs the merged text part and
the perturbed part, two parts, so for the rest of the generation those layers get the
two-part processor of the same kind (the one the pipeline itself uses without classifier-free
guidance). The pipeline's own processors are put back when the generation ends.
"""

from __future__ import annotations

import torch

from .generation import GenerationState, StepListener

_TWO_PART_PROCESSORS = {
    "PAGCFGIdentitySelfAttnProcessor2_0": "PAGIdentitySelfAttnProcessor2_0",
    "PAGCFGHunyuanAttnProcessor2_0": "PAGHunyuanAttnProcessor2_0",
    "PAGCFGSanaLinearAttnProcessor2_0": "PAGIdentitySanaLinearAttnProcessor2_0",
    "PAGCFGJointAttnProcessor2_0": "PAGJointAttnProcessor2_0",
}


def _processor_pairs() -> dict[type, type]:
    from diffusers.models import attention_processor

    pairs = {}
    for three, two in _TWO_PART_PROCESSORS.items():
        three_class, two_class = getattr(attention_processor, three, None), getattr(attention_processor, two, None)
        if three_class is not None and two_class is not None:
            pairs[three_class] = two_class
    return pairs


class PagAfterGate(StepListener):
    """Swaps the three-part PAG processors of ``denoisers`` for two-part ones once calls are cut."""

    def __init__(self, denoisers: list[torch.nn.Module]) -> None:
        self.denoisers = denoisers
        self._swapped: list[tuple[torch.nn.Module, object]] = []

    def calls_cut(self, state: GenerationState) -> None:
        pairs = _processor_pairs()
        for denoiser in self.denoisers:
            for module in denoiser.modules():
                processor = getattr(module, "processor", None)
                if type(processor) in pairs and hasattr(module, "set_processor"):
                    self._swapped.append((module, processor))
                    module.set_processor(pairs[type(processor)]())

    def generation_ended(self, state: GenerationState) -> None:
        while self._swapped:
            module, processor = self._swapped.pop()
            module.set_processor(processor)
