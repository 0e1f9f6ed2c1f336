"""``maskray selfcheck``, the README's main job until the segmentation pipeline lands."""

from maskray.jobs.cli import main
from maskray.model.ops.selfcheck import run_checks


def test_every_case_is_checked_and_agrees():
    checks = list(run_checks(seed=1, boxes=16))
    # 3 cases x 2 layouts on the CPU at least, each compared with torchvision.
    assert {(c.case, c.layout) for c in checks if c.device == "cpu"} == {
        (case, layout)
        for case in ("roi_align 7x7 aligned", "roi_align 14x14 adaptive", "roi_pool 7x7")
        for layout in ("contiguous", "channels_last")
    }
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]


def test_command_prints_the_table_and_succeeds(capsys):
    assert main(["selfcheck", "--boxes", "8"]) == 0
    out = capsys.readouterr().out
    assert "all operators agree with torchvision" in out
    assert out.count(" ok\n") >= 6  # a row per case and layout
