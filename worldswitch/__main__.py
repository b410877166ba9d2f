import sys

from .vmx.launch import main

sys.exit(main())
