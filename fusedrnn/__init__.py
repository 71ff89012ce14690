"""fusedrnn: Triton kernels for LSTM, GRU and Elman RNN layers, as drop-in torch.nn modules.

Importing this package never touches a GPU and does not import Triton: the kernels load on first
use (see fusedrnn.dispatch).
"""
from .convert import convert
from .dispatch import BACKENDS, BackendUnavailableError
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from .verify import verify  # after the submodule import, so the name is the function

__version__ = "0.1.0"
__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "convert", "verify", "BACKENDS",
           "BackendUnavailableError"]
