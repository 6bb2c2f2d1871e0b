"""A job: its file (``config``), its data (``records``, ``data``) and the length-Dirichlet partition of it
(``partition``)."""
