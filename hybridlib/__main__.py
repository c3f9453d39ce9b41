import sys

from hybridlib.cli import main

sys.exit(main())
