"""The noise seeded sampling draws with: trainer/gumbel's definition, so
that this worker, the native engine and the auditor draw the same.

A token at one position of one sample is the argmax over the allowed
tokens of logit/temperature + noise(key, token), with key from the seed,
the prompt's and the sample's index and the position. The arithmetic is
SplitMix64 on 64-bit words, done here on int64 tensors: multiplication
wraps modulo 2^64 as unsigned arithmetic does, and right shifts are made
logical with a mask.
"""

import torch

_M64 = (1 << 64) - 1


def _s64(x):
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _s64(0x9E3779B97F4A7C15)
_MUL1 = _s64(0xBF58476D1CE4E5B9)
_MUL2 = _s64(0x94D049BB133111EB)


def _mix_int(x):
    """SplitMix64's finaliser on a Python int (unsigned 64-bit)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def key(seed, prompt, sample, position):
    """The noise stream of one position of one sample (gumbel.Key)."""
    k = _mix_int(seed & _M64)
    k = _mix_int(k ^ prompt)
    k = _mix_int(k ^ sample)
    return _mix_int(k ^ position)


def _srl(x, n):
    """Logical right shift of int64 tensors."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _mix(x):
    x = x + _GOLDEN
    x = (x ^ _srl(x, 30)) * _MUL1
    x = (x ^ _srl(x, 27)) * _MUL2
    return x ^ _srl(x, 31)


def noise(keys, vocab, device=None):
    """Gumbel noise of every token for each key: a [len(keys), vocab]
    float64 tensor, noise[i, v] = gumbel.Noise(keys[i], v)."""
    k = torch.tensor([_s64(x) for x in keys], dtype=torch.int64, device=device)
    tokens = torch.arange(vocab, dtype=torch.int64, device=device)
    h = _mix(k[:, None] ^ tokens[None, :])
    u = (_srl(h, 11).to(torch.float64) + 0.5) * (2.0 ** -53)
    return -torch.log(-torch.log(u))
