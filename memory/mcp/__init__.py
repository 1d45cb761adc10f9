"""The memory over the Model Context Protocol: the tools (``tools``), served over Streamable
HTTP at ``/mcp`` in the ASGI application (``http``) and over stdio (``manage.py mcp_stdio``)."""
