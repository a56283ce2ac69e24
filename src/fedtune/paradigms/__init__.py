"""How clients federate: each paradigm is a server half (a round as a conversation) and a client half.

``base.py`` is the seam; ``registry.PARADIGMS`` lists the paradigms the config accepts, each a
package with ``setup.py`` (``server(...)``, ``client(...)``), its messages, server and client.
"""
