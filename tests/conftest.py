"""Test kinds and shared fixtures.

Every test is exactly one of three kinds (markers registered in pytest.ini):
- unit: pure and in-process;
- integration: starts real processes (torchrun, launch.sh, bash, python subprocesses, multiprocessing);
- gpu: needs CUDA, and is skipped when no CUDA GPU is visible.
A module sets its default with `pytestmark = pytest.mark.unit` (or integration); a test or parameter
may override it with its own marker, and `gpu` anywhere on a test wins, so a `cuda` parameter of a
unit test is a gpu test. A test without a kind is a collection error, so `pytest -m unit`,
`-m integration` and `-m gpu` together always select every test exactly once.
"""
import os
import shutil
import tempfile

import pytest

KINDS = ("unit", "integration", "gpu")


def _kind(item: pytest.Item) -> str | None:
    if item.get_closest_marker("gpu") is not None:
        return "gpu"
    for node in item.iter_parents():  # the test itself first, then its class and module
        own = {m.name for m in node.own_markers if m.name in KINDS}
        if len(own) > 1:
            raise pytest.UsageError(f"{node.nodeid}: markers {sorted(own)} conflict; give it exactly one of {KINDS}")
        if own:
            return own.pop()
    return None


def pytest_configure(config):
    # Without a GPU, torch.compile runs Dynamo and AOT autograd but not Inductor's C++ code generation
    # (lib/launch/compiling.py says why); launched ranks inherit it. With one, every test compiles with Inductor.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("SPECDRAFT_COMPILE_BACKEND", "aot_eager")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects, so it sees one kind per test
def pytest_collection_modifyitems(config, items):
    kinds = {item: _kind(item) for item in items}
    unmarked = [item.nodeid for item, kind in kinds.items() if kind is None]
    if unmarked:
        raise pytest.UsageError(
            f"{len(unmarked)} test(s) have no kind: {', '.join(unmarked[:5])}{' ...' if len(unmarked) > 5 else ''}; "
            "add `pytestmark = pytest.mark.unit` (or integration) at the top of the module, or mark the test")
    # Inherited module/class markers cannot be dropped per test, so move them onto the tests:
    # each test then carries only its resolved kind, and a gpu parameter of a unit test is not unit.
    for item in items:
        for node in item.listchain():
            node.own_markers[:] = [m for m in node.own_markers if m.name not in KINDS]
    cuda = None
    for item, kind in kinds.items():
        item.add_marker(kind)
        if kind == "gpu":
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()  # no CUDA context is created, so MPS settings still apply later
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="gpu test: no CUDA GPU visible"))


@pytest.fixture
def address():
    """A short Unix-socket path for a handoff pair (AF_UNIX paths are limited to ~100 bytes)."""
    folder = tempfile.mkdtemp(prefix="ho-", dir="/tmp")
    yield os.path.join(folder, "pair.sock")
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def uninterrupted_tiny_run(tmp_path_factory) -> str:
    """The uninterrupted reference of the resume tests (tests/test_resume.py, tests/test_stop.py): one
    launch of the tiny default for TINY_RUN_STEPS steps, shared, so every interrupted-and-resumed variant
    compares with the same run instead of launching its own (a launch costs ~15 s of a 2-core CI machine)."""
    from tests.helpers import TINY_RUN, TINY_RUN_STEPS, torchrun

    run_dir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    res = torchrun(2, [*TINY_RUN, f"train.max_steps={TINY_RUN_STEPS}", f"run.dir={run_dir}"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def time_limited_run(tmp_path_factory) -> tuple[str, str]:
    """(run dir, log) of one launch of two colocated pairs of the tiny default that train.max_time_s=4
    ends, with TensorBoard on and the acceptance-aligned loss (train.loss=lk): tests/test_time_limit.py
    checks the time budget's end on it, tests/test_metric_sinks.py the event files and the lk loss
    (both about a real run; a launch costs ~15 s of a 2-core CI machine, so they share one)."""
    from tests.helpers import TINY_RUN, torchrun

    run_dir = str(tmp_path_factory.mktemp("time_limited") / "run")
    done = torchrun(4, [*TINY_RUN, f"run.dir={run_dir}", "train.max_steps=100000", "train.max_time_s=4",
                        "metrics.tensorboard=true", "train.loss=lk"], timeout=240)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    return run_dir, log
