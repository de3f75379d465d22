import sys

from kvdirect.cli import main

sys.exit(main())
