"""The agent's memory measures: pyroute2 imported lean, and the C heap's pages given back.
Each runs in a fresh interpreter, whose imports and heap are its own."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str) -> str:
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_the_commands_import_pyroute2_without_its_whole_library() -> None:
    out = _python(
        """
        import sys
        import flanneld.face.cli, flanneld.face.ctl
        print("pyroute2.ndb.main" in sys.modules, "pyroute2.iproute.linux" in sys.modules)
        """
    )
    assert out == "False True"  # what the agent uses is there; NDB and the rest are not


def test_a_name_only_pyroute2s_init_defines_still_imports_and_is_the_same_object() -> None:
    out = _python(
        """
        import flanneld.face
        from pyroute2.iproute.linux import AsyncIPRoute
        from pyroute2 import config  # a submodule, as pyroute2's own modules import it
        import pyroute2.netlink.exceptions
        import sys
        before = "pyroute2.ndb.main" in sys.modules
        from pyroute2 import NDB, AsyncIPRoute as again  # the real __init__ runs once here
        try:
            from pyroute2 import NoSuchName
        except ImportError:
            missing = "ImportError"
        print(before, again is AsyncIPRoute, NDB.__name__, config.__name__, missing)
        """
    )
    assert out == "False True NDB pyroute2.config ImportError"


def test_lean_install_leaves_an_already_imported_pyroute2_alone() -> None:
    out = _python(
        """
        import pyroute2
        from flanneld.face import lean
        import sys
        print(lean.install(), type(sys.modules["pyroute2"]).__name__)
        """
    )
    assert out == "False module"


def test_trim_gives_freed_heap_pages_back_to_the_kernel() -> None:
    # 60 MB of 1 KB chunks (malloc's, not Python's small-object allocator), all freed but the
    # last, which pins the top of the heap: free() alone cannot shrink it, malloc_trim can
    out = _python(
        """
        from flanneld.edges import heap
        def rss():
            return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
        chunks = [bytes(1024) + bytes([i % 256]) for i in range(60_000)]
        last = chunks[-1]
        full = rss()
        del chunks
        freed = rss()
        assert heap.trim()
        print(full - freed, full - rss())
        """
    )
    kept, given_back = map(int, out.split())
    assert kept < 20 and given_back > 40, (kept, given_back)


def test_limit_arenas_is_accepted_by_this_libc() -> None:
    assert _python("from flanneld.edges import heap; print(heap.limit_arenas(2))") == "True"
