"""Experiments that reproduce the batch-norm papers and show why the moments carry gradient.

Every experiment writes records (JSON + CSV) under an output directory; ``plots`` only reads
records; ``report`` runs everything and writes ``index.html``. Modules import torch, matplotlib
and tqdm lazily (inside functions), so ``import batchnorm.experiments`` stays cheap.
"""

EXPERIMENTS = ("ioffe", "moments", "landscape", "reparam", "precise", "small-batch")
