"""Deprecated alias of moe.lora.adapter_checkpoint (renamed); importing it warns (DeprecationWarning).

At run time this module is moe.lora.adapter_checkpoint
(sys.modules): old imports, attributes and patches reach the one real module. Type checkers see
the same names through the imports below.
"""

from typing import TYPE_CHECKING

from moe._deprecated import moved_module

if TYPE_CHECKING:
    from moe.lora.adapter_checkpoint import *  # noqa: F403
    from moe.lora.adapter_checkpoint import __all__  # noqa: F401

moved_module(__name__, "moe.lora.adapter_checkpoint")
