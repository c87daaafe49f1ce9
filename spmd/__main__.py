"""`python -m mpi4py -m spmd`: one run (spmd.runtime.run); `--help` lists every option and its default."""
import sys

from spmd.runtime.run import main

if __name__ == "__main__":
    sys.exit(main())
