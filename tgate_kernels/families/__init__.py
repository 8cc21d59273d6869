"""Pipeline families: what differs between the pipelines T-GATE runs on, one entry a family."""

from .registry import Conditioning, Family, family_of, register

__all__ = ["Conditioning", "Family", "family_of", "register"]
