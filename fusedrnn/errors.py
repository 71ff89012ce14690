"""Exceptions for bad input. Each is also an instance of the type torch.nn raises for the same
mistake (often obscurely, e.g. AttributeError "'tuple' object has no attribute 'dim'"), so code
that catches torch.nn's exception keeps working; the modules put torch.nn's own message for the
same call first (code and tests match its text) and fusedrnn's explanation after it."""


class BadInputError(Exception):
    """Raised by fusedrnn's own checks of a call's arguments, before anything runs."""


class NotATensorError(BadInputError, TypeError, AttributeError):
    """A tensor was expected (input, h_0, c_0) and something else was given."""


class HiddenStatePairError(BadInputError, TypeError, IndexError, RuntimeError):
    """An LSTM's hx is not an (h_0, c_0) pair (torch.nn: IndexError or RuntimeError)."""


class StateRankError(BadInputError, RuntimeError, IndexError):
    """h_0/c_0 has the wrong number of dimensions (torch.nn: RuntimeError, IndexError if packed)."""


class DtypeMismatchError(BadInputError, ValueError, RuntimeError):
    """Input, weights and states disagree in dtype (torch.nn: ValueError for layers, RuntimeError
    for cells and packed input)."""


class InputRankError(BadInputError, ValueError):
    """input (or a cell's state) has a number of dimensions the module does not take."""


class InputShapeError(BadInputError, RuntimeError):
    """input or a state has the wrong size, device or sequence length."""


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend or kernel cannot run here (the message says why)."""
