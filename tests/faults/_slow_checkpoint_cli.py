"""``vapo-pl`` with every checkpoint write held open: after the staging file is complete, its rename waits
``VAPO_PL_TEST_SLOW_CKPT_S`` seconds, so a test can kill the process in the middle of a write. Only the timing
is changed; the write itself is the project's ``AtomicCheckpointIO``."""

import os
import sys
import time

from vapo_pl import checkpointing

_replace = os.replace


def _slow_replace(src, dst, *args, **kwargs):
    if str(src).endswith(checkpointing.PARTIAL_SUFFIX):
        time.sleep(float(os.environ.get("VAPO_PL_TEST_SLOW_CKPT_S", "3")))
    return _replace(src, dst, *args, **kwargs)


os.replace = _slow_replace

if __name__ == "__main__":
    from vapo_pl.cli import main

    sys.exit(main(sys.argv[1:]))
