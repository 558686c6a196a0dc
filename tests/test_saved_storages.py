"""moelora.bench.saved_tensors.SavedStorages: what the memory measurements of the experiments count."""
import torch

from moelora.bench.saved_tensors import SavedStorages


def test_counts_each_saved_storage_once_and_no_parameter():
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    with SavedStorages(lin) as saved:
        y = lin(x)  # saves x (and the weight, a parameter: not counted)
        z = (y * y).sum()  # saves y twice: one storage
    assert saved.nbytes == x.numel() * 4 + y.numel() * 4
    z.backward()
    with SavedStorages(lin) as none:
        with torch.no_grad():
            lin(x)
    assert none.nbytes == 0
