"""``python -m orgwallet``: the ``orgwallet`` command without its script on the PATH."""

from orgwallet.cli import main

if __name__ == "__main__":
    main()
