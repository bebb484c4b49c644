"""``crmvae-fast kernels``: the static report on the latent step's kernels (sm_90 cubin, no GPU), and the issue-12
targets it measures (warp-instructions per element, spills, launches per step, programs at latent_dim 10)."""

import importlib
import json

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed: no kernels to report on")

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
    with pytest.raises(SystemExit) as exit_:  # argparse refuses the value: usage and one error line, exit 2
        cli.main(["kernels", "--M", "0"])
    assert exit_.value.code == 2
    assert "argument --M: expected an integer >= 1, got '0'" in capsys.readouterr().err


# Each figure belongs to a triton version: the cubin of the same kernel differs between tritons (before the
# register cap, the backward spilled at sm_90 under 3.8 and not under 3.9). Per triton minor, compute
# capability and shape: (registers, warp-instructions per element) of the forward and the backward, measured with
# the kernel report (``python -m crmvae_fast kernels --json``) on the 2-core x86_64 CI machine, no GPU (the cubin
# and its SASS are static: any machine gives the same figures for the same triton). A triton not in the table
# fails the figures test: measure it and add a row (docs/compatibility.md says how).
SHAPES = {"spec-f32": (5, 4096, 512, "float32"), "spec-bf16": (5, 4096, 512, "bfloat16"),
          "default-f32": (3, 256, 10, "float32")}
FIGURES = {
    "3.4": {
        (80, "spec-f32"): ((163, 20.8), (203, 33.23)), (90, "spec-f32"): ((215, 21.04), (209, 33.53)),
        (80, "spec-bf16"): ((164, 21.87), (207, 34.7)), (90, "spec-bf16"): ((208, 22.07), (209, 34.91)),
        (80, "default-f32"): ((90, 29.7), (116, 38.65)), (90, "default-f32"): ((94, 30.4), (116, 38.95)),
    },
    "3.6": {
        (80, "spec-f32"): ((172, 21.02), (205, 33.55)), (90, "spec-f32"): ((215, 20.96), (199, 34.02)),
        (80, "spec-bf16"): ((171, 22.09), (207, 35.05)), (90, "spec-bf16"): ((207, 21.99), (198, 35.42)),
        (80, "default-f32"): ((78, 29.6), (116, 38.85)), (90, "default-f32"): ((78, 29.85), (116, 39.15)),
    },
    "3.8": {
        (80, "spec-f32"): ((163, 20.51), (203, 32.88)), (90, "spec-f32"): ((203, 20.41), (201, 33.17)),
        (80, "spec-bf16"): ((166, 21.84), (204, 34.58)), (90, "spec-bf16"): ((184, 21.2), (199, 34.16)),
        (80, "default-f32"): ((78, 29.3), (116, 37.85)), (90, "default-f32"): ((78, 29.6), (118, 38.3)),
    },
    "3.9": {
        (80, "spec-f32"): ((163, 20.71), (203, 33.33)), (90, "spec-f32"): ((206, 20.63), (193, 33.78)),
        (80, "spec-bf16"): ((164, 22.07), (204, 35.05)), (90, "spec-bf16"): ((189, 21.38), (189, 34.81)),
        (80, "default-f32"): ((90, 29.2), (116, 38.45)), (90, "default-f32"): ((94, 29.55), (118, 38.85)),
    },
}
WIPE_TOL = 0.05  # relative, on the warp-instructions per element
REG_TOL = 8  # registers (a patch release of a triton may move a few)


@pytest.fixture(scope="module")
def reports():
    """The kernel report at sm_80 and sm_90 for every shape: {(cap, shape): (fwd row, bwd row)}."""
    return {(cap, name): tuple(kernel_report.analyze(*shape, cap=cap)) for cap in (80, 90)
            for name, shape in SHAPES.items()}


def test_no_spills_on_any_triton(reports):
    """No spill instruction and no stack at sm_80 and sm_90, at the SPEC shape (float32 and bfloat16) and the
    default shape, whatever the triton: the kernels cap their registers (``latent_step._MAXNREG``)."""
    for (cap, shape), rows in reports.items():
        for r in rows:
            assert r["spills"] == 0 and r["stack"] == 0, (
                f"triton {triton.__version__}, sm_{cap}, {shape}: {r['name']} has {r['spills']} spill instructions "
                f"and a {r['stack']}-byte stack at {r['registers']} registers")


def test_targets_at_the_spec_shape(reports):
    """Issue 12 at M = 5, D = 512, float32 (B = 4096), on every triton: <= 25 warp-instructions per element
    forward, <= 39 backward, so both are memory-bound on an H100 by the report's model."""
    for cap in (80, 90):
        fwd, bwd = reports[(cap, "spec-f32")]
        assert fwd["name"].startswith("_latent_step_fwd_kernel") and bwd["name"].startswith("_latent_step_bwd_kernel")
        assert (fwd["bytes_per_element"], bwd["bytes_per_element"]) == (72, 104)
        assert fwd["warp_instr_per_element"] <= 25, (triton.__version__, cap, fwd)
        assert bwd["warp_instr_per_element"] <= 39, (triton.__version__, cap, bwd)
        for r in (fwd, bwd):
            assert r["H100_issue_us"] <= r["H100_memory_us"], (triton.__version__, cap, r)
        json.dumps([fwd, bwd])  # the rows are plain data, ready for the benchmark rows


def test_figures_of_this_triton(reports):
    """Registers and warp-instructions per element as measured for this triton (FIGURES above)."""
    version = ".".join(triton.__version__.split(".")[:2])
    assert version in FIGURES, (
        f"triton {triton.__version__} has no measured kernel figures in tests/test_kernel_report.py (FIGURES has "
        f"{sorted(FIGURES)}): run `python -m crmvae_fast kernels --json` per shape at sm_80 and sm_90, check the "
        "figures (no spills, memory-bound), and add them, with tests/compat/run.sh for that torch")
    for (cap, shape), rows in reports.items():
        for r, (regs, wipe) in zip(rows, FIGURES[version][(cap, shape)]):
            got = (r["registers"], round(r["warp_instr_per_element"], 2))
            close = abs(r["registers"] - regs) <= REG_TOL and abs(got[1] - wipe) <= WIPE_TOL * wipe
            assert close, (
                f"triton {version}, sm_{cap}, {shape}, {r['name']}: measured (registers, warp-instr/element) "
                f"{got}, recorded {(regs, wipe)}")


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
