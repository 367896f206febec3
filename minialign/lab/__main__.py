"""``python -m minialign.lab NAME``: run one experiment (``experiments.py``) or the benchmark (``bench.py``)."""
import sys

from ..config import main_guard
from . import bench, experiments

if __name__ == "__main__":
    argv = sys.argv[1:]
    main_guard(lambda: bench.main(argv[1:]) if argv[:1] == ["bench"] else experiments.main(argv))
