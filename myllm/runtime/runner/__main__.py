"""`python -m myllm.runtime.runner NAME FD NICE`: see runtime/runner/child.py.

The priority is lowered first, before any import starts a thread (numpy's BLAS pool, then
llama.cpp's): Linux keeps a nice value per thread, and each thread takes its creator's."""

import os
import sys

os.nice(int(sys.argv[3]))

from myllm.runtime.runner.child import main  # noqa: E402 (after the priority, on purpose)

main(sys.argv)
