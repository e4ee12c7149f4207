"""The ``crossmae convert``, ``analyze``, ``benchmark`` and ``ablate`` commands."""
