"""The `tf-backdoor-defense` command: argparse and console only; it calls the public API."""


def main(argv=None):
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    from tf_backdoor_defense.cli._main import main as _main

    return _main(argv)


__all__ = ["main"]
