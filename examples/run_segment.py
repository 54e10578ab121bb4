#!/usr/bin/env python
"""Fine-tune UperNet on a REFERS / MRM radiograph transformer for pneumothorax segmentation (MRM's SIIM-ACR recipe).

The command line of `modeling_refers.segmentation_refers`: its docstring and `--help` give the usage, defaults and
what matches MRM's official configuration.
"""

from modeling_refers.segmentation_refers import main

if __name__ == "__main__":
    main()
