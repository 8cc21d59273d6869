"""The joint-attention pipeline families T-GATE knows, one entry each (see :mod:`.registry`).

In a dual-stream joint-attention block the image and text tokens attend together, each stream
with projections and a feed-forward of its own. After the gate the text stream is frozen: every
text-stream module of every block (the joint attention's text q/k/v and output projections, the
block's text feed-forward) gives the output it cached at the gate step (the mean over the prompt
and negative-prompt parts), without running, so the image tokens attend to the gate step's text
keys and values; classifier-free guidance is dropped as for cross-attention pipelines.

A family is listed here only when every block of its denoiser is dual-stream and the image
tokens see the text through the joint attention alone. Single-stream blocks (FLUX's second half,
Lumina 2, HiDream's) run shared layers over the text rows and would carry a text stream that is
neither frozen nor computed; those families stay refused until they are done.
"""

from __future__ import annotations

from .registry import Conditioning, Family, register

register(Family(
    "stable-diffusion-3",
    pipelines=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"),
    conditioning=Conditioning.JOINT_ATTENTION,
))
