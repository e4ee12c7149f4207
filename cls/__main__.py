"""``python -m cls ...``: the same as ``crossmae cls ...``."""

import sys

from crossmae.cli import main

if __name__ == "__main__":
    sys.exit(main(["cls", *sys.argv[1:]]))
