"""The fuzz targets (tests/fuzzing/targets.py) on a short budget, and every input that ever failed
(tests/data/fuzz-corpus/<target>/) replayed: untrusted bytes raise only the documented errors
(one line naming the file), within 5 s of CPU; round trips come back bit for bit.
`make fuzz` runs the same targets for >= 1M inputs (docs/RELIABILITY.md)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzzing import targets

CORPUS = Path(__file__).parent / "data" / "fuzz-corpus"
BUDGET = {"dcz_decode": 200, "dcz_header_decode": 150, "huffman_decode": 150, "checkpoint_decode": 60,
          "checkpoint_dict_decode": 25, "huffman_round_trip": 40, "pack_round_trip": 15, "cabac_decode": 200,
          "cabac_round_trip": 30, "dcz_binary_decode": 250, "dcz_binary_round_trip": 25}


def run_bounded(fn, data: bytes) -> None:
    t = time.process_time()
    fn(data)
    took = time.process_time() - t
    assert took < 5, f"{took:.1f} s of CPU for one input (a hang)"


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_short_fuzz_budget(name):
    fn = targets.TARGETS[name]

    @settings(max_examples=BUDGET[name], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=512))
    def check(data):
        run_bounded(fn, data)

    check()


def corpus_files():
    return sorted(p for p in CORPUS.glob("*/*") if p.is_file())


def test_corpus_is_there():
    names = {p.parent.name for p in corpus_files()}
    assert {"dcz_header_decode", "checkpoint_decode", "checkpoint_dict_decode", "huffman_decode"} <= names
    assert names <= set(targets.TARGETS)


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_corpus_replay(path):
    """Each file once made its target crash, hang or allocate too much; now it must not. (cabac_decode's
    files are one input per decoder outcome, every error and a valid stream of each model, so the
    replay keeps each path of the cabac decoder exercised; none of them ever failed.)"""
    targets.seed_files()          # built outside the timed part
    run_bounded(targets.TARGETS[path.parent.name], path.read_bytes())


def test_header_mutation_reaches_the_checks_behind_the_crcs():
    """The structure-aware mutator fixes CRCs and lengths: most mutated files fail past check 6."""
    from dcomp.errors import FormatError
    from dcomp.formats import dcz
    from dcomp.formats.dcz import errors as E

    import random
    rng = random.Random(1)
    checks = []
    for _ in range(150):
        data = targets.mutate_dcz(bytes(rng.getrandbits(8) for _ in range(48)))
        try:
            dcz.read_bytes(data, "m")
            checks.append(99)
        except E.DczError as e:
            checks.append(e.check)
        except FormatError:
            checks.append(0)
    assert sum(c > 6 for c in checks) > 0.8 * len(checks)
    assert {9, 11} <= set(checks)
