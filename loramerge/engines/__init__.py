"""Inference-engine profiles: an adapter rewritten exactly for what one engine reads, or refused."""
