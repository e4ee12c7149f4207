"""The ``crossmae convert``, ``crossmae analyze`` and ``crossmae benchmark`` commands."""
