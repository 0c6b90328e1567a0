"""Thin shim: `python prepare.py --help` lists the options; see chainrule.cli.prepare."""

from chainrule.cli.prepare import main

if __name__ == "__main__":
    main()
