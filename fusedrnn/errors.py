"""Exceptions for bad input. Each is also an instance of the type torch.nn raises for the same
mistake (often obscurely, e.g. AttributeError "'tuple' object has no attribute 'dim'"), so code
that catches torch.nn's exception keeps working, while the message says what is wrong."""


class NotATensorError(TypeError, AttributeError):
    """A tensor was expected (input, h_0, c_0) and something else was given."""


class HiddenStatePairError(TypeError, IndexError, RuntimeError):
    """An LSTM's hx is not an (h_0, c_0) pair (torch.nn: IndexError or RuntimeError)."""


class StateRankError(RuntimeError, IndexError):
    """h_0/c_0 has the wrong number of dimensions (torch.nn: RuntimeError, IndexError if packed)."""


class DtypeMismatchError(ValueError, RuntimeError):
    """Input, weights and states disagree in dtype (torch.nn: ValueError for layers, RuntimeError
    for cells and packed input)."""


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend or kernel cannot run here (the message says why)."""
