"""The cross-attention pipeline families T-GATE knows, one entry each (see :mod:`.registry`).

Every pipeline built on one of these (img2img, inpaint, ControlNet, IP-Adapter, LoRA) belongs to
its family through its class; a family defined by its denoiser (Stable Video Diffusion) takes
every pipeline around that denoiser.
"""

from __future__ import annotations

from .registry import NEGATIVE, PROMPT, UNCONDITIONAL, Family, register

_SDXL_TIME_IDS = frozenset({"added_cond_kwargs['time_ids']"})
"""SDXL pipelines build ``torch.cat([negative_add_time_ids, add_time_ids]).repeat(images, 1)``."""

_INSTRUCT_PIX2PIX = ((PROMPT, NEGATIVE, UNCONDITIONAL),)
"""[prompt + image, negative + image, negative without image]"""

register(Family(
    "stable-diffusion-xl",
    pipelines=(
        "StableDiffusionXLPipeline", "StableDiffusionXLControlNetPipeline", "StableDiffusionXLControlNetUnionPipeline",
        "StableDiffusionXLAdapterPipeline", "StableDiffusionXLControlNetXSPipeline", "StableDiffusionXLPAGPipeline",
        "StableDiffusionXLControlNetPAGPipeline", "KolorsPipeline", "KolorsImg2ImgPipeline", "KolorsPAGPipeline",
        "AnimateDiffSDXLPipeline", "TextToVideoZeroSDXLPipeline",
    ),
    interleaved=_SDXL_TIME_IDS,
))
register(Family("instruct-pix2pix", pipelines=("StableDiffusionInstructPix2PixPipeline",), batched=_INSTRUCT_PIX2PIX))
register(Family(
    "instruct-pix2pix-xl", pipelines=("StableDiffusionXLInstructPix2PixPipeline",), batched=_INSTRUCT_PIX2PIX,
    interleaved=_SDXL_TIME_IDS,
))
register(Family(
    "hunyuan-dit", pipelines=("HunyuanDiTPipeline", "HunyuanDiTControlNetPipeline", "HunyuanDiTPAGPipeline"),
    interleaved=frozenset({"image_meta_size", "style"}),
))
register(Family(
    # Lumina-Next concatenates the prompt first
    "lumina-next", pipelines=("LuminaPipeline", "LuminaText2ImgPipeline"), batched=((PROMPT, NEGATIVE),),
))
register(Family(
    # the negative part is an empty image embedding: the reference keeps the conditional part
    "image-to-video", denoisers=("UNetSpatioTemporalConditionModel", "I2VGenXLUNet"), kept=PROMPT,
))

_EDITS = ("its batch holds an unconditional part and one part per edit concept, not a negative prompt and a prompt: "
          "dropping that guidance after the gate drops the edits")
register(Family("ledits++", pipelines=("LEditsPPPipelineStableDiffusion", "LEditsPPPipelineStableDiffusionXL"), refused=_EDITS))
register(Family(
    "kandinsky-3", pipelines=("Kandinsky3Pipeline", "Kandinsky3Img2ImgPipeline"),
    refused="its UNet builds self-attention layers as cross-attention modules, which T-GATE would freeze after the gate",
))
register(Family(
    "cosmos-2.5-transfer", pipelines=("Cosmos2_5_TransferPipeline",),
    refused="one progress bar spans every chunk of the video, so a gate would fall inside the first chunk and the later "
            "chunks would reuse its cached cross-attention",
))
