#!/usr/bin/env python
"""Fine-tune UperNet on a REFERS / MRM radiograph transformer for pneumothorax segmentation (MRM's SIIM-ACR recipe).

The command line of `modeling_refers.tasks.segmentation`: its docstring and `--help` give the usage, defaults and
what matches MRM's official configuration.
"""

from modeling_refers.tasks.segmentation import main

if __name__ == "__main__":
    main()
