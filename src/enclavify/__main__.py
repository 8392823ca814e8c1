import sys

from enclavify.cli import main

sys.exit(main())
