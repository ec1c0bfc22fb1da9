"""Reed-Solomon erasure codes over GF(2^8) for snapshot shards, on any torch device.

``ReedSolomon(k, m)`` turns k equal-length data shards (1-D ``torch.uint8``) into m parity
shards; any k of the k+m shards give the data back. The code is systematic: shards
0..k-1 are the data, k..k+m-1 the parity rows of the generator matrix:

- m = 1: XOR parity (row of ones);
- m = 2: RAID-6 P + Q (ones, then 2^j) — MDS for k < 255;
- m >= 3: a Cauchy matrix 1 / (x_i + y_j), x_i = k + i, y_j = j, which is MDS for every
  choice of k erased rows.

Arithmetic on shard bytes is bitwise on 64-bit words (8 field elements at a time): the
product by 2 is ``((w << 1) & 0xFE..) ^ (((w >> 7) & 0x01..) * 0x1D)`` (polynomial 0x11D),
and the product by any constant c is the XOR of the doublings selected by c's bits. A
coefficient of 1 is a plain XOR, so XOR parity and the common single-loss decode run at
memory speed; the same code runs on the GPU when the shards are there. Scalar field
arithmetic (matrix inversion for decoding) uses log/exp tables.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os

import torch

POLY = 0x11D
MAX_K, MAX_M = 32, 8
_NOT_LSB = 0xFEFEFEFEFEFEFEFE - (1 << 64)  # as signed int64
_ONES = 0x0101010101010101
BLOCK_WORDS = 1 << 17  # 1 MiB per working block: doublings stay cache/memory friendly


def _tables():
    exp, log = [0] * 512, [0] * 256
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= POLY
    for i in range(255, 512):
        exp[i] = exp[i - 255]
    return exp, log


EXP, LOG = _tables()


def gf_mul(a: int, b: int) -> int:
    return 0 if a == 0 or b == 0 else EXP[LOG[a] + LOG[b]]


def gf_inv(a: int) -> int:
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(2^8)")
    return EXP[255 - LOG[a]]


def gf_invert_matrix(rows: list[list[int]]) -> list[list[int]]:
    """Inverse of a square matrix over GF(2^8) (Gauss-Jordan; addition is XOR)."""
    n = len(rows)
    a = [list(r) + [1 if i == j else 0 for j in range(n)] for i, r in enumerate(rows)]
    for col in range(n):
        pivot = next((r for r in range(col, n) if a[r][col]), None)
        if pivot is None:
            raise ValueError("matrix is singular over GF(2^8)")
        a[col], a[pivot] = a[pivot], a[col]
        inv = gf_inv(a[col][col])
        a[col] = [gf_mul(inv, x) for x in a[col]]
        for r in range(n):
            if r != col and a[r][col]:
                f = a[r][col]
                a[r] = [x ^ gf_mul(f, y) for x, y in zip(a[r], a[col])]
    return [row[n:] for row in a]


ERASURE_ENV = "LOOMTRAIN_ERASURE"  # auto (ISA-L when found) | torch
ISAL_BLOCK = 1 << 26  # bytes per ec_encode_data call (its length is a C int)
_isal_lib = None


def _isal_candidates() -> list[str]:
    """The system's ISA-L (Debian: libisal2), else the copy bundled with pyeclib's wheel."""
    found = [p for p in (ctypes.util.find_library("isal"),) if p]
    spec = importlib.util.find_spec("pyeclib")
    if spec is not None and spec.submodule_search_locations:
        libs = os.path.join(os.path.dirname(list(spec.submodule_search_locations)[0]), "pyeclib.libs")
        found += sorted(glob.glob(os.path.join(libs, "libisal*.so*")))
    return found


def isal():
    """Intel ISA-L's erasure-code kernels (SIMD table lookups, GF(2^8) with the same 0x11D polynomial), or
    None. Only ``ec_init_tables`` and ``ec_encode_data`` are used: loomtrain's own generator matrix and
    shard buffers, so parity is bit-identical to the torch code's and any mix of the two decodes."""
    global _isal_lib
    if _isal_lib is None:
        _isal_lib = False
        if os.environ.get(ERASURE_ENV, "auto") != "torch":
            for path in _isal_candidates():
                try:
                    lib = ctypes.CDLL(path)  # a CDLL call releases the GIL: training threads keep running
                    lib.ec_init_tables.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
                    lib.ec_init_tables.restype = None
                    lib.ec_encode_data.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 3
                    lib.ec_encode_data.restype = None
                except (OSError, AttributeError):
                    continue
                _isal_lib = lib
                break
    return _isal_lib or None


def _apply_isal(lib, rows: list[list[int]], inputs: list[torch.Tensor], length: int) -> list[torch.Tensor]:
    k, r = len(inputs), len(rows)
    coefficients = (ctypes.c_ubyte * (k * r))(*[c for row in rows for c in row])
    tables = ctypes.create_string_buffer(32 * k * r)
    lib.ec_init_tables(k, r, coefficients, tables)
    sources = [s.contiguous() for s in inputs]
    outs = [torch.empty(length, dtype=torch.uint8) for _ in rows]
    for lo in range(0, length, ISAL_BLOCK):
        n = min(ISAL_BLOCK, length - lo)
        data = (ctypes.c_void_p * k)(*[s.data_ptr() + lo for s in sources])
        coding = (ctypes.c_void_p * r)(*[o.data_ptr() + lo for o in outs])
        lib.ec_encode_data(n, k, r, tables, data, coding)
    return outs


def _mul2(w: torch.Tensor) -> torch.Tensor:
    """Multiply 8 packed GF(2^8) elements per int64 word by 2 (new tensor; two temporaries)."""
    high = torch.bitwise_right_shift(w, 7).bitwise_and_(_ONES).mul_(0x1D)
    return torch.bitwise_left_shift(w, 1).bitwise_and_(_NOT_LSB).bitwise_xor_(high)


def _combine_rows(rows: list[list[int]], words: list[torch.Tensor]) -> list[torch.Tensor]:
    """For each row r: sum_j r[j] * words[j] over GF(2^8). Each input's doublings (x, 2x, 4x, ...)
    are computed once and shared by every row, only as far as the largest coefficient needs."""
    outs = [torch.zeros_like(words[0]) for _ in rows]
    for j, w in enumerate(words):
        bits = max(row[j].bit_length() for row in rows)
        power = w
        for bit in range(bits):
            for out, row in zip(outs, rows):
                if (row[j] >> bit) & 1:
                    out.bitwise_xor_(power)
            if bit + 1 < bits:
                power = _mul2(power)
    return outs


def _combine(coeffs: list[int], words: list[torch.Tensor]) -> torch.Tensor:
    """sum_j coeffs[j] * words[j] over GF(2^8), words being int64 views of equal length."""
    return _combine_rows([coeffs], words)[0]


class ReedSolomon:
    def __init__(self, k: int, m: int):
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k: data shards must be 1..{MAX_K}, got {k}")
        if not 1 <= m <= MAX_M:
            raise ValueError(f"m: parity shards must be 1..{MAX_M}, got {m}")
        self.k, self.m = k, m
        if m <= 2:
            parity = [[1] * k, [EXP[j] for j in range(k)]][:m]
        else:
            parity = [[gf_inv((k + i) ^ j) for j in range(k)] for i in range(m)]
        self.matrix = [[1 if i == j else 0 for j in range(k)] for i in range(k)] + parity

    # -------------------------------------------------------------- byte <-> word views
    @staticmethod
    def _check(shards, what: str) -> int:
        lengths = {int(s.numel()) for s in shards}
        for s in shards:
            if s.dtype != torch.uint8 or s.dim() != 1:
                raise ValueError(f"{what}: shards must be 1-D torch.uint8 (view other dtypes as uint8), "
                                 f"got {s.dtype} with shape {tuple(s.shape)}")
        if len(lengths) != 1:
            raise ValueError(f"{what}: shards must have equal lengths, got {sorted(lengths)}")
        return lengths.pop()

    @staticmethod
    def _words(s: torch.Tensor, padded: int) -> torch.Tensor:
        if s.numel() != padded:
            s = torch.cat([s, s.new_zeros(padded - s.numel())])
        return s.contiguous().view(torch.int64)

    def _apply(self, rows: list[list[int]], inputs: list[torch.Tensor], length: int) -> list[torch.Tensor]:
        if length and inputs[0].device.type == "cpu" and (lib := isal()) is not None:
            return _apply_isal(lib, rows, inputs, length)
        padded = -(-length // 8) * 8
        words = [self._words(s, padded) for s in inputs]
        outs = [torch.empty(padded // 8, dtype=torch.int64, device=inputs[0].device) for _ in rows]
        n = padded // 8
        for lo in range(0, n, BLOCK_WORDS):
            block = [w[lo:lo + BLOCK_WORDS] for w in words]
            for out, part in zip(outs, _combine_rows(rows, block)):
                out[lo:lo + BLOCK_WORDS] = part
        return [o.view(torch.uint8)[:length] for o in outs]

    # -------------------------------------------------------------- API
    def encode(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        """The m parity shards of k data shards."""
        if len(data) != self.k:
            raise ValueError(f"encode: expected {self.k} data shards, got {len(data)}")
        length = self._check(data, "encode")
        return self._apply(self.matrix[self.k:], data, length)

    def decode(self, shards: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """The k data shards from any k of the k+m shards (``{index: shard}``)."""
        bad = sorted(i for i in shards if not 0 <= i < self.k + self.m)
        if bad:
            raise ValueError(f"decode: shard indices must be 0..{self.k + self.m - 1}, got {bad}")
        if len(shards) < self.k:
            missing = sorted(set(range(self.k + self.m)) - set(shards))
            raise ValueError(f"decode: {self.k - len(shards)} shard(s) short: need any {self.k} of "
                             f"{self.k + self.m}, have {len(shards)} (missing indices {missing})")
        length = self._check(list(shards.values()), "decode")
        if all(i in shards for i in range(self.k)):
            return [shards[i] for i in range(self.k)]
        # Surviving data shards first: their rows of the inverse are unit vectors (plain copies/XORs).
        use = ([i for i in range(self.k) if i in shards] + [i for i in sorted(shards) if i >= self.k])[:self.k]
        inverse = gf_invert_matrix([self.matrix[i] for i in use])
        missing = [i for i in range(self.k) if i not in shards]
        rebuilt = self._apply([inverse[i] for i in missing], [shards[i] for i in use], length)
        out = dict(zip(missing, rebuilt))
        return [shards[i] if i in shards else out[i] for i in range(self.k)]
