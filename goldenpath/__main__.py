"""``python -m goldenpath`` (and ``accelerate launch -m goldenpath train ...``)."""

from goldenpath.cli import main

if __name__ == "__main__":
    main()
