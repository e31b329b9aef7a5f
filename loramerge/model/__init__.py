"""The base-model side: resolving folders, planning a merge from headers, streaming it out."""
