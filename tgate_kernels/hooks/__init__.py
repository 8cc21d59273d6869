"""Hooks T-GATE attaches to a pipeline's modules (see each module)."""
