"""One module per ``tether`` command, each with ``main(argv) -> int``."""
