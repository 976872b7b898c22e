"""``python -m tf_backdoor_defense``: the same command as ``tf-backdoor-defense``."""

import sys

from tf_backdoor_defense.cli._main import main

if __name__ == "__main__":
    sys.exit(main())
