"""fusedrnn: Triton kernels for LSTM, GRU and Elman RNN layers, as drop-in torch.nn modules.

Importing this package never touches a GPU and does not import Triton: the kernels load on first
use (see fusedrnn.dispatch).
"""
from .convert import convert
from .dispatch import BACKENDS, BackendUnavailableError
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

__version__ = "0.1.0"
__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "convert", "verify", "BACKENDS",
           "BackendUnavailableError"]


def verify(model, *example_inputs, **kwargs):
    """Check the fused kernels against the float64 reference on a user's model; see fusedrnn.verify."""
    from .verify import verify as _verify
    return _verify(model, *example_inputs, **kwargs)
