import sys

from virtwarden.cli.main import main

sys.exit(main())
