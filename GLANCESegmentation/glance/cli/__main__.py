import sys

from glance.cli import main

sys.exit(main())
