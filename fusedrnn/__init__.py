"""fusedrnn: Triton kernels for LSTM, GRU and Elman RNN layers, as drop-in torch.nn modules.

Importing this package never touches a GPU and does not import Triton: the kernels load on first
use (see fusedrnn.dispatch). The tools (verify, bench, the command line) live in fusedrnn.tools and
are imported only when used: `fusedrnn.verify` is the function fusedrnn.tools.verify.verify.
"""
from .convert import convert, patch_torch
from .errors import BackendUnavailableError
from .layernorm import LayerNormGRU, LayerNormGRUCell, LayerNormLSTM, LayerNormLSTMCell
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from .spec import BACKENDS

__version__ = "0.1.0"
__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "LayerNormLSTM", "LayerNormGRU",
           "LayerNormLSTMCell", "LayerNormGRUCell", "convert", "patch_torch", "verify", "BACKENDS",
           "BackendUnavailableError"]


def __getattr__(name):
    if name == "verify":
        from .tools.verify import verify
        return verify
    raise AttributeError(f"module 'fusedrnn' has no attribute {name!r}")
