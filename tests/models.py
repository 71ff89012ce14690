"""Example models built from torch.nn recurrent modules, and helpers to build fusedrnn twins.

The models are what `fusedrnn.convert` meets in practice: a language model with tied weights, a
packed bidirectional tagger, an encoder-decoder driven by a cell loop, and containers nesting
recurrent modules at several depths.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

LAYER_NAMES = ("LSTM", "GRU", "RNN")
CELL_NAMES = ("LSTMCell", "GRUCell", "RNNCell")
RECURRENT_TYPES = tuple(getattr(nn, n) for n in LAYER_NAMES + CELL_NAMES)


def fused_class(name: str):
    import fusedrnn

    return getattr(fusedrnn, name)


def make_twin_pair(name: str, *args, backend: str = "auto", dtype=torch.float64, **kwargs):
    """(torch.nn module, fusedrnn twin) with identical constructor arguments and weights.

    backend "loop" is not a user-facing backend: it forces the route torch.compile takes on CPU
    (the fusedrnn::layer op with its PyTorch step loop) in eager mode, so that the op's own math is
    compared with torch.nn outside a compiler too."""
    ref = getattr(nn, name)(*args, dtype=dtype, **kwargs)
    fused = fused_class(name)(*args, dtype=dtype, backend="auto" if backend == "loop" else backend, **kwargs)
    fused.load_state_dict(ref.state_dict(), strict=True)
    if backend == "loop":
        fused.__dict__["_route"] = lambda device: "loop"
        fused.__dict__["_fast_cell"] = lambda *args: None
    return ref, fused


def recurrent_modules(model: nn.Module):
    """(qualified name, module) of every recurrent module (torch.nn or fusedrnn) in the tree."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.RNNBase, nn.RNNCellBase))]


class TiedLSTMLanguageModel(nn.Module):
    """Embedding -> LSTM -> Linear decoder whose weight IS the embedding weight (tied)."""

    def __init__(self, vocab=11, dim=6, num_layers=2, dropout=0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, dim, num_layers=num_layers, dropout=dropout, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(dim, vocab)
        self.decoder.weight = self.embed.weight

    def forward(self, tokens, hx=None):
        y, hx = self.rnn(self.drop(self.embed(tokens)), hx)
        return self.decoder(self.drop(y)), hx


class PackedBiLSTMTagger(nn.Module):
    """Embedding -> packed (unsorted lengths) bidirectional LSTM -> per-token tag scores."""

    def __init__(self, vocab=13, dim=5, hidden=4, tags=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.rnn = nn.LSTM(dim, hidden, bidirectional=True, batch_first=True)
        self.out = nn.Linear(2 * hidden, tags)

    def forward(self, tokens, lengths):
        packed = pack_padded_sequence(self.embed(tokens), lengths, batch_first=True,
                                      enforce_sorted=False)
        y, (h, c) = self.rnn(packed)
        y, _ = pad_packed_sequence(y, batch_first=True, total_length=tokens.shape[1])
        return self.out(y), h, c


class Seq2Seq(nn.Module):
    """GRU encoder, LSTMCell decoder loop with teacher forcing, plus an RNNCell/GRUCell side path."""

    def __init__(self, src_dim=3, tgt_dim=4, hidden=5):
        super().__init__()
        self.encoder = nn.GRU(src_dim, hidden, num_layers=2)
        self.bridge = nn.Linear(hidden, hidden)
        self.decoder = nn.LSTMCell(tgt_dim, hidden)
        self.aux = nn.ModuleList([nn.GRUCell(hidden, hidden), nn.RNNCell(hidden, hidden,
                                                                         nonlinearity="relu")])
        self.head = nn.Linear(hidden, tgt_dim)

    def forward(self, src, tgt):
        _, h_enc = self.encoder(src)              # (2, B, H)
        h = torch.tanh(self.bridge(h_enc[-1]))
        c = torch.zeros_like(h)
        outs = []
        for t in range(tgt.shape[0]):
            h, c = self.decoder(tgt[t], (h, c))
            a = self.aux[1](self.aux[0](h), h)
            outs.append(self.head(a))
        return torch.stack(outs)


class Nested(nn.Module):
    """Recurrent modules at several depths and in every kind of container."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.RNN(3, 4)))
        self.dict = nn.ModuleDict({"gru": nn.GRU(4, 4, batch_first=True),
                                   "cell": nn.LSTMCell(4, 2)})
        self.list = nn.ModuleList([nn.LSTM(4, 3, proj_size=2, bidirectional=True)])

    def forward(self, x):                         # x: (T, B, 3)
        y, _ = self.seq(x)
        y, _ = self.dict["gru"](y.transpose(0, 1))
        y, _ = self.list[0](y.transpose(0, 1))
        h, c = self.dict["cell"](y[-1, :, :4])
        return h + c.sum()


class MyLSTM(nn.LSTM):
    """A user subclass with its own forward: convert must leave it alone (and warn)."""

    def forward(self, input, hx=None):
        y, hx = super().forward(input, hx)
        return 2 * y, hx


class WithSubclass(nn.Module):
    def __init__(self):
        super().__init__()
        self.custom = MyLSTM(3, 4)
        self.plain = nn.GRU(4, 2)

    def forward(self, x):
        y, _ = self.custom(x)
        return self.plain(y)[0]
