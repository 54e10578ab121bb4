#!/usr/bin/env python
"""Fine-tune a REFERS checkpoint (or timm / random weights) on a labelled chest X-ray data set.

The command line of `modeling_refers.training.finetuning`: its docstring and `--help` give the usage, defaults and
recipes.
"""

from modeling_refers.training.finetuning import main

if __name__ == "__main__":
    main()
