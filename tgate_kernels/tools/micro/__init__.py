"""A micro text-to-image world that the project trains itself, for offline quality figures.

``world`` generates captioned 32x32 scenes of coloured shapes, ``train`` trains tiny Stable
Diffusion and PixArt pipelines and an attribute classifier on them (``tgate-kernels train-micro``;
shipped under ``weights/``), ``adherence`` loads those and measures how often a generated image
shows what its prompt asked, and ``quality`` / ``quality_report`` measure T-GATE's variants on them
(``tgate-kernels quality``).
"""
