"""Thin shim: `python export.py --help` lists the options; see chainrule.cli.export."""

from chainrule.cli.export import main

if __name__ == "__main__":
    main()
