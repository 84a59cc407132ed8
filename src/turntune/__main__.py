import sys

from turntune.cli import main

sys.exit(main())
