"""Thin shim: `python sample.py --help` lists the config groups; see chainrule.cli.sample."""

from chainrule.cli.sample import main

if __name__ == "__main__":
    main()
