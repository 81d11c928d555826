"""`kvxfer demo`'s progress bar: log records during the demo print on lines of their own, never
inside the bar's line, and logging is as before once the bar is done."""

import logging

from kvxfer.commands.demo import Progress


def test_log_lines_stay_out_of_the_bar(capsys):
    before = logging.getLogger().handlers[:]
    progress = Progress(total=2)
    progress.step("reference run (one process)")
    logging.getLogger("kvxfer.engine.engine").warning("engine rank 0/1: q heads [0, 8)")
    progress.step("request 1/1")
    progress.done()
    assert logging.getLogger().handlers == before
    lines = capsys.readouterr().err.splitlines()
    logged = [line for line in lines if "engine rank 0/1" in line]
    bar = [line for line in lines if "2/2" in line]
    assert len(logged) == 1 and "━" not in logged[0] and "2/2" not in logged[0]
    assert bar and all("engine rank" not in line for line in bar) and bar[-1].endswith("done")
