import sys

from rollingball.cli import main

sys.exit(main())
