"""``ebkernels`` / ``python -m ebkernels``: the early-bird trainer (see ebkernels.train)."""
import sys


def main(argv=None) -> int:
    from .train.cli import main as trainer_main

    return trainer_main(argv)


if __name__ == "__main__":
    sys.exit(main())
