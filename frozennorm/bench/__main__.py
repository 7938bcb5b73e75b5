"""``python -m frozennorm.bench``."""
import sys

from .cli import main

sys.exit(main())
