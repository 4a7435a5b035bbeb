"""The end of a finished program, without the interpreter's teardown (imports nothing heavy)."""
from __future__ import annotations

import atexit
import os
import sys
import threading


def exit_without_teardown(code: int) -> None:
    """End a finished program (a rank of train.py, eval.py, tools/regenerate.py) with `code`, skipping only
    the interpreter's own teardown: freeing torch's and gloo's modules took ~1.3 s a process, which every
    launch paid before torchrun could exit (4 ranks on 2 CI cores pay it twice over). What a normal exit
    still does is done here first: non-daemon threads are joined, the atexit handlers run (logging's
    flush, torch's compile workers, multiprocessing's children), then stdout and stderr are flushed.
    Only for a main() that returned: an exception still ends the process the normal way."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be written anyway
            pass
    os._exit(code)
