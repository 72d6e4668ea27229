"""bench/parallel_tests.py, which runs the kernel tests on a GPU machine in several pytest
processes: tests dealt round-robin, every process's output shown, the worst status returned."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import parallel_tests  # noqa: E402


def test_tests_are_dealt_round_robin_into_non_empty_shares():
    assert parallel_tests.deal(["a", "b", "c", "d", "e"], 2) == [["a", "c", "e"], ["b", "d"]]
    assert parallel_tests.deal(["a"], 8) == [["a"]]


def test_runs_every_test_once_across_processes_and_returns_the_worst_status(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PASSED_THROUGH", "1")  # the children see the environment (NORMRNN_PERSISTENT)
    monkeypatch.chdir(tmp_path)  # run from the folder above the tests, as from the repository root
    tests = tmp_path / "test_sample.py"
    tests.write_text("import os\n"
                     "def test_one(): assert os.environ.get('PASSED_THROUGH') == '1'\n"
                     "def test_two(): pass\n"
                     "def test_three(): assert False, 'the failure is reported'\n")
    status = parallel_tests.main(["--processes", "2", tests.name, "--", "-o", "console_output_style=classic"])
    printed = capsys.readouterr().out
    assert status == 1  # pytest's "tests failed"
    assert "process 0: 2 tests, exit 1" in printed and "process 1: 1 tests, exit 0" in printed
    assert printed.count(" passed") == 2 and printed.count("1 failed") == 1
    assert "the failure is reported" in printed
