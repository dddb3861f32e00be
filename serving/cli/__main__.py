"""``python -m nextbest.serving.cli``: the ``nextbest`` command line."""

from nextbest.serving.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
