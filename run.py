"""python run.py recipes/quickstart.yaml [key=value ...] -- see README.md."""

import sys

from compress.cli import main

if __name__ == "__main__":
    sys.exit(main())
