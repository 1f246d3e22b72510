"""``python -m bnfold``."""

from bnfold.cli import main

if __name__ == "__main__":
    main()
