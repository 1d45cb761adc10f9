"""The runtime base: what a process of the service runs on, below every app.

The connection pool's figures and refusals (``pool``), the C heap and glibc's malloc arenas
(``heap``), the process's serving role (``roles``) and the embedded default database
(``embedded_pg``). It imports only Django and third-party libraries; the apps above it
(``buffers``, ``memory``) and the project (``memfuse_project``) import it, never the reverse
(the ``layers`` contract in ``pyproject.toml``).
"""
