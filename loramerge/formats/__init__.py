"""Readers and writers of adapter files, one module per format, dispatched by the registry."""
