"""Thin shim: `python train.py --help` lists the config groups; see chainrule.cli.train."""

from chainrule.cli.train import main

if __name__ == "__main__":
    main()
