"""`python -m hingeloss_bench`: the same as `hingeloss-bench`."""

from hingeloss_bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
