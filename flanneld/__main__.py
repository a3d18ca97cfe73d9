import sys

from flanneld.face.cli import main

sys.exit(main())
