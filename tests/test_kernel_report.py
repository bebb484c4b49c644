"""``crmvae-fast kernels``: the static report on the latent step's kernels (sm_90 cubin, no GPU), and the issue-12
targets it measures (warp-instructions per element, spills, launches per step, programs at latent_dim 10)."""

import importlib
import json

import pytest

pytest.importorskip("triton", reason="triton is not installed: no kernels to report on")

from crmvae_fast import cli, kernel_report  # noqa: E402

ls_mod = importlib.import_module("crmvae_fast.kernels.latent_step")

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_CTAID.X ;
.L_x_0:
        /*0020*/                   FADD R2, R2, 1 ;
        /*0030*/                   FMUL R2, R2, R2 ;
        /*0040*/               @P0 BRA `(.L_x_0) ;
        /*0050*/                   STG.E desc[UR4][R2.64], R2 ;
        /*0060*/                   EXIT ;
.L_x_1:
        /*0070*/                   BRA `(.L_x_1);
        /*0080*/                   NOP;
"""


def test_count_instructions_weights_loops_by_trips():
    instrs = kernel_report.parse_sass(SASS)
    assert len(instrs) == 9
    one = kernel_report.count_instructions(instrs, 1)
    assert one["static"] == 7 and one["issued"] == 7 and one["loops"] == [(2, 4)]
    assert kernel_report.count_instructions(instrs, 10)["issued"] == 4 + 3 * 10  # the tail after EXIT never counts


def test_occupancy():
    assert kernel_report.occupancy(32, 4, 0) == (16, 1.0)  # 64 warps fit
    assert kernel_report.occupancy(128, 4, 0) == (4, 0.25)  # 65536 / (128 * 32) = 16 warps
    assert kernel_report.occupancy(255, 1, 0)[0] == 8  # 255 -> 256 registers: 8 warps


def test_cli_kernels_tiny_shape(capsys):
    assert cli.main(["kernels", "--M", "2", "--B", "8", "--D", "16"]) == 0
    text = capsys.readouterr().out
    lines = text.strip().splitlines()
    assert "_latent_step_fwd_kernel[" in text and "_latent_step_bwd_kernel[" in text
    assert lines[-1].startswith("worst issue/memory ratio on the H100 (modelled): ")
    float(lines[-1].split(": ")[1].split()[0])


def test_cli_kernels_rejects_bad_shape(capsys):
    assert cli.main(["kernels", "--M", "0"]) == 2
    assert "--M, --B and --D must be >= 1" in capsys.readouterr().err


def test_targets_at_the_spec_shape():
    """Issue 12 at M = 5, D = 512, float32 (B = 4096): <= 25 warp-instructions per element forward, <= 39
    backward, no spills, so both are memory-bound on an H100 by the report's model."""
    rows = kernel_report.analyze(5, 4096, 512, "float32")
    fwd, bwd = rows
    assert fwd["name"].startswith("_latent_step_fwd_kernel") and bwd["name"].startswith("_latent_step_bwd_kernel")
    assert (fwd["bytes_per_element"], bwd["bytes_per_element"]) == (72, 104)
    assert fwd["warp_instr_per_element"] <= 25, fwd
    assert bwd["warp_instr_per_element"] <= 39, bwd
    for r in rows:
        assert r["spills"] == 0 and r["stack"] == 0, r
        assert r["H100_issue_us"] <= r["H100_memory_us"], r
    json.dumps(rows)  # the rows are plain data, ready for the benchmark rows


def test_small_latent_fills_half_an_h100():
    """latent_dim = 10, B = 256: at least 66 programs (half of an H100's 132 SMs), each at least one warp."""
    block_b, block_d, num_warps = ls_mod._tiles(256, 10)
    programs = -(-256 // block_b)
    assert programs >= ls_mod.H100_SMS // 2, (block_b, block_d, num_warps)
    assert block_b * block_d >= 32 and block_d >= 10


def test_bytes_ledger():
    assert ls_mod.bytes_per_element(5, backward=False) == 72
    assert ls_mod.bytes_per_element(5, backward=False, draw=False) == 96
    assert ls_mod.bytes_per_element(5, backward=True) == 104
    assert ls_mod.bytes_per_element(5, backward=True, grads=ls_mod.ALL_GRADS) == 112
    assert ls_mod.bytes_per_element(5, backward=True, draw=False, grads=ls_mod.ALL_GRADS) == 136


def test_no_spills_on_sm80():
    """The A100 build of the same launches: no spill instructions, no stack."""
    for r in kernel_report.analyze(5, 4096, 512, "float32", cap=80):
        assert r["spills"] == 0 and r["stack"] == 0, r
