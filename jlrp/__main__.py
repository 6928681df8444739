"""``python -m jlrp``: the ``jlrp`` command line (:func:`jlrp.cli.main`)."""

import sys

from jlrp.cli import main

if __name__ == "__main__":
    sys.exit(main())
