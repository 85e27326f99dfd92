"""Optional numba kernel for sparse codebook tensors: one compiled pass from gap and index symbols
to the weight bits, the mask and the assignments, with the same checks as gap_positions (the
numpy path in reader.py is the reference)."""

from __future__ import annotations

from dcomp.compressors import huffman as hf

_ASSEMBLE: object = False


def _assemble_kernel():
    global _ASSEMBLE
    if _ASSEMBLE is False:
        _ASSEMBLE = None
        if hf._numba_kernel() is not None:
            try:
                import numba

                @numba.njit(cache=True, nogil=True)
                def assemble(gsyms, m, numel, idx, cb, out, mask, want_mask, assign, want_assign):  # pragma: no cover
                    c = 0
                    j = 0
                    nnz = idx.shape[0]
                    k = cb.shape[0]
                    for s in gsyms:
                        if s == m:
                            c += m
                            continue
                        c += s + 1
                        if c > numel:
                            return 1
                        if j >= nnz:
                            return 3
                        v = idx[j]
                        if v >= k:
                            return 4
                        out[c - 1] = cb[v]
                        if want_mask:
                            mask[c - 1] = True
                        if want_assign:
                            assign[c - 1] = v
                        j += 1
                    if c > numel:
                        return 1
                    if numel - c >= m:
                        return 2
                    if j != nnz:
                        return 3
                    return 0

                _ASSEMBLE = assemble
            except Exception:  # noqa: BLE001
                _ASSEMBLE = None
    return _ASSEMBLE
