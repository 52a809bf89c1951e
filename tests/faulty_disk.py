"""``main.py`` on a faulty disk, launched like main.py and with its flags.

``FAULT_FILE`` (a part of a file's path) and ``FAULT_AFTER`` (how many such files are written whole first) pick the
write that goes wrong, after ``FAULT_ROOM`` of its bytes: ``FAULT=full`` fails it as a full disk does (ENOSPC),
``FAULT=kill`` kills the process there by SIGKILL.
"""
import builtins
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import main  # noqa: E402  (needs the repository on the path)
from helpers import faulty_open  # noqa: E402

if __name__ == '__main__':
    builtins.open = faulty_open(lambda path: os.environ['FAULT_FILE'] in path, room=int(os.environ['FAULT_ROOM']),
                                after=int(os.environ['FAULT_AFTER']), kill=os.environ['FAULT'] == 'kill')
    sys.exit(main.run())
