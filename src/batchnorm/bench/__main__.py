"""``python -m batchnorm.bench`` = ``batchnorm bench``."""

import sys

from .cli import main

sys.exit(main())
