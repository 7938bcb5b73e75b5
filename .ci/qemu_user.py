"""pytest plugin for the aarch64 run under qemu-user (.ci/cross_aarch64.sh: ``-p qemu_user``).

qemu-user emulates one aarch64 process; a program that process starts runs natively, so
starting an aarch64 program (torch.compile's compile workers are ``sys.executable``
subprocesses) fails with ENOEXEC unless a binfmt_misc handler hands it to qemu, which
needs the host's kernel configured and is not assumed. A test that fails that way is
reported as skipped, saying so; every other failure stays a failure.
(The run sets TORCHINDUCTOR_COMPILE_THREADS=1, so torch.compile itself compiles in-process
and the tests that use it run.)
"""
import errno

import pytest

REASON = ("starts an aarch64 program (e.g. torch.compile's compile workers), which "
          "qemu-user cannot run without a binfmt_misc handler on the host")


def _exec_format_error(exc):
    """Whether ``exc``, or an exception it was raised from or wraps, is ENOEXEC."""
    seen = set()
    pending = [exc]
    while pending:
        exc = pending.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOEXEC:
            return True
        # torch._dynamo's BackendCompilerFailed keeps the backend's error as inner_exception
        pending += [exc.__cause__, exc.__context__, getattr(exc, "inner_exception", None)]
    return False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and _exec_format_error(call.excinfo.value):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] + 1, f"Skipped: {REASON}")
