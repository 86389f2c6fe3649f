import sys

from backprop_ninja.cli import main

sys.exit(main())
