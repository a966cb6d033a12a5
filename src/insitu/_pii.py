"""Detectors for values that look like direct identifiers.

Used by the ledger (a payload must never hold personal data) and by the data layer
(a column declared as a feature that looks like an identifier earns a warning). The
detectors favour precision over recall where a false alarm would block honest work:
card numbers must pass the Luhn check, IBANs the ISO 13616 mod-97 check, and digit runs
inside longer alphanumeric tokens (hex digests, ids) or on either side of a decimal point
(the digits of a measurement such as ``0.35484779567118791``) are not taken for card
numbers: 17 significant digits of a float pass the Luhn check one time in ten.
"""

from __future__ import annotations

import re

__all__ = ["find_personal_data", "luhn_valid"]

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# International phone numbers only (a leading +): national formats collide with counts.
_PHONE = re.compile(r"(?<![\w+])\+[1-9]\d{0,2}(?:[ .-]?\(?\d{1,4}\)?){2,6}(?!\w)")
# Digit runs inside longer tokens (hex digests, ``p_`` pseudonyms) are not card numbers,
# nor are the digits of a decimal number (``-0.35484779567118791``, ``1234567890123.45``):
# a run right after ``<digit>.`` or right before ``.<digit>`` is part of one.
_CARD = re.compile(r"(?<!\w)(?<!\d\.)(?:\d[ -]?){12,18}\d(?!\w)(?!\.\d)")
_IBAN = re.compile(r"(?<!\w)[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?!\w)")


def luhn_valid(digits: str) -> bool:
    """Whether a string of digits passes the Luhn (mod 10) check of card numbers."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _iban_valid(candidate: str) -> bool:
    compact = candidate.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    numeric = "".join(str(int(char, 36)) for char in rearranged)
    return int(numeric) % 97 == 1


def find_personal_data(text: str) -> str | None:
    """Return the kind of personal data ``text`` seems to hold, or ``None``.

    Kinds: ``"email address"``, ``"phone number"``, ``"card number"``, ``"IBAN"``.
    """
    if _EMAIL.search(text):
        return "email address"
    for match in _CARD.finditer(text):
        digits = re.sub(r"[ -]", "", match.group())
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            return "card number"
    for match in _IBAN.finditer(text):
        if _iban_valid(match.group()):
            return "IBAN"
    for match in _PHONE.finditer(text):
        if sum(char.isdigit() for char in match.group()) >= 8:
            return "phone number"
    return None
