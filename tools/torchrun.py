"""torchrun (torch.distributed.run's own main(), nothing replaced), ending without the interpreter's
teardown once every rank exited 0.

After the ranks were done the agent spent ~0.9 s tearing torch down before its exit: part of every
launch's wall time (launch.sh and the tests run torchrun through this file). A failure raises out of
main() as under `torchrun` (traceback, exit code 1); only the success path is shortened.

    python tools/torchrun.py --standalone --nproc_per_node=2 train.py ...   # == torchrun ...
"""
import os
import sys

# Run as a script: sys.path[0] is tools/; the repository root is where lib/ lives.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from torch.distributed.run import main  # noqa: E402

if __name__ == "__main__":
    main()
    from lib.launch.exiting import exit_without_teardown

    exit_without_teardown(0)
