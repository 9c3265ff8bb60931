import sys

from flowpp_ref.cli import main

sys.exit(main())
