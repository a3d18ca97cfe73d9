"""`python -m flanneld`: the agent, as the `flanneld` command."""

import sys

from flanneld.face.cli import main

sys.exit(main())
