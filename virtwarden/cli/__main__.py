"""``python -m virtwarden.cli``: the ``virtwarden`` command."""
import sys

from virtwarden.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
