"""Deprecated alias of moe.parallel.sharded_experts (renamed); importing it warns (DeprecationWarning).

At run time this module is moe.parallel.sharded_experts
(sys.modules): old imports, attributes and patches reach the one real module. Type checkers see
the same names through the imports below.
"""

from typing import TYPE_CHECKING

from moe._deprecated import moved_module

if TYPE_CHECKING:
    from moe.parallel.sharded_experts import *  # noqa: F403
    from moe.parallel.sharded_experts import __all__  # noqa: F401

moved_module(__name__, "moe.parallel.sharded_experts")
