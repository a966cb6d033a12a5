"""Secret randomness for every differentially private release: noise and sampling.

A DP guarantee holds only if the adversary cannot predict the noise. A generator seeded
from a configuration value (``torch.manual_seed(cfg.seed)``) fails that: whoever reads
the seed in a record or a ledger replays the draws and subtracts them, leaving the exact
sum of clipped gradients (an earlier insitu did exactly this; ``tests/privacy/
test_attack_noise_replay.py`` keeps the attack). Invariants of :class:`SecureRandom`:

* each instance is a fresh stream keyed from the operating system's CSPRNG
  (``os.urandom``, i.e. ``getrandom(2)``); no argument, configuration value or seed can
  reproduce it, and two instances are independent;
* uniform bits come from ChaCha20's keystream (RFC 8439, through ``cryptography`` and
  OpenSSL), rekeyed from the OS every :data:`REKEY_BYTES`, far below the 256 GiB at which
  its 32-bit block counter would wrap;
* Gaussian draws are Box-Muller over 53-bit uniforms in float64, and each released
  value is the sum of four draws halved (Holohan and Braghin 2021, section 5.1, as
  Opacus' ``secure_mode`` does): the floating-point attack on the low bits of a single
  draw (Jin et al. 2022) then needs a search of about 2^159 states.

Why hand-written: Opacus' own secure mode needs ``torchcsprng``, which is not built for
the torch release insitu pins (and is no longer maintained); NumPy and torch offer only
statistical generators. The stream construction (a stream cipher's keystream, keyed
from the OS) is the textbook one; this module only turns its bytes into floats.
"""

from __future__ import annotations

import math
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = ["REKEY_BYTES", "SecureRandom"]

#: Keystream bytes drawn before a stream is rekeyed from the OS.
REKEY_BYTES = 1 << 30

_TWO_PI = 2.0 * math.pi
_INV_2_53 = 1.0 / float(1 << 53)


class SecureRandom:
    """A stream of secret uniform, Bernoulli and Gaussian draws (see the module docstring)."""

    def __init__(self) -> None:
        self._rekey()

    def __repr__(self) -> str:
        return "SecureRandom(os-keyed ChaCha20)"

    def __reduce__(self) -> tuple[type[SecureRandom], tuple[()]]:
        # A copy sent to another process gets its own fresh key, never this one.
        return (SecureRandom, ())

    def _rekey(self) -> None:
        # cryptography's 16-byte ChaCha20 nonce starts with the 32-bit block counter: a
        # random one (as before) overflowed within a key's 1 GiB one time in 256 (2**24
        # of its 2**32 blocks) and failed a draw. The counter starts at 0; the 96-bit
        # nonce is random, and every nonce comes with a fresh key anyway.
        nonce = bytes(4) + os.urandom(12)
        cipher = Cipher(algorithms.ChaCha20(os.urandom(32), nonce), mode=None)
        self._stream = cipher.encryptor()
        self._used = 0

    def _bytes(self, count: int) -> bytes:
        if self._used + count > REKEY_BYTES:
            self._rekey()
        self._used += count
        return self._stream.update(bytes(count))

    def uniform(self, count: int) -> np.ndarray:
        """``count`` float64 values uniform on [0, 1), 53 random bits each."""
        if count < 0:
            raise ValueError("count must be non-negative")
        words = np.frombuffer(self._bytes(8 * count), dtype="<u8")
        return (words >> np.uint64(11)).astype(np.float64) * _INV_2_53

    def bernoulli(self, count: int, *, probability: float) -> np.ndarray:
        """``count`` independent booleans, each true with ``probability`` (Poisson sampling)."""
        if not 0.0 <= probability <= 1.0:
            raise ValueError("probability must be in [0, 1]")
        return self.uniform(count) < probability

    def _standard_normal(self, count: int) -> np.ndarray:
        pairs = (count + 1) // 2
        u = self.uniform(2 * pairs)
        radius = np.sqrt(-2.0 * np.log1p(-u[:pairs]))  # 1 - u is in (0, 1]: log is finite
        angle = _TWO_PI * u[pairs:]
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]

    def normal(self, shape: tuple[int, ...], *, std: float) -> np.ndarray:
        """Gaussian noise N(0, std^2) of ``shape`` in float64, hardened as described above."""
        if std < 0 or not math.isfinite(std):
            raise ValueError("std must be finite and non-negative")
        count = math.prod(shape)
        if std == 0 or count == 0:
            return np.zeros(shape)
        total = np.zeros(count)
        for _ in range(4):
            total += self._standard_normal(count)
        return (total * (std / 2.0)).reshape(shape)
