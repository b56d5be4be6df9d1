import sys

from metalm_fast.cli import main

sys.exit(main())
