"""One named FormatError per reader check (docs/FORMAT.md, "What a reader checks, in this order").

Every error is one line, ``SOURCE: what is wrong``; ``check`` is the number of the check in the
spec, so tests and callers can tell them apart without matching text.
"""

from __future__ import annotations

from dcomp.errors import FormatError


class DczError(FormatError):
    check = 0


class Truncated(DczError):            # 1: shorter than the preamble
    check = 1


class NotDcz(DczError):               # 2: wrong magic
    check = 2


class UnsupportedVersion(DczError):   # 3: major version
    check = 3


class BadFlags(DczError):             # 4: flags and U
    check = 4


class BadHeaderLength(DczError):      # 5: H
    check = 5


class HeaderChecksum(DczError):       # 6: header CRC32
    check = 6


class BadHeaderZlib(DczError):        # 7: the zlib stream of a compressed header
    check = 7


class HeaderNotJson(DczError):        # 8: UTF-8 / JSON / top-level object
    check = 8


class BadBinaryHeader(DczError):      # 8 (format 1.5): the binary header's structure
    check = 8


class BadHeaderField(DczError):       # 9: schema: a field's presence, type or range
    check = 9


class BadSectionTable(DczError):      # 10: section table
    check = 10


class BadRecord(DczError):            # 11: a record against the section table and the other records
    check = 11


class LimitExceeded(DczError):        # 5, 9, 11: a claim over a resource limit (dcomp.formats.limits)
    check = 11


class SectionChecksum(DczError):      # 12: section CRC32
    check = 12


class BadStream(DczError):            # 13: decoding
    check = 13
