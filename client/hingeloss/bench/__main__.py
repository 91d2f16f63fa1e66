"""`python -m hingeloss.bench`: the same as `hingeloss-bench`."""

from hingeloss.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
