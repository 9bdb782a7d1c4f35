"""`python -m tests.fuzz.run TARGET [libFuzzer options] [corpus dirs]`: coverage-guided fuzzing with atheris.

Any exception other than the target's allowed ones (InputError; none for grounding) is a crash: libFuzzer saves the
input as crash-<sha1> in -artifact_prefix and exits non-zero. A timeout (-timeout seconds per input) counts too.
"""

import sys

import atheris

with atheris.instrument_imports(include=["qwen2vl", "PIL"]):
    from qwen2vl.errors import InputError
    from tests.fuzz.targets import ALLOWED, TARGETS


def main() -> None:
    name = sys.argv.pop(1)
    target, allowed = TARGETS[name], ALLOWED.get(name, (InputError,))
    if name == "conversation":
        from tests.fuzz.targets import processor

        processor()  # loading the tokenizer is not part of any input's time

    def one_input(data: bytes) -> None:
        try:
            target(data)
        except allowed:
            pass

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
