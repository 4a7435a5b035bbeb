import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def address():
    """A short Unix-socket path for a handoff pair (AF_UNIX paths are limited to ~100 bytes)."""
    folder = tempfile.mkdtemp(prefix="ho-", dir="/tmp")
    yield os.path.join(folder, "pair.sock")
    shutil.rmtree(folder, ignore_errors=True)
