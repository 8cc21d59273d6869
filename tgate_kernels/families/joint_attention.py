"""The joint-attention pipeline families T-GATE knows, one entry each (see :mod:`.registry`).

In a joint-attention block the image and text tokens attend together. After the gate the text
stream is frozen. In a dual-stream block every text-stream module (the joint attention's text
q/k/v and output projections, the block's text feed-forward) gives the output it cached at the
gate step (the mean over the prompt and negative-prompt parts) without running, so the image
tokens attend to the gate step's text keys and values. A single-stream block (registered by its
class, :class:`~.registry.SingleStreamBlock`) runs on its image rows alone, its attention given
the text rows its projections gave at the gate (:mod:`tgate_kernels.hooks.text_rows`); one that
cuts its sequence by the text rows' count keeps them, its row-wise layers computing the image
rows alone.
Classifier-free guidance is dropped as for cross-attention pipelines, batched or as separate
calls (true CFG).

A family is supported only when every block of its denoiser is one of these two kinds and the
image tokens see the text through the joint attention alone; the others are listed refused,
with what stands in the way.
"""

from __future__ import annotations

from ..config import GateCache, KeptPart
from .registry import Conditioning, Family, SingleStreamBlock, register, register_single_stream

register(Family(
    "stable-diffusion-3",
    pipelines=(
        "StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline",
        "StableDiffusion3ControlNetPipeline", "StableDiffusion3ControlNetInpaintingPipeline",
    ),
    conditioning=Conditioning.JOINT_ATTENTION,
))

register_single_stream(SingleStreamBlock("FluxSingleTransformerBlock"))
# blocks taking one joined sequence, text rows first: as many as the dual-stream blocks' text
register_single_stream(SingleStreamBlock("ChromaSingleTransformerBlock", text_argument=None))
register_single_stream(SingleStreamBlock("AuraFlowSingleTransformerBlock", text_argument=None))

register(Family(
    "flux",
    pipelines=(
        "FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxFillPipeline",
        "FluxKontextPipeline", "FluxKontextInpaintPipeline",
        "FluxControlPipeline", "FluxControlImg2ImgPipeline", "FluxControlInpaintPipeline",
        "FluxControlNetPipeline", "FluxControlNetImg2ImgPipeline", "FluxControlNetInpaintPipeline",
    ),
    conditioning=Conditioning.JOINT_ATTENTION,
))

register(Family(
    "chroma",
    pipelines=("ChromaPipeline", "ChromaImg2ImgPipeline", "ChromaInpaintPipeline"),
    conditioning=Conditioning.JOINT_ATTENTION,
))

register(Family("aura-flow", pipelines=("AuraFlowPipeline",), conditioning=Conditioning.JOINT_ATTENTION))

# FLUX.2's single-stream blocks take one joined sequence, text rows first, through one fused
# projection of the queries, keys, values and feed-forward input
register_single_stream(SingleStreamBlock("Flux2SingleTransformerBlock", text_argument=None, projections=("to_qkv_mlp_proj",)))

register(Family(
    "flux2",
    pipelines=("Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinInpaintPipeline"),
    conditioning=Conditioning.JOINT_ATTENTION,
))

# blocks that cut their sequence by the text rows' count: they keep their text rows after the
# gate, their row-wise modules computing the image rows alone
register_single_stream(SingleStreamBlock(
    "HunyuanVideoSingleTransformerBlock", text_first=False, returns_text_first=False, row_modules=("proj_mlp", "proj_out"),
))
# every CogVideoX block is single-stream: one set of projections and one feed-forward over the
# text rows and the video rows, joined inside its attention processor (RoPE after the text rows)
register_single_stream(SingleStreamBlock(
    "CogVideoXBlock", returns_text_first=False, attention="attn1", row_modules=("attn1.to_out.0", "ff"),
))

register(Family(
    "hunyuan-video",
    pipelines=("HunyuanVideoPipeline", "HunyuanSkyreelsImageToVideoPipeline"),
    conditioning=Conditioning.JOINT_ATTENTION,
))

register(Family(
    "cogvideox",
    pipelines=(
        "CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline",
        "CogVideoXFunControlPipeline",
    ),
    conditioning=Conditioning.JOINT_ATTENTION,
))

register(Family(
    "qwen-image",
    pipelines=(
        "QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline",
        "QwenImageEditPipeline", "QwenImageEditInpaintPipeline", "QwenImageEditPlusPipeline",
        "QwenImageControlNetPipeline", "QwenImageControlNetInpaintPipeline",
    ),
    conditioning=Conditioning.JOINT_ATTENTION,
))


def _own_text_with_own_mask(config) -> str | None:
    """Mochi's processor attends to each sample's unpadded text tokens, chosen by that sample's
    mask: after the gate the kept part's mask must pick rows of the kept part's own text stream,
    not of a mean over two texts padded differently."""
    if config.kept_part is KeptPart.CONDITIONAL and config.gate_cache is GateCache.KEPT_PART:
        return None
    return (
        "kept_part='conditional' and gate_cache='kept-part' (its attention picks each sample's text tokens by that "
        "sample's mask, so after the gate the prompt's part must run with the text stream it cached itself); got "
        f"kept_part={config.kept_part.value!r}, gate_cache={config.gate_cache.value!r}"
    )


register(Family(
    "mochi", pipelines=("MochiPipeline",), conditioning=Conditioning.JOINT_ATTENTION, needs=_own_text_with_own_mask,
))


# HiDream's dual-stream blocks take the text stream joined with one Llama layer's states each,
# its single-stream blocks one joined sequence, the image rows first, as many text rows after
# them as the dual-stream blocks' text
register_single_stream(SingleStreamBlock("HiDreamImageSingleTransformerBlock", text_argument=None, text_first=False, attention="attn1"))

register(Family("hidream", pipelines=("HiDreamImagePipeline",), conditioning=Conditioning.JOINT_ATTENTION))


# Lumina 2's layers take one joined sequence: each sample's text tokens (as many as its mask
# says), its image tokens after them (their positions counted from the text's end), shorter
# texts padded after the image. Its text refiner (`context_refiner`) is frozen as a text stream.
register_single_stream(SingleStreamBlock(
    "Lumina2TransformerBlock", text_argument=None, row_modules=("attn.to_out.0", "feed_forward"),
    text_mask=("rope_embedder", "attention_mask"), under="layers",
))


def _own_text(config) -> str | None:
    """Lumina 2's prompt and negative prompt give texts of their own lengths, which place the
    image tokens at their own rows: no mean of the two exists, the prompt's part keeps its own."""
    if config.gate_cache is GateCache.KEPT_PART:
        return None
    return (
        "gate_cache='kept-part' (the prompt's and the negative prompt's texts join the image tokens at rows of "
        "their own lengths, so no mean of the two text streams exists: after the gate the prompt's part runs with "
        f"the text stream it cached itself); got gate_cache={config.gate_cache.value!r}"
    )


register(Family("lumina2", pipelines=("Lumina2Pipeline",), conditioning=Conditioning.JOINT_ATTENTION, needs=_own_text))


# Joint-attention families whose text rows T-GATE cannot yet freeze correctly: refused at
# `enable`, each with what stands in the way.
_NOT_YET = "; T-GATE does not freeze that text stream yet, and would otherwise leave it neither frozen nor computed"
for _name, _pipelines, _why in (
    ("hunyuan-video-i2v", ("HunyuanVideoImageToVideoPipeline",),
     "joint attention as HunyuanVideo's, its text stream given the image's tokens by a Llava encoder and its "
     "blocks modulating the first frame's tokens apart (token replace), which T-GATE has not been checked on"),
    ("hunyuan-video-framepack", ("HunyuanVideoFramepackPipeline",),
     "joint attention as HunyuanVideo's, in a pipeline that runs one denoising loop per section of the video "
     "within a call, each conditioned on the sections before it; T-GATE gates one denoising loop a call"),
    ("consisid", ("ConsisIDPipeline",),
     "joint attention as CogVideoX's, with a face extractor's cross-attention between its blocks, which T-GATE "
     "does not know how to gate"),
    ("stable-diffusion-3-pag", ("StableDiffusion3PAGPipeline", "StableDiffusion3PAGImg2ImgPipeline"),
     "joint attention whose PAG processor runs the text stream's projections once for the guided parts and "
     "once for the perturbed part of each batch" + _NOT_YET),
    ("flux2-kv", ("Flux2KleinKVPipeline",),
     "joint attention whose pipeline keeps its own cache of the reference images' keys and values across steps, "
     "passed to every block; T-GATE does not know how to gate beside it"),
):
    register(Family(_name, pipelines=_pipelines, conditioning=Conditioning.JOINT_ATTENTION, refused=_why))
