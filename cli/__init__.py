"""The loramerge command line (installed as the `loramerge_cli` package)."""
