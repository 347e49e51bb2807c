"""``python -m pgvar``: the same app as the ``pgvar-run`` console script."""

from pgvar.cli import main

if __name__ == "__main__":
    main()
