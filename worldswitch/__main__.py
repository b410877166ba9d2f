import sys

from .vmx.cli import main

sys.exit(main())
