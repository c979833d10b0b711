"""`python -m bge_index` runs the command-line interface."""

from bge_index.cli import main

if __name__ == "__main__":
    main()
