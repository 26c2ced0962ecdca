"""Run under torchrun by tests/test_distributed.py (not a test module itself):

    torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py OUT

Each process checks the reduction on tensors, then slices the tiny models of CASES on its share
of the rows and saves its widths and logits on a probe to OUT/rank<r>.pt, for the test to
compare with one process.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

import slicegpt
from slicegpt.core.distributed import TorchDistributedReduction, init_from_env
from slicegpt.core.pca import Covariance
from slicegpt.core.streams import Streams

from conftest import calib_rows, make_tiny

PROBE = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(7))

# name -> (family, calibration rows, SliceConfig): per-layer and uniform, the default corrections
# and MLP neuron pruning (a parameter target); batches of 2 rows, so 10 rows make 5 batches
# (rank 0 two, rank 1 three with the held-out one) and 4 rows make 2 (rank 1 holds only the
# held-out batch: its fit moments are empty).
CASES: dict[str, tuple[str, int, dict[str, Any]]] = {
    "per-layer target": ("llama", 10, dict(uniform=False, target_params=0.8, batch_size=2)),
    "per-layer held-out only": ("llama", 4, dict(uniform=False, target_params=0.8, batch_size=2)),
    "uniform corrected": ("llama", 10, dict(sparsity=0.25, uniform=True, correct=True, batch_size=2)),
    "parallel target": ("gpt_neox", 10, dict(uniform=False, target_params=0.8, batch_size=2)),
    "moe experts target": ("qwen2_moe", 10, dict(target_params=0.9, uniform=True, batch_size=2)),
}


def slice_case(name: str, streams: Streams | None) -> dict[str, Any]:
    """The widths and probe logits of one case sliced with ``streams`` (None: one process)."""
    family, n, kwargs = CASES[name]
    model = make_tiny(family)
    report = slicegpt.slice_model(
        model, None, calib_rows(n, seqlen=16), slicegpt.SliceConfig(**kwargs), progress=False, streams=streams
    )
    with torch.no_grad():
        logits = model(input_ids=PROBE).logits
    return {"widths": report.widths.to_dict(), "logits": logits, "refits": dict(report.refits)}


def check_reduction(ranks: TorchDistributedReduction) -> dict[str, Any]:
    r, w = ranks.rank, ranks.processes
    summed = torch.full((2, 3), float(r + 1), dtype=torch.float64)
    strided = torch.arange(6, dtype=torch.float64).reshape(3, 2).t()  # not contiguous: summed through a copy
    ranks.sum_([summed, strided])
    agreed = ranks.agree(torch.full((4,), float(r), dtype=torch.float64))
    # Each rank holds other rows: the reduced covariance is that of all of them.
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(10 + r))
    cov = Covariance(4)
    cov.add(x, None)
    cov = ranks(cov)
    return {"summed": summed, "strided": strided, "agreed": agreed, "cov": cov.sum, "count": cov.count, "world": w}


def main(out: Path) -> None:
    ranks = init_from_env("cpu", timeout_s=120)
    assert ranks is not None, "run me under torchrun with at least 2 processes"
    result: dict[str, Any] = {"reduction": check_reduction(ranks)}
    for name in CASES:
        result[name] = slice_case(name, Streams(reduce=ranks))
    torch.save(result, out / f"rank{ranks.rank}.pt")
    ranks.finish()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
