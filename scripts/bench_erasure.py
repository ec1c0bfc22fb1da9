"""Erasure-code throughput: encode and decode GB/s vs memcpy of the same bytes, one run.

GB/s counts the data bytes protected (k shards). Decode loses the first min(m, k) data
shards (the worst case: every lost shard must be rebuilt from parity). memcpy is
``torch.Tensor.copy_`` of the k data shards into preallocated buffers. Beside loomtrain's
torch code: loomtrain's same code run by ISA-L's SIMD kernel (``ec_encode_data`` on the
shard buffers, what ``ReedSolomon`` uses on CPU when it finds ISA-L: the system's libisal or
the copy in ``pyeclib``'s wheel), and ISA-L as liberasurecode exposes it to Python
(``pyeclib``): the whole buffer as bytes in, k+m fragments with 80-byte headers out, as a
user of that library gets it (copies included).

    python scripts/bench_erasure.py --mib 64 --repeats 5
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from loomtrain.faulttol import erasure
from loomtrain.faulttol.erasure import ReedSolomon


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=64, help="data size per code (all k shards together), MiB")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{a.threads} thread(s); {a.mib} MiB of data per code, median of {a.repeats}\n")
    print("| (k, m) | code | memcpy GB/s | encode GB/s | encode / memcpy | decode GB/s (lose min(m,k) data) | "
          "decode / memcpy |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for k, m in ((4, 1), (4, 2), (8, 2)):
        per = a.mib * 2 ** 20 // k
        data = [torch.randint(0, 256, (per,), dtype=torch.uint8) for _ in range(k)]
        copies = [torch.empty_like(d) for d in data]
        rs = ReedSolomon(k, m)
        total = per * k / 1e9
        t_copy = timed(lambda: [c.copy_(d) for c, d in zip(copies, data)], a.repeats)
        for kernel in ("torch", "isa-l"):
            erasure._isal_lib = False if kernel == "torch" else None  # None: look ISA-L up again
            if kernel == "isa-l" and erasure.isal() is None:
                print(f"| ({k}, {m}) | loomtrain, ISA-L kernel: not found (apt install libisal2, or pip install "
                      f"pyeclib) | | | | | |")
                continue
            parity = rs.encode(data)
            shards = {i: s for i, s in enumerate(data + parity) if i >= min(m, k)}
            t_enc = timed(lambda: rs.encode(data), a.repeats)
            t_dec = timed(lambda: rs.decode(shards), a.repeats)
            name = "loomtrain (torch, bitwise)" if kernel == "torch" else "loomtrain (ISA-L kernel, same code)"
            print(f"| ({k}, {m}) | {name} | {total / t_copy:.2f} | {total / t_enc:.2f} | "
                  f"{t_copy / t_enc:.3f} | {total / t_dec:.2f} | {t_copy / t_dec:.3f} |", flush=True)
        for ec_type in ("isa_l_rs_cauchy", "isa_l_rs_vand"):
            try:
                from pyeclib.ec_iface import ECDriver

                driver = ECDriver(k=k, m=m, ec_type=ec_type)
            except Exception as e:  # noqa: BLE001 - not installed, or this backend missing
                print(f"| ({k}, {m}) | pyeclib {ec_type}: unavailable ({type(e).__name__}) | | | | | |")
                continue
            blob = torch.cat(data).numpy().tobytes()
            fragments = driver.encode(blob)
            t_enc = timed(lambda: driver.encode(blob), a.repeats)
            kept = fragments[min(m, k):min(m, k) + k]
            assert driver.decode(kept) == blob
            t_dec = timed(lambda: driver.decode(kept), a.repeats)
            print(f"| ({k}, {m}) | pyeclib {ec_type} (ISA-L) | {total / t_copy:.2f} | {total / t_enc:.2f} | "
                  f"{t_copy / t_enc:.3f} | {total / t_dec:.2f} | {t_copy / t_dec:.3f} |", flush=True)


if __name__ == "__main__":
    main()
