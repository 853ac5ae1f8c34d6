"""numba kernels that parse CP2K-style xyz trajectories from raw bytes.

Two kernels, both over a ``uint8`` buffer holding whole lines of the file:

``scan_frames``
    walks frame structure only (atom-count line, header line, ``natoms`` atom
    lines), records each frame's byte offset and parses CP2K's header
    `` i = STEP, time = T, E = E``. Cheap (newline search), used for the first pass
    that validates structure and finds which steps every file has.
``parse_frames``
    parses the atom lines of selected frames into a float64 array, checking the
    species of every line against the first frame's.

Kernels take arrays and scalars only and report problems as integer codes plus
the frame / atom where they happened; the Python wrapper turns those into
messages naming the file and line.

Float parsing uses Clinger's fast path: a decimal with at most 15-16 significant
digits and a power-of-ten scale within 10^22 is converted exactly (one correctly
rounded multiply or divide of two exactly representable doubles). CP2K writes
``F20.10`` fields, which always take that path; other numbers are scaled in exact
steps of 1e22, a few ulp at most (tests check both).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# error codes shared with the Python wrapper (ensemble.io.cp2k)
OK = 0
BAD_ATOM_COUNT = 1        # first line of a frame is not the expected integer
BAD_HEADER = 2            # second line is not " i = STEP, time = T, E = E"
BAD_NUMBER = 3            # a coordinate field is not a number
NON_FINITE = 4            # NaN or infinity
WRONG_SPECIES = 5         # species differs from the first frame's
MISSING_FIELD = 6         # fewer than 4 fields on an atom line
EXTRA_FIELD = 7           # more than 4 fields on an atom line

_POW10 = np.array([10.0 ** k for k in range(23)])


@njit(cache=True)
def _is_space(c):
    return c == 32 or c == 9 or c == 13


@njit(cache=True)
def _parse_float(buf, pos, end):
    """Parse a float starting at ``buf[pos]`` (no leading blanks).

    Returns (value, new_pos, status) with status OK, BAD_NUMBER or NON_FINITE.
    """
    i = pos
    neg = False
    if i < end and (buf[i] == 45 or buf[i] == 43):  # '-' '+'
        neg = buf[i] == 45
        i += 1
    mant = np.int64(0)
    ndig = 0
    nsig = 0
    scale = 0
    extra = 0
    while i < end and 48 <= buf[i] <= 57:
        if nsig < 18:
            mant = mant * 10 + (buf[i] - 48)
            if mant > 0:
                nsig += 1
        else:
            extra += 1
        ndig += 1
        i += 1
    if i < end and buf[i] == 46:  # '.'
        i += 1
        while i < end and 48 <= buf[i] <= 57:
            if nsig < 18:
                mant = mant * 10 + (buf[i] - 48)
                if mant > 0:
                    nsig += 1
                scale -= 1
            ndig += 1
            i += 1
    if ndig == 0:
        # NaN / Infinity / Fortran overflow stars
        if i < end and (buf[i] == 78 or buf[i] == 110 or buf[i] == 73 or buf[i] == 105 or buf[i] == 42):
            while i < end and not _is_space(buf[i]) and buf[i] != 10:
                i += 1
            return np.nan, i, NON_FINITE
        return 0.0, i, BAD_NUMBER
    if i < end and (buf[i] == 101 or buf[i] == 69 or buf[i] == 100 or buf[i] == 68):  # e E d D
        i += 1
        eneg = False
        if i < end and (buf[i] == 45 or buf[i] == 43):
            eneg = buf[i] == 45
            i += 1
        ev = 0
        nexp = 0
        while i < end and 48 <= buf[i] <= 57:
            if ev < 100000:
                ev = ev * 10 + (buf[i] - 48)
            nexp += 1
            i += 1
        if nexp == 0:
            return 0.0, i, BAD_NUMBER
        scale += -ev if eneg else ev
    if i < end and not (_is_space(buf[i]) or buf[i] == 10 or buf[i] == 44):
        return 0.0, i, BAD_NUMBER
    scale += extra
    if mant == 0:
        value = 0.0
    elif mant < 9007199254740992 and -22 <= scale <= 22:
        if scale >= 0:
            value = float(mant) * _POW10[scale]
        else:
            value = float(mant) / _POW10[-scale]
    else:
        # outside the fast path: one power of ten from libm's pow (within 0.52 ulp in glibc), split
        # beyond 1e290 so that no intermediate leaves the normal range: about 2.5 ulp in all (steps of
        # 1e22, each rounded, reached 5 ulp at 1.6e-226)
        value = float(mant)
        if scale > 290:
            value = value * math.pow(10.0, float(scale - 290)) * 1e290
        elif scale >= 0:
            value = value * math.pow(10.0, float(scale))
        elif scale < -290:
            value = value / math.pow(10.0, float(-scale - 290)) / 1e290
        else:
            value = value / math.pow(10.0, float(-scale))
    if neg:
        value = -value
    if not np.isfinite(value):
        return value, i, NON_FINITE
    return value, i, OK


@njit(cache=True)
def _skip_blanks(buf, i, end):
    while i < end and _is_space(buf[i]):
        i += 1
    return i


@njit(cache=True)
def _line_end(buf, i, end):
    """Index of the next newline at or after i, or -1 if the buffer has none."""
    while i < end:
        if buf[i] == 10:
            return i
        i += 1
    return -1


@njit(cache=True)
def _parse_header(buf, i, eol):
    """Parse `` i = STEP, time = T, E = E`` between i and eol. Returns (ok, step, time, energy)."""
    vals = np.zeros(3)
    k = 0
    j = i
    while j < eol and k < 3:
        if buf[j] == 61:  # '='
            j = _skip_blanks(buf, j + 1, eol)
            v, j, st = _parse_float(buf, j, eol)
            if st == BAD_NUMBER:
                return False, 0, 0.0, 0.0
            vals[k] = v
            k += 1
        else:
            j += 1
    if k < 2:
        return False, 0, 0.0, 0.0
    # the token before the first '=' must be 'i'
    first = i
    while first < eol and buf[first] != 61:
        first += 1
    t = first - 1
    while t > i and _is_space(buf[t]):
        t -= 1
    if buf[t] != 105:  # 'i'
        return False, 0, 0.0, 0.0
    energy = vals[2] if k == 3 else np.nan
    return True, np.int64(vals[0]), vals[1], energy


@njit(cache=True)
def scan_frames(buf, natoms, final, out_offset, out_step, out_time, out_energy):
    """Walk complete frames in ``buf``.

    Parameters
    ----------
    buf : uint8[:]
        Bytes of the file from a frame boundary on.
    natoms : int
        Expected atom count.
    final : bool
        True when ``buf`` reaches the end of the file (an incomplete frame is then an error).
    out_offset, out_step, out_time, out_energy : arrays of length >= max frames
        Byte offset of each frame relative to ``buf``, CP2K step, time (fs) and
        energy (hartree, NaN if absent), filled for frames found.

    Returns
    -------
    (n_frames, consumed_bytes, status, lines_in_partial_frame)
        ``consumed_bytes`` is where the first incomplete frame starts. ``status`` is
        OK, BAD_ATOM_COUNT or BAD_HEADER for frame ``n_frames``, or -1 when ``final``
        and the buffer ends inside frame ``n_frames`` (truncated file).
    """
    end = buf.shape[0]
    pos = 0
    n = 0
    cap = out_offset.shape[0]
    while n < cap:
        start = _skip_blanks(buf, pos, end)
        if start >= end:
            return n, end if final else pos, OK, 0
        if buf[start] == 10:
            # a blank line is only allowed as trailing whitespace at the end of the file
            k = start
            while k < end and (buf[k] == 10 or _is_space(buf[k])):
                k += 1
            if k < end:
                return n, pos, BAD_ATOM_COUNT, 0
            return n, end if final else pos, OK, 0
        eol = _line_end(buf, start, end)
        if eol < 0:
            if final:
                return n, pos, -1, 0
            return n, pos, OK, 0
        v, j, st = _parse_float(buf, start, eol)
        j = _skip_blanks(buf, j, eol)
        if st != OK or v != natoms or j != eol:
            return n, pos, BAD_ATOM_COUNT, 0
        hstart = eol + 1
        heol = _line_end(buf, hstart, end)
        if heol < 0:
            if final:
                return n, pos, -1, 1
            return n, pos, OK, 0
        ok, step, time, energy = _parse_header(buf, hstart, heol)
        if not ok:
            return n, pos, BAD_HEADER, 1
        q = heol + 1
        lines = 0
        while lines < natoms:
            e = _line_end(buf, q, end)
            if e < 0:
                if final and q < end:
                    # last line without a trailing newline
                    lines += 1
                    q = end
                break
            lines += 1
            q = e + 1
        if lines < natoms:
            if final:
                return n, pos, -1, lines + 2
            return n, pos, OK, 0
        out_offset[n] = pos
        out_step[n] = step
        out_time[n] = time
        out_energy[n] = energy
        n += 1
        pos = q
    return n, pos, OK, 0


@njit(cache=True)
def parse_frames(buf, offsets, natoms, species_ref, out):
    """Parse the atom lines of the frames starting at ``offsets`` into ``out``.

    Parameters
    ----------
    buf : uint8[:]
    offsets : int64[:]
        Start of each wanted frame (its atom-count line) in ``buf``.
    natoms : int
    species_ref : uint8[natoms, 4]
        Species symbol of each atom, zero padded (from the first frame).
    out : float64[len(offsets), natoms, 3]

    Returns
    -------
    (status, frame, atom)
        OK, or an error code with the index in ``offsets`` and the atom where it occurred.
    """
    end = buf.shape[0]
    for f in range(offsets.shape[0]):
        p = offsets[f]
        # skip atom-count and header lines (validated by scan_frames)
        for _ in range(2):
            e = _line_end(buf, p, end)
            p = end if e < 0 else e + 1
        for a in range(natoms):
            e = _line_end(buf, p, end)
            eol = end if e < 0 else e
            i = _skip_blanks(buf, p, eol)
            # species token
            k = 0
            while i < eol and not _is_space(buf[i]):
                if k >= 4 or buf[i] != species_ref[a, k]:
                    return WRONG_SPECIES, f, a
                k += 1
                i += 1
            if k == 0:
                return MISSING_FIELD, f, a
            if k < 4 and species_ref[a, k] != 0:
                return WRONG_SPECIES, f, a
            for c in range(3):
                i = _skip_blanks(buf, i, eol)
                if i >= eol:
                    return MISSING_FIELD, f, a
                v, i, st = _parse_float(buf, i, eol)
                if st != OK:
                    return st, f, a
                out[f, a, c] = v
            i = _skip_blanks(buf, i, eol)
            if i < eol:
                return EXTRA_FIELD, f, a
            p = eol + 1
    return OK, 0, 0
