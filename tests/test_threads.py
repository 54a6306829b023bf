"""The thread plan: a node's cores shared by its ranks, loader workers and the table's kernels."""

import threading

import pytest
import torch

from im2vec.train import threads
from im2vec.wide import sparse_optim


@pytest.mark.parametrize("kw, trunk, table", [
    (dict(num_workers=1, local_ranks=8, gpu=True, overlap=True, cores=16), 1, 1),  # 2 cores a rank, 1 worker
    (dict(num_workers=10, local_ranks=1, gpu=True, overlap=True, cores=16), 4, 6),  # torch ≤ 4 beside a GPU
    (dict(num_workers=4, local_ranks=2, gpu=True, overlap=False, cores=16), 4, 4),
    (dict(num_workers=1, local_ranks=1, gpu=False, overlap=False, cores=2), 1, 1),  # the default CPU run
    (dict(num_workers=1, local_ranks=1, gpu=False, overlap=True, cores=8), 6, 1),
    (dict(num_workers=1, local_ranks=1, gpu=False, overlap=True, cores=2), 1, 1),  # worker thread: one core
    (dict(num_workers=0, local_ranks=2, gpu=False, overlap=False, cores=2), 1, 1),  # 2 CPU ranks on 2 cores
    (dict(num_workers=20, local_ranks=1, gpu=True, overlap=True, cores=8), 1, 1),  # never below one
])
def test_plan(kw, trunk, table):
    p = threads.plan(**kw)
    assert (p.trunk, p.table) == (trunk, table)
    assert p.cores == max(1, kw["cores"] // kw["local_ranks"])


def test_overrides_and_apply():
    p = threads.plan(1, 1, True, True, cores=16, trunk=3, table=5)
    assert (p.trunk, p.table) == (3, 5) and "torch 3" in str(p)
    before = torch.get_num_threads()
    try:
        threads.apply(threads.plan(0, 1, False, False, cores=1))
        assert torch.get_num_threads() == 1 and sparse_optim.TABLE_THREADS == 1
    finally:
        torch.set_num_threads(before)
        sparse_optim.set_table_threads(None)


@pytest.mark.skipif(not sparse_optim.USE_NUMBA, reason="numba not installed")
def test_table_kernels_set_numba_threads_in_the_calling_thread():
    """numba's thread count is per thread: a kernel run from the table's worker thread sets its own."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core")
    sparse_optim.set_table_threads(1)
    seen = []
    try:
        def run():
            sparse_optim.gather_rows(torch.randn(5000, 8), torch.arange(0, 5000, 2))
            seen.append(numba.get_num_threads())
        t = threading.Thread(target=run)
        t.start()
        t.join()
    finally:
        sparse_optim.set_table_threads(None)
    assert seen == [1]
