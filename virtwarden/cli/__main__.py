"""``python -m virtwarden.cli``: the ``virtwarden`` command."""
from virtwarden.cli.main import run

if __name__ == "__main__":
    run()
