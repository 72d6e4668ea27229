"""Triton's cache of kernels compiled without a GPU for the GPU session (``bench/triton_cache.py``).

What can be checked without the GPU: the tests the session runs are the ones listed; the kernels
that a process compiles under ``tests/compile_only_plugin.py`` are found, every one, by another
process that launches the same tests (a key that depended on the process, such as an address's
alignment, would make the cache useless); persistent kernels are among them where the GPU would run
them; the archive installs only for the Triton and Python it was built with. Whether the GPU
machine's Triton finds them is what ``bench/gpu_session.sh`` logs (the cache's kernels before and
after each part)."""
import ast
import importlib.util
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import triton_cache  # noqa: E402

# small shapes, per-step launches and a persistent kernel (the test sets NORMRNN_PERSISTENT=1 itself)
TESTS = ["tests/test_triton_rnn.py::test_batch_norm_in_place_of_tanh_and_bias",
         "tests/test_triton_rnn.py::test_persistent_kernel_and_batch_tiles"]


def test_the_listed_kernel_tests_exist():
    for node in triton_cache.kernel_tests():
        path, _, name = node.partition("::")
        assert (ROOT / path).is_file(), node
        if name:
            functions = {item.name for item in ast.parse((ROOT / path).read_text()).body
                         if isinstance(item, ast.FunctionDef)}
            assert name in functions, node
    assert "bench/kernel_tests.txt" in (ROOT / "bench" / "gpu_session.sh").read_text()


def _entries(cache_dir: Path) -> dict:
    """Kernel name -> number of cache entries, and the file kinds they hold."""
    names, kinds = {}, set()
    for group in cache_dir.glob("*/__grp__*.json"):
        name = group.name[len("__grp__"):-len(".json")]
        names[name] = names.get(name, 0) + 1
        kinds.update(Path(path).suffix for path in json.loads(group.read_text())["child_paths"].values())
    return names, kinds


def _compile(cache_dir: Path) -> None:
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "compile_only_plugin",
                    *TESTS], cwd=ROOT, env=triton_cache.compile_environment(cache_dir), capture_output=True,
                   text=True, timeout=900)


def test_a_second_process_finds_every_kernel_the_first_compiled(tmp_path):
    cache_dir = tmp_path / "cache"
    _compile(cache_dir)
    first, kinds = _entries(cache_dir)
    assert sum(first.values()) >= 4, first
    # where the GPU runs them: the persistent test's grids fit in its 132 multiprocessors
    assert "rnn_forward_persistent_kernel" in first and "rnn_backward_persistent_kernel" in first, first
    assert "rnn_forward_step_kernel" in first, first
    # the cubins and what loading them needs, not the intermediate code (a few KiB a kernel, packed)
    assert ".cubin" in kinds and ".ptx" not in kinds and ".llir" not in kinds, kinds
    _compile(cache_dir)
    assert _entries(cache_dir)[0] == first


def _archive(tmp_path, monkeypatch, **manifest_changes) -> Path:
    cache_dir = tmp_path / "normrnn-triton-cache"
    monkeypatch.setattr(triton_cache, "CACHE_DIR", cache_dir)
    entry = cache_dir / "ENTRYHASH"
    entry.mkdir(parents=True)
    files = {name: str(entry / name) for name in ("kernel.cubin", "kernel.json", "kernel.source")}
    for path in files.values():
        Path(path).write_bytes(b"\0")
    (entry / "__grp__kernel.json").write_text(json.dumps({"child_paths": files}))
    out = tmp_path / "archive.tar.xz"
    manifest = triton_cache.pack(out, {})
    assert manifest["kernels"] == 1
    if manifest_changes:
        manifest.update(manifest_changes)
        (cache_dir / triton_cache.MANIFEST).write_text(json.dumps(manifest))
        with tarfile.open(out, "w:xz") as archive:
            archive.add(cache_dir, arcname=cache_dir.name)
    for path in entry.iterdir():
        path.unlink()
    return out


def test_the_archive_installs_where_it_was_built(tmp_path, monkeypatch, capsys):
    out = _archive(tmp_path, monkeypatch)
    assert triton_cache.count() == 0
    assert triton_cache.install(out) == 0
    assert triton_cache.count() == 1
    assert "1 kernels" in capsys.readouterr().out
    # the cubin and its metadata, at the path its group names; not the IR Triton never reads back
    entry = triton_cache.CACHE_DIR / "ENTRYHASH"
    assert (entry / "kernel.cubin").is_file() and (entry / "kernel.json").is_file()
    assert not (entry / "kernel.source").exists()


@pytest.mark.parametrize("change", [{"triton": "0.0.0"}, {"python": "2.7"}, {"triton_key": "0123456789abcdef"},
                                    {"ptxas": "release 0.0"}, {"cache_dir": "/elsewhere"}])
def test_an_archive_built_elsewhere_is_not_installed(tmp_path, monkeypatch, capsys, change):
    out = _archive(tmp_path, monkeypatch, **change)
    assert triton_cache.install(out) == 1
    assert triton_cache.count() == 0
    said = capsys.readouterr().out
    assert "not installed" in said and str(next(iter(change.values()))) in said
