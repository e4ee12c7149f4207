"""crossmae's own commands (``convert``, ``analyze``, ``benchmark``, ``ablate``, ``transfer``):
importing this package registers them (``crossmae.task.register_command``)."""

from . import ablate, analyze, benchmark, convert, memory, transfer  # noqa: F401
