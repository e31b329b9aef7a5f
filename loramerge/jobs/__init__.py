"""One module per command: each use case from reading its inputs to writing its output;
the command line calls exactly one function here."""
