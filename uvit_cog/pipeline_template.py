"""Entry point of a saved uvit-cog pipeline for diffusers' generic loader (copied into every saved pipeline).

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(path, custom_pipeline=path, trust_remote_code=True)

The pipeline code itself lives in the `uvit-cog` package (`pip install uvit-cog`); importing it here also
makes the `transformer` component's module (`uvit_cog.model`) importable for diffusers.
"""

from uvit_cog.pipeline import UViTPipeline

__all__ = ["UViTPipeline"]
