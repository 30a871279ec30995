"""The conformance suite of every registered family × implementation × setting.

Generated from `attnzoo.attention.FAMILIES`: registering a family adds its classes here
(`tests/attention/conformance.py` says what they test; the family's `Family.conformance` says
how to call it).
"""

from attnzoo import attention
from tests.attention import conformance

for _name in attention.FAMILIES:
  globals().update(conformance.suites(_name))
