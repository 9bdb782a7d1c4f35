"""The skips a CI run may have, each with why it is expected. Under CI (scripts/test.sh with CI set), a skip whose
reason matches none of these patterns fails the run: a missing tool, package or build must not pass as a skip.

Checks for other architectures' kernel levels (NEON on x86, AVX on ARM64) are deselected at collection instead: the
kernel build tests run those variants (ARM64 under qemu-user), so they are not lost."""

EXPECTED = {
    # An x86 CPU without AVX-512 runs the avx2 and generic levels; the avx512 source is still compiled (gcc and
    # clang) by the kernel build tests, which cannot run it here.
    r"this CPU cannot run the avx512 kernels": "an x86 CPU without AVX-512 (tests/conftest.py names what it skipped)",
    # oneDNN refuses bf16 prepacking on CPUs without AVX512-BF16-grade support; the plan then keeps float32 or plain
    # bf16 linears (PackedLinear.runs is the plan's own check).
    r"oneDNN's bf16 matmul does not run on this CPU": "the plan never chooses prepacked bf16 linears here",
    # Parametrized over the quantized checkpoints: 8-bit GPTQ has no int4 layers, and an act-order down projection
    # keeps its input permutation, so neither has the swapped layers to check (each test asserts that first).
    r"nothing swapped, as asserted: gptq8 \(reference kernel\), act-order": "8-bit GPTQ and act-order layers",
    r"no one-call decode layers \(gptq8, act-order": "8-bit GPTQ and act-order layers",
}
