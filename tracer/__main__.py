import sys

from memtrace.commands import main

sys.exit(main())
