import sys

from multiad_monai.apps.cli import main

sys.exit(main())
