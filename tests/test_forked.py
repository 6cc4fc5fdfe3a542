"""Work in a forked copy of the process (faq_deploy.forked): the builder's way to skip a second
interpreter's imports. What the copy added to memory is counted, our shared pages are not."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from faq_deploy import forked
from faq_deploy.errors import ExportError
from faq_deploy.export.builder import export_builder
from faq_deploy.export.options import ExportOptions


def test_a_forked_run_counts_what_it_added_and_not_what_it_shares(tmp_path: Path) -> None:
    shared = np.ones(256 << 20, np.uint8)  # resident here, and so in the child's count from the start
    mark = forked.runs()

    def work() -> None:
        print("from the child")
        np.ones(128 << 20, np.uint8)  # its own 128 MiB
        shared[:64 << 20] = 2  # 64 MiB of ours copied on write

    assert forked.run_forked(work, tmp_path / "run.log") is None
    assert (tmp_path / "run.log").read_text() == "from the child\n"
    assert (128 + 64) << 20 <= forked.added_peak(mark) < 240 << 20  # and a few pages of the interpreter's
    assert int(shared[0]) == 1  # the copy's writes stay in the copy


def test_a_failure_comes_back_in_one_line_and_an_os_exit_as_its_code(tmp_path: Path) -> None:
    mark = forked.runs()

    def fail() -> None:
        raise ValueError("the reason\nand more lines")

    assert forked.run_forked(fail, tmp_path / "fail.log") == "ValueError: the reason"
    assert "Traceback" in (tmp_path / "fail.log").read_text()
    assert forked.run_forked(lambda: os._exit(3), tmp_path / "exit.log") == "exited with 3"
    assert forked.run_forked(lambda: os.kill(os.getpid(), 9), tmp_path / "kill.log") == \
        "killed by signal 9 (out of memory?)"
    assert forked.added_peak(mark) is None  # none of them returned


def test_the_builder_s_failure_names_its_cause_and_leaves_nothing(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"architectures": ["NopeForCausalLM"], "model_type": "nope"}')
    with pytest.raises(ExportError, match="builder failed: ValueError: .* model type `nope`"):
        export_builder(checkpoint, tmp_path / "out" / "model", ExportOptions())
    assert list((tmp_path / "out").iterdir()) == []
