"""`python -m edgecache serve ...`"""

import sys

from edgecache.cli import main

sys.exit(main())
