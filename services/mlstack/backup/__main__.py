import sys

from mlstack.backup.cli import main

sys.exit(main())
