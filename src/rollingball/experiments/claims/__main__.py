"""``python -m rollingball.experiments.claims NAME``."""

import sys

from rollingball.experiments.claims import main

sys.exit(main())
