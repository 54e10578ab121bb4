#!/usr/bin/env python
"""Pretrain a REFERS-family model (--method refers|mrm|radtex|joimternet) on studies and their reports.

The command line of `modeling_refers.training.pretraining`: its docstring and `--help` give the usage, defaults and
recipes.
"""

from modeling_refers.training.pretraining import main

if __name__ == "__main__":
    main()
