"""64-bit index math of embed_scatter, without allocating 8 GB.

The tables live in a sparse file mapped with torch.from_file: its apparent size
passes 2^31 elements but only the pages the test touches take memory or disk.
Rows beyond element 2^31 are read (forward) and gradient rows beyond 2^31 are
summed (backward, through a strided grad_out); an int32 offset would wrap and
read the wrong row or fault. The Triton interpreter copies whole tensors to host
arrays, so this test drives the C++ kernel (the Triton kernels widen to int64
with the same formula: row.to(tl.int64) * stride).
"""

import os

import pytest
import torch

from metalm_fast import embed_scatter
from metalm_fast.ops import embed_scatter as embed_scatter_op

WIDTH = 64
ROWS = 2**31 // WIDTH + 8  # ROWS * WIDTH > 2^31 elements


@pytest.fixture()
def sparse_table(tmp_path):
    if not hasattr(torch.ops.metalm, "_embed_scatter_fwd_cpu"):
        from metalm_fast.ops._backend import cpu_extension

        if cpu_extension() is None or not hasattr(torch.ops.metalm, "_embed_scatter_fwd_cpu"):
            pytest.skip("cpu backend of embed_scatter is not built")
    path = tmp_path / "table.bin"
    with open(path, "wb") as handle:
        handle.truncate(ROWS * WIDTH * 4)
    table = torch.from_file(str(path), shared=True, size=ROWS * WIDTH, dtype=torch.float32)
    yield table.view(ROWS, WIDTH)
    del table
    os.remove(path)


def test_forward_reads_rows_beyond_2_31_elements(sparse_table):
    weight = sparse_table
    weight[ROWS - 1] = torch.arange(WIDTH, dtype=torch.float32)
    weight[ROWS - 3] = -1.0
    weight[1] = 5.0
    ids = torch.tensor([ROWS - 1, 1, ROWS - 3])
    feature_index = torch.full((3,), -1)
    out = embed_scatter(ids, weight, weight[:0], feature_index, scale=2.0, backend="cpu")
    assert torch.equal(out[0], 2 * torch.arange(WIDTH, dtype=torch.float32))
    assert torch.equal(out[1], torch.full((WIDTH,), 10.0))
    assert torch.equal(out[2], torch.full((WIDTH,), -2.0))


def test_backward_sums_grad_rows_beyond_2_31_elements(sparse_table):
    row_stride = 2**31 // 2 + WIDTH  # row 2 starts past element 2^31
    grad_out = sparse_table.view(-1).as_strided((3, WIDTH), (row_stride, 1))
    for row in range(3):
        grad_out[row] = float(row + 1)
    ids = torch.tensor([4, 4, 7])
    feature_index = torch.full((3,), -1)
    grad_weight, grad_features = embed_scatter_op._embed_scatter_bwd(
        grad_out, ids, feature_index, 10, 0, 1.0, -1, "cpu"
    )
    assert torch.equal(grad_weight[4], torch.full((WIDTH,), 3.0))
    assert torch.equal(grad_weight[7], torch.full((WIDTH,), 3.0))
    assert torch.count_nonzero(grad_weight) == 2 * WIDTH and grad_features.shape == (0, WIDTH)
