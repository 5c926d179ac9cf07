"""The fault suite: compiles interrupted, disks filled, artifacts attacked, parsers fuzzed, ranks
killed, intruders kept out. Each case records its trials (conftest.py); `python -m
tests.faults.table` writes the README's "What happens when…" table from them.

    python -m pytest tests/faults            # fast part (also in the default run)
    python -m pytest tests/faults -m slow    # the README's figures
"""
