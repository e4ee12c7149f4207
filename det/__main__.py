"""``python -m det ...``: the same as ``crossmae det ...``."""

import sys

from crossmae.cli import main

if __name__ == "__main__":
    sys.exit(main(["det", *sys.argv[1:]]))
