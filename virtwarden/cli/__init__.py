"""The ``virtwarden`` command line: the parser (``main``), one module per command
family, and what they share (``output``). ``python -m virtwarden.cli`` runs it."""
