import sys

from surgdino.cli import main

sys.exit(main())
