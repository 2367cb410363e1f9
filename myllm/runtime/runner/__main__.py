"""`python -m myllm.runtime.runner NAME FD`: see runtime/runner/child.py."""

import sys

from myllm.runtime.runner.child import main

main(sys.argv)
