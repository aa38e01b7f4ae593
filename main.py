"""The seed entry point: `python main.py ...` is `python -m distill.train ...`."""
import sys

from distill.train import main

if __name__ == "__main__":
    sys.exit(main())
