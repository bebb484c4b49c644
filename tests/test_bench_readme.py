"""``crmvae-fast bench --readme`` prints the README's results table: a header naming the machine, the date, the
versions and the torch threads, then one row per measurement with the command that reproduces it. Run here in
smoke mode (tiny sizes): the format is checked, never a time. The README's own table has the same columns and rows,
so it is that command's output."""

import datetime as dt
import os
import re
from pathlib import Path

import pytest
import torch

from crmvae_fast import cli
from crmvae_fast.bench.readme import COLUMNS, PROVIDERS, ROWS

ROOT = Path(__file__).resolve().parents[1]
CELL_TIME = re.compile(r"^\d+(\.\d+)? (ms|s)$")
CELL_RATIO = re.compile(r"^\d+\.\d\dx (faster|fewer)$")


def _table_rows(text: str) -> list:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ")]


@pytest.fixture(scope="module")
def smoke_table():
    """The whole ``--readme`` output of a smoke run, once for the module."""
    from io import StringIO
    from contextlib import redirect_stdout

    buf = StringIO()
    with redirect_stdout(buf):
        code = cli.main(["bench", "--readme", "--smoke", "--device", "cpu"])
    return code, buf.getvalue()


def test_readme_table_header_names_machine_date_versions_threads(smoke_table):
    code, out = smoke_table
    assert code == 0, out
    head = out.splitlines()[0]
    import triton

    with open("/proc/cpuinfo") as fp:
        cpu = next((l.split(":", 1)[1].strip() for l in fp if l.startswith("model name")), None)
    for want in ("Measured with `crmvae-fast bench --readme` on", f"{len(os.sched_getaffinity(0))} cores",
                 "no GPU" if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
                 dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")[:7], f"torch {torch.__version__}",
                 f"triton {triton.__version__}", "MultiVae 1.0.3", f"{torch.get_num_threads()} torch thread",
                 "load average"):
        assert want in head, f"the header should name {want!r}: {head}"
    if cpu:
        assert cpu in head, f"the header should name the CPU {cpu!r}: {head}"
    assert "SMOKE RUN" in out, "a smoke run must say that its numbers mean nothing"


def test_readme_table_rows_and_commands(smoke_table):
    _, out = smoke_table
    rows = _table_rows(out)
    assert rows[0] == list(COLUMNS), rows[0]
    body = rows[1:]  # the separator line is not a row
    assert [r[-1] for r in body] == [f"`crmvae-fast bench --readme {k}`" for k in ROWS], body
    for r in body:
        assert len(r) == len(COLUMNS), r
        cells = r[1:1 + len(PROVIDERS)]
        if r[-1].endswith("launches`"):
            assert all(c.isdigit() for c in cells), f"launch counts must be integers: {r}"
        else:
            assert all(CELL_TIME.match(c) for c in cells), f"times must read like '12.3 ms' or '1.23 s': {r}"
        assert CELL_RATIO.match(r[len(PROVIDERS) + 1]), f"the ratio must read like '3.10x faster': {r}"
    assert "What the fused column ran here:" in out


def test_readme_unknown_row_is_refused(capsys):
    assert cli.main(["bench", "--readme", "nll-9x9"]) == 2
    err = capsys.readouterr().err
    assert "nll-9x9" in err and "nll-3x32" in err, err


def test_readme_results_table_is_that_commands_output():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Results\n"):]
    section = section[:section.index("\n## ", 5)]
    assert "Measured with `crmvae-fast bench --readme` on" in section, "the README's table must be bench --readme's"
    rows = _table_rows(section)
    assert rows and rows[0] == list(COLUMNS), rows[:1]
    assert [r[-1] for r in rows[1:]] == [f"`crmvae-fast bench --readme {k}`" for k in ROWS]
    assert "SMOKE RUN" not in section, "the README shows a smoke run"
