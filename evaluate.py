"""Thin shim: `python evaluate.py --help` lists the options; see chainrule.cli.evaluate."""

from chainrule.cli.evaluate import main

if __name__ == "__main__":
    main()
