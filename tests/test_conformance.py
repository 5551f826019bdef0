"""The conformance matrix: every text architecture of the installed mlx-lm, through mlxlora's API.

One parametrised test per architecture of tests/arch_configs.py runs tests/conformance.py's checks
(all-linear LoRA with non-zero lora_b: forward, finite non-zero adapter gradients, compiled steps that
lower the loss, save -> load -> equal logits, float fuse -> equal logits, DoRA, 4-bit QLoRA
forward/backward, head-only-at-loss equal to the full head, packing where it is enabled). A failure
caused by mlxlora fails the test; an architecture whose plain model fails the same way inside mlx-lm
must be one of MLX_LM_FAILS, with the reason, so a new one is never hidden.
"""

import pkgutil

import mlx.core as mx
import mlx_lm.models
import pytest

import arch_configs as A
import conformance as C

# Architectures whose plain model (no adapters) fails inside mlx-lm 0.32.2 on this CPU, and why.
MLX_LM_FAILS = {
    "bitnet": "BitLinear's matmul is a Metal kernel",
    "muse_spark": "its qk-norm RoPE is a Metal kernel",
    "olmo": "the module exits at import without the ai2-olmo package",
    "deepseek_v41": "a gather whose VJP mlx cannot take with respect to its indices (no stop_gradient)",
}
# Architectures whose training step fails only compiled (mlxlora's Stepper compiles it), the plain model too.
COMPILE_FAILS = {"dbrx": "evaluates an array inside its MoE forward, which mx.compile refuses"}


@pytest.fixture(autouse=True)
def eager():
    """The matrix runs eagerly: on the CPU every compiled graph is a C++ build (seconds each), and a
    compile-only failure is what test_compiled_training_step checks."""
    mx.disable_compile()
    yield
    mx.enable_compile()


def test_table_covers_every_module():
    """Every module of the installed mlx_lm.models is in the table or out of scope, with a reason."""
    names = {m.name for m in pkgutil.iter_modules(mlx_lm.models.__path__)}
    assert names - set(A.ARCHS) - set(A.OUT_OF_SCOPE) == set()
    assert set(A.ARCHS) & set(A.OUT_OF_SCOPE) == set()
    assert set(A.ARCHS) | set(A.OUT_OF_SCOPE) <= names


@pytest.mark.parametrize("arch", sorted(A.ARCHS))
def test_architecture(arch):
    row = C.check(arch)
    if row.mlx_lm_failure is not None:
        assert arch in MLX_LM_FAILS, f"{arch}: the plain model fails inside mlx-lm: {row.mlx_lm_failure}"
        return
    assert arch not in MLX_LM_FAILS, f"{arch} now works: drop it from MLX_LM_FAILS"
    assert row.cells["train"] == C.OK and row.cells["fuse"] == C.OK, row.cells
    assert row.cells["DoRA"] == C.OK, row.cells["DoRA"]
    assert row.cells["QLoRA"] == C.OK, row.cells["QLoRA"]
    assert row.cells["packing"] == C.OK or row.cells["packing"].startswith("refused: "), row.cells["packing"]
    assert row.head_rows in (C.OK, "head not recognised: full logits are used"), row.head_rows


@pytest.mark.parametrize("arch", ["qwen3_moe", "dbrx"])
def test_compiled_training_step(arch, tmp_path):
    """The compiled step (as `mlxlora train` runs it) works, or fails for the plain model too."""
    mx.enable_compile()
    row = C.Row(arch)
    try:
        C.check_train(arch, tmp_path, row)
    except Exception:
        failure = C.plain_failure(arch)
        assert failure is not None and arch in COMPILE_FAILS, failure
        return
    assert arch not in COMPILE_FAILS and row.cells["train"] == C.OK
