"""Bytes on disk, with no knowledge of LoRA: safetensors headers, readers and writers,
direct I/O, tile buffers, atomic outputs and JSON files."""
